"""How each parameter of the denoiser is laid out across tensor/pipeline ranks.

One place knows the mapping between a rank's local parameters and the full, layout-free
model ("canonical" names with global layer indices and full shapes). It serves three jobs:
layout-independent initialisation (draw the full tensor from the seed, keep my slice),
writing checkpoints that any layout can read, and offline resharding / export.

megatron-core marks TP-split parameters with ``tensor_model_parallel`` / ``partition_dim``.
One subtlety: SwiGLU's fused ``linear_fc1`` holds [gate; up] stacked, and each TP rank holds
[gate_r; up_r] — a plain contiguous split of the full [gate; up] would give rank 0 all of the
gate. ``shard``/``unshard`` handle that layout explicitly.
"""
from __future__ import annotations

import re
import zlib

import torch

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def partition_dim(name: str) -> int | None:
    """TP partition dimension of a canonical parameter, or None if replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return 0
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    if name == "time_embedding.proj.weight":
        return None  # continuous diffusion's time embedding [H, F]: replicated on every TP rank
    return None


def is_glu(name: str) -> bool:
    return ".linear_fc1." in name


def to_global_name(local_name: str, layer_offset: int) -> str:
    """decoder.layers.{i}.x -> decoder.layers.{i+offset}.x (other names unchanged)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"


# Transformer Engine's layer spec fuses each norm into the linear that follows it; canonical
# names (checkpoints, export, reshard, init) use the local spec's separate norm modules, so a
# checkpoint does not depend on transformer_impl.
_TE_TO_LOCAL = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


# Routed experts: SequentialMLP names them ``mlp.experts.local_experts.{i}.linear_fc1.weight``,
# Transformer Engine's grouped GEMM ``mlp.experts.linear_fc1.weight{i}``, both with i local to
# the expert-parallel rank. Canonical: SequentialMLP's form with the global expert index.
_SEQUENTIAL_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_GROUPED_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")


def global_expert_name(name: str, expert_offset: int) -> str:
    """An expert parameter's name with its global expert index (local index + ``expert_offset``
    = ep_rank * experts per rank), in SequentialMLP's form; other names unchanged."""
    m = _SEQUENTIAL_EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}local_experts.{int(m.group(2)) + expert_offset}.{m.group(3)}.{m.group(4)}"
    m = _GROUPED_EXPERT_RE.match(name)
    if m:
        return f"{m.group(1)}local_experts.{int(m.group(4)) + expert_offset}.{m.group(2)}.{m.group(3)}"
    return name


def is_expert(name: str) -> bool:
    """A routed expert's parameter (split over expert-parallel ranks); shared experts and the
    router are replicated like dense weights."""
    return ".mlp.experts." in name


def canonical_name(local_name: str, layer_offset: int, tie_embeddings: bool = False, expert_offset: int = 0) -> str:
    """A rank's parameter name -> its layout-free name: global layer index, global expert index
    (in one form whatever the expert implementation), TE's fused norm names as the local
    spec's, and (tied embeddings) the last pipeline stage's copy of the embedding as the
    embedding itself, so both stages start from the same draw."""
    name = global_expert_name(to_global_name(local_name, layer_offset), expert_offset)
    for te, local in _TE_TO_LOCAL:
        if name.endswith(te):
            return name[: -len(te)] + local
    if tie_embeddings and name == TIED_OUTPUT:
        return EMBEDDING
    return name


def layer_index(global_name: str) -> int | None:
    m = _LAYER_RE.match(global_name)
    return int(m.group(2)) if m else None


def shard(full: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of a full tensor that TP rank ``tp_rank`` holds."""
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if is_glu(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from all TP ranks' slices (in rank order)."""
    dim = partition_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if is_glu(name):
        gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts))
        return torch.cat([*gates, *ups], dim=dim)
    return torch.cat(parts, dim=dim)


def full_shape(local_shape: torch.Size, name: str, tp_size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    dim = partition_dim(name)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def name_seed(seed: int, name: str) -> int:
    """A per-parameter seed from the run seed and the canonical name (layout-free)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF


def is_norm_scale(name: str) -> bool:
    """RMSNorm/LayerNorm scales, in the local spec's names (``input_layernorm.weight``,
    ``final_layernorm.weight``) and Transformer Engine's fused ones (``linear_qkv.layer_norm_weight``,
    ``linear_fc1.layer_norm_weight``)."""
    return "layernorm" in name or name.endswith(("norm.weight", "layer_norm_weight"))


def init_full(name: str, shape: tuple[int, ...], *, seed: int, std: float, num_layers: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial value of a canonical parameter at full size (fp32, on ``device``).

    Norm scales start at 1 and biases (TE's ``layer_norm_bias`` included) at 0; output
    projections of residual branches (linear_proj, linear_fc2) get std / sqrt(2 * num_layers)
    as in GPT-2/Megatron; everything else N(0, std). Random draws come from a generator on
    ``device`` seeded by (seed, name): a pure function of the name for a given device type
    (CPU and CUDA generators differ, so all ranks of a run draw on the same device type).
    """
    if name.endswith((".bias", "layer_norm_bias", ".expert_bias")):
        return torch.zeros(shape, device=device)
    if is_norm_scale(name):
        return torch.ones(shape, device=device)
    if name == "time_embedding.proj.weight":
        s = std  # continuous diffusion's time embedding: N(0, std) like other input projections
    else:
        s = std / (2.0 * num_layers) ** 0.5 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
    g = torch.Generator(device=device).manual_seed(name_seed(seed, name))
    return torch.randn(shape, generator=g, device=device) * s
