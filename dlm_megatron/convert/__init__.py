"""Checkpoint conversion: export to Hugging Face / GGUF, import from Hugging Face, reshard.

Every converter goes through one neutral, layout-free description of the weights
(``Weights``: per-layer q, k, v, o, gate, up, down and norms, plus embedding, final norm
and output head, all full-size fp32 tensors with the padded vocabulary rows still in
place) and one description of the architecture (``Arch``). The megatron-specific parts
live here, once:

- ``linear_qkv`` is megatron-core's fused, group-major layout: for each of the ``ng`` query
  groups, ``heads/ng`` query heads, then that group's key head, then its value head, each
  ``head_dim`` rows (see ``SelfAttention.get_query_key_value_tensors``). Query head ``j``
  therefore belongs to group ``j // (heads/ng)``, the same grouping as Hugging Face's
  ``repeat_kv``.
- ``linear_qkv.bias`` (``model.add_qkv_bias``, Qwen2) has the same group-major row order.
- ``linear_fc1`` is SwiGLU's [gate; up] stacked along the rows (``silu(gate) * up``).
- RoPE is megatron's default non-interleaved ("rotate half") layout, the same as HF Llama
  and LLaDA; GGUF needs the llama.cpp row permutation (gguf.py).
- Transformer-Engine checkpoints fuse the norms into the linear layers
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); ``Weights`` accepts
  both spellings.

Submodules: ``hf`` (LLaDA-layout and Llama-layout export, Llama/Qwen2 import), ``gguf``
(llama.cpp ``llada`` files), ``reshard`` (any TP/PP layout to any other).
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch


class ConvertError(ValueError):
    """A conversion problem, phrased for the user (the CLI prints it as one line)."""


# ---------------------------------------------------------------------------------------
# Progress


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, *, desc: str, enabled: bool = True, unit: str = "tensor"):
    """A tqdm bar on stderr (``.update()``), or a no-op when disabled or tqdm is missing."""
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the library
        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar


def track(iterable: Iterable, *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator:
    """Iterate with a progress bar."""
    with progress_bar(total, desc=desc, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update()


# ---------------------------------------------------------------------------------------
# Architecture


OBJECTIVES_WITH_STANDARD_WEIGHTS = ("masked", "block", "ar", "uniform", "hybrid")


@dataclass
class Arch:
    """What a converter needs to know about the network (from meta.json's config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    """Real vocabulary (meta.json vocab_size): rows beyond it are padding."""
    padded_vocab_size: int
    """Embedding rows in the checkpoint (vocab padded to make_vocab_size_divisible_by)."""
    rope_theta: float
    norm_eps: float
    tied: bool
    objective: str
    block_size: int | None
    shift_logits: bool
    seq_len: int
    init_std: float = 0.02
    qkv_bias: bool = False
    """model.add_qkv_bias: the q/k/v projections have biases (Qwen2 style)."""
    qk_norm: bool = False
    """model.qk_layernorm: per-head RMSNorm of q and k before RoPE."""
    num_experts: int = 0
    """Mixture of experts: routed experts per MoE layer (0 = dense model)."""
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_shared_ffn_hidden_size: int = 0
    moe_layers: tuple = ()
    """1 for each MoE layer, 0 for each dense one (config.moe_layer_pattern)."""
    moe_pre_softmax: bool = False
    """Softmax over all experts, top-k kept without renormalising (LLaDA-MoE; Qwen-MoE norm_topk_prob=false)."""
    moe_score_function: str = "softmax"
    moe_expert_bias: bool = False

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


def arch_from_meta(meta: dict) -> Arch:
    """``Arch`` of a framework checkpoint's meta.json."""
    from ..config import ffn_size, from_dict, head_dim, moe_ffn_size, moe_layer_pattern, padded_vocab_size

    cfg = from_dict(meta["config"])
    m, d = cfg.model, cfg.diffusion
    if m.transformer_impl not in ("local", "transformer_engine"):
        raise ConvertError(f"unknown model.transformer_impl {m.transformer_impl!r}")
    vocab = int(meta["vocab_size"])
    return Arch(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_attention_heads,
        num_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=head_dim(m),
        ffn_hidden_size=ffn_size(m),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, m, 1),
        rope_theta=float(m.rotary_base),
        norm_eps=float(m.norm_epsilon),
        tied=bool(m.tie_embeddings),
        objective=d.objective,
        block_size=d.block_size if d.objective == "block" else None,
        shift_logits=bool(getattr(d, "shift_logits", False)),
        seq_len=cfg.data.seq_len,
        init_std=m.init_method_std,
        qkv_bias=bool(m.add_qkv_bias),
        qk_norm=bool(m.qk_layernorm),
        num_experts=m.num_moe_experts or 0,
        moe_topk=m.moe_router_topk if m.num_moe_experts else 0,
        moe_ffn_hidden_size=moe_ffn_size(m) if m.num_moe_experts else 0,
        moe_shared_ffn_hidden_size=m.moe_shared_expert_intermediate_size if m.num_moe_experts else 0,
        moe_layers=tuple(moe_layer_pattern(m)),
        moe_pre_softmax=bool(m.moe_router_pre_softmax),
        moe_score_function=m.moe_router_score_function,
        moe_expert_bias=bool(m.moe_router_enable_expert_bias),
    )


