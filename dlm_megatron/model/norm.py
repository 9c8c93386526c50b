"""The local spec's norms, usable under sequence parallelism.

megatron-core 0.16.1's local spec builds its norms with ``WrappedTorchNorm``, which returns a
plain ``torch.nn.RMSNorm`` / ``LayerNorm`` but asserts ``not config.sequence_parallel``. The
norms themselves need nothing special under sequence parallelism: each TP rank normalises its
own slice of the sequence. What changes is the gradient of their (replicated) weights: each
rank's is the sum over its sequence slice only, so the full gradient is the sum over the TP
group. megatron's SP-capable norms (Transformer Engine's, apex's FusedLayerNorm) mark their
weights ``sequence_parallel = True`` and megatron's ``finalize_model_grads`` then all-reduces
(sums) those gradients over the TP group (``_allreduce_non_tensor_model_parallel_grads``).
``HiddenNorm`` does the same with the torch modules, so the parameters, their names
(``weight``, ``bias``) and their initial values are exactly the local spec's: checkpoints do
not change.

q/k norms (``model.qk_layernorm``) act on per-head vectors after the column-parallel QKV
projection, which all-gathers the sequence under SP: their inputs are the full sequence of
this rank's heads, not a sequence slice. Their per-rank gradient is the sum over this rank's
heads, so the full gradient is also the sum over the TP group, with or without SP; megatron's
finalize step sums q_layernorm / k_layernorm gradients by name whenever
``config.qk_layernorm`` is on (one sum: a parameter matching both rules is still reduced
once). ``HeadNorm`` therefore does not mark them: it only lifts the assertion.

This file holds no distributed code: the reduction is megatron's finalize step (the megatron
engine). DeepSpeed does not run it, so the config refuses sequence parallelism there.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def _torch_norm(config: TransformerConfig, hidden_size: int, eps: float) -> torch.nn.Module:
    """The torch module ``WrappedTorchNorm`` would build (same class, shape, eps, init)."""
    assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch norms"
    assert not config.persist_layer_norm, "persist_layer_norm not supported by torch norms"
    assert not config.memory_efficient_layer_norm, "memory_efficient_layer_norm not supported by torch norms"
    if config.normalization == "LayerNorm":
        return torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
    if config.normalization == "RMSNorm":
        return torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
    raise ValueError(f"unsupported normalization {config.normalization!r} (LayerNorm or RMSNorm)")


class HiddenNorm:
    """A norm over the hidden size (input_layernorm, pre_mlp_layernorm, final_layernorm):
    torch's RMSNorm / LayerNorm whose parameters carry ``sequence_parallel`` =
    ``config.sequence_parallel``, so megatron's finalize step sums their gradients over TP."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = _torch_norm(config, hidden_size, eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class HeadNorm:
    """A per-head q/k norm: torch's RMSNorm / LayerNorm, not marked (see the module docstring)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        return _torch_norm(config, hidden_size, eps)
