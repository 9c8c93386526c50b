"""The Transformer Engine spec's attention, exercised on CPU (TE is not installed here).

With ``model.transformer_impl=transformer_engine`` TE's own attention may run only where the
mask is none or causal: any arbitrary boolean mask (block diffusion's 2L mask, adaptation's
annealed masks, document masks) would run on TE's unfused s x s path, so the layer spec puts
the project's kernel there, and the planner must report (and size) the same kernel. The
selection runs through the real ``layer_spec`` with megatron-core's TE spec function replaced
by a stand-in (the local spec with a marker class as core attention), because megatron-core
cannot build the TE spec without TE. When TE is requested but absent, the model is the local
spec with sdpa, said in one line: that runs for real here.
"""
import sys

import pytest
import torch

from dlm_megatron.config import load_config

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=192", "model.make_vocab_size_divisible_by=64", "data.seq_len=32",
         "diffusion.random_length_prob=0", "logging.wandb=disabled"]

# (name, config, overrides, needs arbitrary masks)
RUNS = [
    ("masked", "configs/tiny.yaml", [], False),
    ("ar", "configs/tiny.yaml", ["diffusion.objective=ar"], False),
    ("uniform", "configs/tiny.yaml", ["diffusion.objective=uniform"], False),
    ("continuous", "configs/tiny.yaml", ["diffusion.objective=continuous"], False),
    ("block", "configs/tiny_block.yaml", [], True),
    ("adaptation", "configs/tiny.yaml", ["diffusion.anneal_steps=10", "diffusion.shift_logits=true"], True),
    ("masked_document_masks", "configs/tiny.yaml", ["data.document_masks=true"], True),
    ("ar_document_masks", "configs/tiny.yaml", ["diffusion.objective=ar", "data.document_masks=true"], True),
]


class TEAttentionStandIn:
    """Marks TE's own core attention (TEDotProductAttention) in the stand-in spec."""


def _te_spec_stand_in(**kwargs):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **kwargs)
    spec.submodules.self_attention.submodules.core_attention = TEAttentionStandIn
    return spec


@pytest.fixture
def te_present(monkeypatch):
    """layer_spec sees Transformer Engine as installed and gets the stand-in TE spec."""
    from megatron.core.models.gpt import gpt_layer_specs

    from dlm_megatron.model import denoiser

    monkeypatch.setattr(denoiser, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", _te_spec_stand_in)


def _built_kernel(cfg) -> str:
    """'te' or the project's backend that layer_spec plugs in as core attention."""
    from dlm_megatron.model.attention import CoreAttention
    from dlm_megatron.model.denoiser import attn_mask_type_for, layer_spec

    core = layer_spec(cfg, attn_mask_type_for(cfg)).submodules.self_attention.submodules.core_attention
    if core is TEAttentionStandIn:
        return "te"
    assert core.func is CoreAttention, core
    return core.keywords["backend"]


@pytest.mark.parametrize("backend", ["auto", "dense"])
@pytest.mark.parametrize("name,config,overrides,arbitrary", RUNS, ids=[r[0] for r in RUNS])
def test_te_spec_runs_the_project_kernel_exactly_where_masks_are_arbitrary(te_present, name, config, overrides,
                                                                           arbitrary, backend):
    from dlm_megatron.model.backends import resolve_backend
    from dlm_megatron.planner import kernels_for

    cfg = load_config(config, SMALL + overrides + ["model.transformer_impl=transformer_engine",
                                                   f"model.attention_backend={backend}"])
    built = _built_kernel(cfg)
    on_gpu = torch.cuda.is_available()  # what layer_spec resolves 'auto' with
    block = cfg.diffusion.objective == "block"
    assert built == (resolve_backend(backend, block=block, cuda=on_gpu) if arbitrary else "te"), name
    # the planner reports (and sizes) the kernel the builder chose
    k = kernels_for(cfg, on_gpu=on_gpu)
    assert k.impl == "fused"
    assert k.attention == ("dense" if built == "dense" else "flash"), (name, built, k)


@pytest.mark.parametrize("name,config,overrides,arbitrary", RUNS, ids=[r[0] for r in RUNS])
def test_local_spec_always_runs_the_project_kernel(name, config, overrides, arbitrary):
    from dlm_megatron.planner import kernels_for

    cfg = load_config(config, SMALL + overrides + ["model.transformer_impl=local", "model.attention_backend=dense"])
    assert _built_kernel(cfg) == "dense"
    assert kernels_for(cfg, on_gpu=torch.cuda.is_available()) == type(kernels_for(cfg))(impl="local", attention="dense")


def test_without_transformer_engine_the_te_config_builds_the_local_spec_with_sdpa(monkeypatch, capsys):
    """TE requested but not importable: one line says so, and the model is exactly the local
    spec with sdpa attention (same parameter names, same output from the same weights)."""
    from dlm_megatron.model import denoiser
    from dlm_megatron.model.attention import CoreAttention
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # absent even where installed: import raises
    monkeypatch.delattr(denoiser.effective_transformer_impl, "_warned", raising=False)
    V = 64
    te_cfg = load_config("configs/tiny.yaml", SMALL + ["model.transformer_impl=transformer_engine"])
    local_cfg = load_config("configs/tiny.yaml", SMALL + ["model.transformer_impl=local", "model.attention_backend=sdpa"])
    pdist.init_distributed(te_cfg)
    capsys.readouterr()
    models = []
    for cfg in (te_cfg, local_cfg, te_cfg):  # the note is printed once per process
        model = denoiser.build_model(cfg, V, pre_process=True, post_process=True)
        denoiser.init_weights(model, cfg, tp_rank=0, pp_rank=0)
        models.append(model.eval())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "Transformer Engine is not installed" in lines[0], lines
    assert "local megatron-core spec" in lines[0] and "sdpa" in lines[0], lines
    te_model, local_model = models[0], models[1]
    attn = [m for m in te_model.modules() if isinstance(m, CoreAttention)]
    assert len(attn) == te_cfg.model.num_layers and all(a.backend == "sdpa" for a in attn)
    assert not any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in te_model.modules())
    assert [n for n, _ in te_model.named_parameters()] == [n for n, _ in local_model.named_parameters()]
    x = torch.randint(3, V - 1, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(te_model(x, None, None), local_model(x, None, None))