# ---------------------------------------------------------------------------------------
# Neutral weights


@dataclass
class Layer:
    attn_norm: torch.Tensor
    q: torch.Tensor  # [heads * head_dim, hidden]
    k: torch.Tensor  # [groups * head_dim, hidden]
    v: torch.Tensor  # [groups * head_dim, hidden]
    o: torch.Tensor  # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor
    gate: torch.Tensor | None  # [ffn, hidden] (silu applied to it); None in a MoE layer
    up: torch.Tensor | None  # [ffn, hidden]
    down: torch.Tensor | None  # [hidden, ffn]
    q_bias: torch.Tensor | None = None  # [heads * head_dim] (model.add_qkv_bias)
    k_bias: torch.Tensor | None = None  # [groups * head_dim]
    v_bias: torch.Tensor | None = None  # [groups * head_dim]
    q_norm: torch.Tensor | None = None  # [head_dim] (model.qk_layernorm)
    k_norm: torch.Tensor | None = None  # [head_dim]
    router: torch.Tensor | None = None  # [experts, hidden] (MoE layer: then gate/up/down are None)
    expert_bias: torch.Tensor | None = None  # [experts] (aux-free routing bias)
    experts: list | None = None  # [(gate [f_e, hidden], up [f_e, hidden], down [hidden, f_e])] per expert
    shared: tuple | None = None  # shared expert's (gate, up, down)


