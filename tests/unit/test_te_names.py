"""Transformer Engine's fused parameter names: init, canonical (checkpoint) names, loading.

TE's layer spec has no separate norm modules: the RMSNorm scale before attention lives in
``self_attention.linear_qkv.layer_norm_weight`` and the one before the MLP in
``mlp.linear_fc1.layer_norm_weight``. The names are read from megatron-core's own source (its
TE -> local rewrite table for GPT checkpoints), so TE need not be installed to test them.
"""
import ast
import inspect

import pytest
import torch

from dlm_megatron.model import sharding


def megatron_te_to_local() -> dict[str, str]:
    """megatron-core's ``module_name_rewrite_list`` (TE fused name -> local spec name)."""
    from megatron.core.post_training.modelopt.gpt import state_dict_hooks

    tree = ast.parse(inspect.getsource(state_dict_hooks))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "module_name_rewrite_list" for t in node.targets):
            pairs = ast.literal_eval(node.value)
            # the GPT layer's two fused norms (q/kv up-projections are MLA, mixer is Mamba)
            return {te: local for te, local in pairs if te.startswith(("self_attention.linear_qkv.", "mlp.linear_fc1."))}
    raise AssertionError("megatron-core's TE rewrite table not found")


TE_NAMES = megatron_te_to_local()


def test_megatron_source_lists_the_fused_norm_names():
    assert TE_NAMES["self_attention.linear_qkv.layer_norm_weight"] == "input_layernorm.weight"
    assert TE_NAMES["mlp.linear_fc1.layer_norm_weight"] == "pre_mlp_layernorm.weight"


@pytest.mark.parametrize("te", sorted(TE_NAMES))
def test_canonical_names_are_the_local_specs(te):
    local = TE_NAMES[te]
    # layer offset applies (pipeline stage 1 of 2, 4 layers)
    assert sharding.canonical_name(f"decoder.layers.1.{te}", 2) == f"decoder.layers.3.{local}"
    assert sharding.partition_dim(sharding.canonical_name(f"decoder.layers.0.{te}", 0)) is None  # replicated over TP


@pytest.mark.parametrize("te", sorted(TE_NAMES))
def test_fused_norms_initialise_like_norms(te):
    for name in (f"decoder.layers.0.{te}", sharding.canonical_name(f"decoder.layers.0.{te}", 0)):
        v = sharding.init_full(name, (8,), seed=1, std=0.02, num_layers=2)
        assert torch.equal(v, torch.ones(8) if te.endswith("weight") else torch.zeros(8)), name


def test_a_te_model_loads_a_local_checkpoint_and_saves_the_same_names():
    """A module with TE's parameter names gets its norms from a local-spec full state dict,
    and its canonical names (what a checkpoint stores) are the local spec's."""
    from dlm_megatron import checkpoint as ckpt
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import canonical_params

    cfg = load_config("configs/tiny.yaml", ["model.num_layers=1", "model.hidden_size=8", "model.num_attention_heads=2"])
    te_model = torch.nn.Module()
    params = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.zeros(8),
              "decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(24, 8),
              "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": torch.zeros(8)}
    for name, t in params.items():
        mod = te_model
        for part in name.split(".")[:-1]:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(name.split(".")[-1], torch.nn.Parameter(t))
    full = {"decoder.layers.0.input_layernorm.weight": torch.full((8,), 2.0),
            "decoder.layers.0.self_attention.linear_qkv.weight": torch.ones(24, 8),
            "decoder.layers.0.pre_mlp_layernorm.weight": torch.full((8,), 3.0)}
    local = ckpt.local_state_from_full(full, te_model, cfg, tp_rank=0, pp_rank=0)
    te_model.load_state_dict(local)
    got = dict(te_model.named_parameters())
    assert torch.equal(got["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"], torch.full((8,), 2.0))
    assert torch.equal(got["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"], torch.full((8,), 3.0))
    assert sorted(n for n, _ in canonical_params(te_model, cfg, 0)) == sorted(full)


def test_tied_output_copy_shares_the_embeddings_canonical_name():
    assert sharding.canonical_name("output_layer.weight", 2, tie_embeddings=True) == "embedding.word_embeddings.weight"
    assert sharding.canonical_name("output_layer.weight", 2, tie_embeddings=False) == "output_layer.weight"
