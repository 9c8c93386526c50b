"""Sequence parallelism on the local (non-Transformer-Engine) spec: the project's norms (same
torch modules, names and init as megatron's WrappedTorchNorm, hidden-size norms marked for
finalize's TP all-reduce, q/k norms not), random lengths that tile the TP ranks, and the
config's one-line refusals. The numerical proof is tests/distributed (test_layouts.py: sp_*,
test_moe.py: moe_tp2_sp*)."""
from types import SimpleNamespace

import pytest
import torch


def _tcfg(sp: bool, normalization="RMSNorm"):
    return SimpleNamespace(sequence_parallel=sp, normalization=normalization, layernorm_zero_centered_gamma=False,
                           persist_layer_norm=False, memory_efficient_layer_norm=False)


@pytest.mark.parametrize("normalization,cls", [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)])
def test_norms_are_the_torch_modules_marked_as_megatron_expects(normalization, cls):
    from dlm_megatron.model.norm import HeadNorm, HiddenNorm

    for sp in (False, True):
        n = HiddenNorm(_tcfg(sp, normalization), 16, eps=1e-6)
        assert type(n) is cls and n.eps == 1e-6 and n.normalized_shape == (16,)
        assert all(getattr(p, "sequence_parallel") is sp for p in n.parameters())
        assert torch.equal(n.weight, torch.ones(16))
        q = HeadNorm(_tcfg(sp, normalization), 8)
        assert type(q) is cls and not any(hasattr(p, "sequence_parallel") for p in q.parameters())


def test_local_spec_uses_the_project_norms():
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import attn_mask_type_for, decoder_spec
    from dlm_megatron.model.norm import HeadNorm, HiddenNorm

    cfg = load_config("configs/tiny_moe.yaml", ["model.qk_layernorm=true", "logging.wandb=disabled"])
    block = decoder_spec(cfg, attn_mask_type_for(cfg), 0)
    assert block.layer_norm is HiddenNorm
    for spec in block.layer_specs:
        s = spec.submodules
        assert s.input_layernorm is HiddenNorm and s.pre_mlp_layernorm is HiddenNorm
        assert s.self_attention.submodules.q_layernorm is HeadNorm and s.self_attention.submodules.k_layernorm is HeadNorm


def test_random_length_tiles_the_tensor_parallel_ranks():
    from dlm_megatron.diffusion.objectives import step_random_length

    plain = [step_random_length(0, s, 32, 1.0) for s in range(200)]
    sp = [step_random_length(0, s, 32, 1.0, multiple=4) for s in range(200)]
    assert any(L % 4 for L in plain)
    assert all(L % 4 == 0 and 1 <= L <= 32 and L - 4 < a <= L for L, a in zip(sp, plain))


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=deepspeed"],
     "parallel.sequence_parallel=true needs parallel.engine=megatron"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"],  # auto -> megatron
     "zero_stage=2 is not supported by the megatron engine \\(auto picks it"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=megatron", "parallel.zero_stage=1", "data.seq_len=33"],
     "data.seq_len=33 must be divisible by parallel.tp=2"),
    (["parallel.sequence_parallel=true", "parallel.engine=megatron", "parallel.zero_stage=1"], "needs parallel.tp >= 2"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=megatron", "parallel.zero_stage=1",
      "model.transformer_impl=transformer_engine"], "proven only on the local spec.*set model.transformer_impl=local"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=megatron", "parallel.zero_stage=1",
      "diffusion.objective=continuous"], "continuous"),
])
def test_refusals_are_one_line(overrides, match):
    from dlm_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match) as e:
        load_config("configs/tiny.yaml", ["logging.wandb=disabled", *overrides])
    assert "\n" not in str(e.value)


def test_auto_picks_the_megatron_engine_for_sequence_parallel():
    from dlm_megatron.config import load_config, resolved_engine

    cfg = load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true", "logging.wandb=disabled"])
    assert resolved_engine(cfg.parallel, cfg.model) == "megatron"


def test_local_spec_with_sequence_parallel_is_accepted():
    from dlm_megatron.config import load_config

    cfg = load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=megatron",
                                            "parallel.zero_stage=1", "model.transformer_impl=local", "logging.wandb=disabled"])
    assert cfg.model.transformer_impl == "local" and cfg.parallel.sequence_parallel