@dataclass
class Weights:
    embed: torch.Tensor  # [rows, hidden]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | None  # [rows, hidden]; None when tied to embed
    layers: list[Layer] = field(default_factory=list)

    def head(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head


def split_qkv(w: torch.Tensor, arch: Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused group-major linear_qkv rows -> (q, k, v) rows (weights or biases)."""
    hd, ng, hpg = arch.head_dim, arch.num_groups, arch.heads_per_group
    expect = ng * (hpg + 2) * hd
    if w.shape[0] != expect:
        raise ConvertError(f"linear_qkv has {w.shape[0]} rows, expected {expect} for {arch.num_heads} heads, "
                           f"{ng} groups of head_dim {hd}")
    g = w.reshape(ng, (hpg + 2) * hd, *w.shape[1:])
    q = g[:, : hpg * hd].reshape(ng * hpg * hd, *w.shape[1:])
    k = g[:, hpg * hd: (hpg + 1) * hd].reshape(ng * hd, *w.shape[1:])
    v = g[:, (hpg + 1) * hd:].reshape(ng * hd, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Arch) -> torch.Tensor:
    """Inverse of ``split_qkv``."""
    hd, ng, hpg = arch.head_dim, arch.num_groups, arch.heads_per_group
    rest = q.shape[1:]
    qg = q.reshape(ng, hpg * hd, *rest)
    kg = k.reshape(ng, hd, *rest)
    vg = v.reshape(ng, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(ng * (hpg + 2) * hd, *rest).contiguous()


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# canonical suffix -> Layer field; both the local-spec and the Transformer-Engine spellings.
_LAYER_FIELDS = {
    "input_layernorm.weight": "attn_norm",
    "self_attention.linear_qkv.layer_norm_weight": "attn_norm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_qkv.bias": "qkv_bias",
    "self_attention.linear_proj.weight": "o",
    "pre_mlp_layernorm.weight": "mlp_norm",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "down",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "mlp.router.weight": "router",
    "mlp.router.expert_bias": "expert_bias",
    "mlp.shared_experts.linear_fc1.weight": "shared_fc1",
    "mlp.shared_experts.linear_fc2.weight": "shared_fc2",
}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


def weights_from_canonical(full: dict[str, torch.Tensor], arch: Arch) -> Weights:
    """Neutral weights of a merged framework state dict (``checkpoint.load_full_state_dict``)."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    top: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in full.items():
        m = _LAYER.match(name)
        if m and m.group(2) in _LAYER_FIELDS:
            per_layer.setdefault(int(m.group(1)), {})[_LAYER_FIELDS[m.group(2)]] = t.float()
        elif m and _EXPERT.match(m.group(2)):
            e = _EXPERT.match(m.group(2))
            per_layer.setdefault(int(m.group(1)), {})[f"expert{e.group(1)}_fc{e.group(2)}"] = t.float()
        elif name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
            top[name] = t.float()
        else:
            unknown.append(name)
    if unknown:
        raise ConvertError(f"checkpoint has parameters this converter does not know ({', '.join(sorted(unknown)[:4])}"
                           f"{', ...' if len(unknown) > 4 else ''}); only the standard transformer "
                           f"(objectives {', '.join(OBJECTIVES_WITH_STANDARD_WEIGHTS)}) can be converted")
    for req in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        if req not in top:
            raise ConvertError(f"checkpoint lacks '{req}'")
    if sorted(per_layer) != list(range(arch.num_layers)):
        raise ConvertError(f"checkpoint holds layers {sorted(per_layer)}, config says num_layers={arch.num_layers}")
    layers = []
    for i in range(arch.num_layers):
        d = per_layer[i]
        moe = bool(arch.moe_layers) and arch.moe_layers[i] == 1
        missing = {"attn_norm", "qkv", "o", "mlp_norm", *(("router",) if moe else ("fc1", "down"))} - set(d)
        if missing:
            raise ConvertError(f"layer {i} lacks {', '.join(sorted(missing))}")
        q, k, v = split_qkv(d["qkv"], arch)
        if ("qkv_bias" in d) != arch.qkv_bias:
            raise ConvertError(f"layer {i} {'lacks' if arch.qkv_bias else 'has'} linear_qkv.bias but the config says "
                               f"model.add_qkv_bias={str(arch.qkv_bias).lower()}")
        qb, kb, vb = split_qkv(d["qkv_bias"], arch) if "qkv_bias" in d else (None, None, None)
        norms = {"q_norm": d.get("q_norm"), "k_norm": d.get("k_norm")}
        if moe:
            layers.append(Layer(attn_norm=d["attn_norm"], q=q, k=k, v=v, o=d["o"], mlp_norm=d["mlp_norm"], gate=None, up=None,
                                down=None, q_bias=qb, k_bias=kb, v_bias=vb, **norms, **_moe_fields(d, arch, i)))
            continue
        if d["fc1"].shape[0] != 2 * arch.ffn_hidden_size:
            raise ConvertError(f"layer {i} linear_fc1 has {d['fc1'].shape[0]} rows, expected 2 x ffn_hidden_size={arch.ffn_hidden_size}")
        gate, up = d["fc1"].chunk(2, dim=0)
        layers.append(Layer(attn_norm=d["attn_norm"], q=q, k=k, v=v, o=d["o"], mlp_norm=d["mlp_norm"],
                            gate=gate.contiguous(), up=up.contiguous(), down=d["down"], q_bias=qb, k_bias=kb, v_bias=vb, **norms))
    embed = top["embedding.word_embeddings.weight"]
    if embed.shape != (arch.padded_vocab_size, arch.hidden_size):
        raise ConvertError(f"embedding has shape {tuple(embed.shape)}, expected ({arch.padded_vocab_size}, {arch.hidden_size})")
    # A tied model trained with PP > 1 also carries the last stage's copy of the embedding.
    head = None if arch.tied else top.get("output_layer.weight")
    if not arch.tied and head is None:
        raise ConvertError("checkpoint lacks 'output_layer.weight' (untied output head)")
    return Weights(embed=embed, final_norm=top["decoder.final_layernorm.weight"], lm_head=head, layers=layers)


def _moe_fields(d: dict, arch: Arch, i: int) -> dict:
    """A MoE layer's router, experts' (gate, up, down) and shared expert from canonical tensors."""
    experts = []
    for e in range(arch.num_experts):
        if f"expert{e}_fc1" not in d or f"expert{e}_fc2" not in d:
            raise ConvertError(f"layer {i} lacks expert {e} (model.num_moe_experts={arch.num_experts})")
        gate, up = d[f"expert{e}_fc1"].chunk(2, dim=0)
        experts.append((gate.contiguous(), up.contiguous(), d[f"expert{e}_fc2"]))
    shared = None
    if "shared_fc1" in d:
        g, u = d["shared_fc1"].chunk(2, dim=0)
        shared = (g.contiguous(), u.contiguous(), d["shared_fc2"])
    return {"router": d["router"], "expert_bias": d.get("expert_bias"), "experts": experts, "shared": shared}


def canonical_from_weights(w: Weights, arch: Arch) -> dict[str, torch.Tensor]:
    """Inverse of ``weights_from_canonical`` (local-spec names, full tensors)."""
    out = {"embedding.word_embeddings.weight": w.embed}
    for i, L in enumerate(w.layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = L.attn_norm
        out[p + "self_attention.linear_qkv.weight"] = fuse_qkv(L.q, L.k, L.v, arch)
        if L.q_bias is not None:
            out[p + "self_attention.linear_qkv.bias"] = fuse_qkv(L.q_bias, L.k_bias, L.v_bias, arch)
        out[p + "self_attention.linear_proj.weight"] = L.o
        out[p + "pre_mlp_layernorm.weight"] = L.mlp_norm
        if L.q_norm is not None:
            out[p + "self_attention.q_layernorm.weight"] = L.q_norm
            out[p + "self_attention.k_layernorm.weight"] = L.k_norm
        if L.router is None:
            out[p + "mlp.linear_fc1.weight"] = torch.cat([L.gate, L.up], dim=0).contiguous()
            out[p + "mlp.linear_fc2.weight"] = L.down
            continue
        out[p + "mlp.router.weight"] = L.router
        if L.expert_bias is not None:
            out[p + "mlp.router.expert_bias"] = L.expert_bias
        for e, (g, u, dn) in enumerate(L.experts):
            out[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat([g, u], dim=0).contiguous()
            out[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = dn
        if L.shared is not None:
            out[p + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(L.shared[:2], dim=0).contiguous()
            out[p + "mlp.shared_experts.linear_fc2.weight"] = L.shared[2]
    out["decoder.final_layernorm.weight"] = w.final_norm
    if w.lm_head is not None:
        out["output_layer.weight"] = w.lm_head
    return out


# ---------------------------------------------------------------------------------------
# Reading framework checkpoints


@dataclass
class Source:
    """A framework checkpoint opened for export."""

    path: Path
    meta: dict
    arch: Arch
    weights: Weights
    tokenizer_file: Path


def open_checkpoint(ckpt: str | Path, *, show_progress: bool = True) -> Source:
    """Resolve ``--ckpt``, merge its shards, check its tokenizer, return neutral weights."""
    from .. import checkpoint as ck
    from ..data.tokenizer import load_tokenizer, resolve_tokenizer_path

    path = ck.resolve(ckpt)
    meta = ck.read_meta(path)
    arch = arch_from_meta(meta)
    if arch.objective not in OBJECTIVES_WITH_STANDARD_WEIGHTS:
        raise ConvertError(f"diffusion.objective={arch.objective!r} checkpoints cannot be exported "
                           f"(supported: {', '.join(OBJECTIVES_WITH_STANDARD_WEIGHTS)})")
    n_files = meta["layout"]["pp"] * meta["layout"]["tp"]
    with progress_bar(n_files, desc="reading shards", enabled=show_progress, unit="file") as bar:
        full = ck.load_full_state_dict(path, progress=lambda _name: bar.update())
    weights = weights_from_canonical(full, arch)
    tok_spec = meta["config"]["data"]["tokenizer"]
    tok_file = resolve_tokenizer_path(tok_spec)
    tok = load_tokenizer(tok_spec)
    if tok.sha256 != meta.get("tokenizer_sha256"):
        raise ConvertError(f"tokenizer {tok_file} (sha {tok.sha256[:12]}) is not the one this checkpoint was trained "
                           f"with (sha {str(meta.get('tokenizer_sha256'))[:12]})")
    return Source(path=path, meta=meta, arch=arch, weights=weights, tokenizer_file=tok_file)


def special_ids(tokenizer_file: Path) -> dict[str, int]:
    """ids of the framework's special tokens (eot/mask/pad) in a tokenizer file."""
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    return {"eot": tok.eot_id, "mask": tok.mask_id, "pad": tok.pad_id, "vocab": tok.vocab_size}


# ---------------------------------------------------------------------------------------
# Output folders


def check_output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """Fail early (before any reading) if ``path`` cannot become the output folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConvertError(f"--output {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise ConvertError(f"--output {p} is not empty (pass --overwrite to replace its contents)")
    return p


def prepare_output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """An empty folder to write into (refuses a non-empty one unless ``overwrite``)."""
    p = check_output_dir(path, overwrite=overwrite)
    if p.is_dir() and any(p.iterdir()):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
