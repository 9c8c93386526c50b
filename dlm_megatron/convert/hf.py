"""Hugging Face conversion.

Export (``export_hf``): a folder loadable with
``AutoModel.from_pretrained(dir, trust_remote_code=True)``: ``config.json`` (LLaDA's key
names plus ours), weights in LLaDA's parameter layout (``model.transformer.*``), the
modeling code from ``hf_template/`` and the tokenizer. Export (``export_hf_llama``): the
standard ``LlamaForCausalLM`` layout for causal (``diffusion.objective=ar``) checkpoints,
or ``Qwen2ForCausalLM`` when the checkpoint has q/k/v biases (``model.add_qkv_bias``; a
Llama config cannot express biases on q/k/v only).

Import (``import_hf``): Llama-, Qwen2- and Qwen3-MoE-style safetensors checkpoints (config.json +
model.safetensors[.index.json]) into a framework checkpoint (weights only, ``engine:
null``) of any TP/PP layout. q/k/v biases (Qwen2; Llama with ``attention_bias``) set
``model.add_qkv_bias``; an output-projection bias must be zero (the framework has none).

Shape legend: V vocabulary, Vp padded vocabulary (embedding rows), H hidden size.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import (Arch, ConvertError, Layer, Weights, canonical_from_weights, check_output_dir, open_checkpoint, prepare_output_dir,
               special_ids, track, write_json)

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
MODELING_FILES = ("configuration_dlm.py", "modeling_dlm.py")
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------
# Writing safetensors folders


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (GB = 10^9 as in transformers, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise ConvertError(f"--max-shard-size must be positive, got {text!r}")
    return size


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, *, max_shard_bytes: int, show_progress: bool = True) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_bytes``. Tensors keep
    their order; a tensor larger than the limit gets a shard of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for fname, names in track(list(zip(files, groups)), desc="writing safetensors", total=len(files), enabled=show_progress):
        save_file({n: tensors[n].contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
        _readable(out / fname)
        weight_map.update({n: fname for n in names})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _readable(path: Path) -> None:
    """safetensors creates files 0600; exports are meant to be shared: apply the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_tokenizer_files(tokenizer_file: Path, out: Path, *, model_max_length: int) -> dict[str, int]:
    """tokenizer.json (the checkpoint's, byte for byte) + tokenizer_config.json + special_tokens_map.json."""
    from ..data.tokenizer import EOT_TOKEN, MASK_TOKEN, PAD_TOKEN

    ids = special_ids(tokenizer_file)
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    special = {"eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN}
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    })
    write_json(out / "special_tokens_map.json", special)
    return ids


# ---------------------------------------------------------------------------------------
# Export: LLaDA layout + our modeling code


def llada_state_dict(w: Weights, arch: Arch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Neutral weights -> LLaDA's parameter names (all embedding rows kept: embedding_size)."""
    p = "model.transformer."
    out = {p + "wte.weight": w.embed}
    for i, L in enumerate(w.layers):
        b = f"{p}blocks.{i}."
        out.update({b + "attn_norm.weight": L.attn_norm, b + "q_proj.weight": L.q, b + "k_proj.weight": L.k,
                    b + "v_proj.weight": L.v, b + "attn_out.weight": L.o, b + "ff_norm.weight": L.mlp_norm})
        if L.q_norm is not None:
            out.update({b + "q_norm.weight": L.q_norm, b + "k_norm.weight": L.k_norm})
        if L.router is None:
            out.update({b + "ff_proj.weight": L.gate, b + "up_proj.weight": L.up, b + "ff_out.weight": L.down})
        else:  # MoE layer: router, experts.{e}.*, shared_expert.*
            out[b + "moe.gate.weight"] = L.router
            if L.expert_bias is not None:
                out[b + "moe.gate.expert_bias"] = L.expert_bias
            experts = list(enumerate(L.experts)) + ([("shared", L.shared)] if L.shared is not None else [])
            for e, (g, u, dn) in experts:
                m = f"{b}moe.{'shared_expert' if e == 'shared' else f'experts.{e}'}."
                out.update({m + "ff_proj.weight": g, m + "up_proj.weight": u, m + "ff_out.weight": dn})
        if L.q_bias is not None:
            out.update({b + "q_proj.bias": L.q_bias, b + "k_proj.bias": L.k_bias, b + "v_proj.bias": L.v_bias})
    out[p + "ln_f.weight"] = w.final_norm
    if w.lm_head is not None:
        out[p + "ff_out.weight"] = w.lm_head
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def llada_config(arch: Arch, ids: dict[str, int], dtype_name: str, meta: dict) -> dict:
    cfg = {
        "architectures": ["DLMModelLM"],
        "model_type": "dlm_megatron",
        "auto_map": {
            "AutoConfig": "configuration_dlm.DLMConfig",
            "AutoModel": "modeling_dlm.DLMModelLM",
            "AutoModelForMaskedLM": "modeling_dlm.DLMModelLM",
        },
        # LLaDA's key names (configuration_llada.py), same meaning.
        "d_model": arch.hidden_size,
        "n_heads": arch.num_heads,
        "n_kv_heads": arch.num_groups,
        "head_dim": arch.head_dim,
        "n_layers": arch.num_layers,
        "mlp_hidden_size": arch.ffn_hidden_size,
        "vocab_size": arch.vocab_size,
        "embedding_size": arch.padded_vocab_size,
        "max_sequence_length": arch.seq_len,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.norm_eps,
        "weight_tying": arch.tied,
        "include_bias": False,
        "include_qkv_bias": arch.qkv_bias,
        "init_std": arch.init_std,
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "rope": True,
        "alibi": False,
        "mask_token_id": ids["mask"],
        "eos_token_id": ids["eot"],
        "pad_token_id": ids["pad"],
        # Ours.
        "objective": arch.objective,
        "shift_logits": arch.shift_logits,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "dlm_megatron": {"step": meta.get("step"), "tokenizer_sha256": meta.get("tokenizer_sha256")},
    }
    if arch.block_size is not None:
        cfg["block_size"] = arch.block_size
    if arch.qk_norm:
        cfg["qk_norm"] = True
    if arch.num_experts:
        cfg.update({"moe_num_experts": arch.num_experts, "moe_top_k": arch.moe_topk,
                    "moe_intermediate_size": arch.moe_ffn_hidden_size,
                    "moe_shared_expert_intermediate_size": arch.moe_shared_ffn_hidden_size,
                    "moe_layers": list(arch.moe_layers), "moe_pre_softmax": arch.moe_pre_softmax,
                    "moe_score_function": arch.moe_score_function, "moe_expert_bias": arch.moe_expert_bias})
    return cfg


def export_hf(ckpt: str | Path, output: str | Path, *, dtype: str = "float32", max_shard_size: str | int = "5GB",
              overwrite: bool = False, show_progress: bool = True) -> Path:
    """Framework checkpoint -> HF folder with our modeling code (LLaDA layout)."""
    if dtype not in HF_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not valid for HF exports (use {', '.join(HF_DTYPES)})")
    max_bytes = parse_size(max_shard_size)
    check_output_dir(output, overwrite=overwrite)
    src = open_checkpoint(ckpt, show_progress=show_progress)
    out = prepare_output_dir(output, overwrite=overwrite)
    tensors = llada_state_dict(src.weights, src.arch, HF_DTYPES[dtype])
    save_sharded(tensors, out, max_shard_bytes=max_bytes, show_progress=show_progress)
    ids = write_tokenizer_files(src.tokenizer_file, out, model_max_length=src.arch.seq_len)
    write_json(out / "config.json", llada_config(src.arch, ids, dtype, src.meta))
    for f in MODELING_FILES:
        shutil.copyfile(TEMPLATE_DIR / f, out / f)
    write_json(out / "generation_config.json", {"_from_model_config": True, "eos_token_id": ids["eot"], "pad_token_id": ids["pad"]})
    return out


# ---------------------------------------------------------------------------------------
# Export: standard LlamaForCausalLM layout (causal checkpoints)


def llama_state_dict(w: Weights, arch: Arch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Neutral weights -> transformers' Llama names; vocabulary rows cut to vocab_size."""
    V = arch.vocab_size
    out = {"model.embed_tokens.weight": w.embed[:V]}
    for i, L in enumerate(w.layers):
        b = f"model.layers.{i}."
        out.update({b + "input_layernorm.weight": L.attn_norm, b + "self_attn.q_proj.weight": L.q,
                    b + "self_attn.k_proj.weight": L.k, b + "self_attn.v_proj.weight": L.v,
                    b + "self_attn.o_proj.weight": L.o, b + "post_attention_layernorm.weight": L.mlp_norm,
                    b + "mlp.gate_proj.weight": L.gate, b + "mlp.up_proj.weight": L.up, b + "mlp.down_proj.weight": L.down})
        if L.q_bias is not None:
            out.update({b + "self_attn.q_proj.bias": L.q_bias, b + "self_attn.k_proj.bias": L.k_bias,
                        b + "self_attn.v_proj.bias": L.v_bias})
    out["model.norm.weight"] = w.final_norm
    if w.lm_head is not None:
        out["lm_head.weight"] = w.lm_head[:V]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def causal_model_type(arch: Arch) -> str:
    """transformers model_type of a causal export: Qwen2 has q/k/v-only biases, Llama none."""
    return "qwen2" if arch.qkv_bias else "llama"


def llama_config(arch: Arch, ids: dict[str, int], dtype_name: str, source_config: dict | None) -> dict:
    """A LlamaForCausalLM (or, with q/k/v biases, Qwen2ForCausalLM) config.json; the imported
    model's own config when it came from one of that type."""
    mt = causal_model_type(arch)
    same = bool(source_config) and source_config.get("model_type") == mt
    cfg = dict(source_config) if same else {}
    cfg.update({
        "architectures": ["Qwen2ForCausalLM" if mt == "qwen2" else "LlamaForCausalLM"],
        "model_type": mt,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_groups,
        "num_hidden_layers": arch.num_layers,
        "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tied,
        "hidden_act": "silu",
    })
    if mt == "llama":
        cfg.update({"head_dim": arch.head_dim, "attention_bias": False, "mlp_bias": False})
    else:  # Qwen2 reads head_dim when present, else hidden_size / heads: written only when needed
        if "head_dim" in cfg or arch.head_dim * arch.num_heads != arch.hidden_size:
            cfg["head_dim"] = arch.head_dim
        cfg.setdefault("use_sliding_window", False)
    if not same:
        cfg.update({"max_position_embeddings": arch.seq_len, "bos_token_id": ids["eot"], "eos_token_id": ids["eot"],
                    "pad_token_id": ids["pad"], "initializer_range": arch.init_std})
    # transformers 5 reads rope_parameters, 4.x reads rope_theta.
    cfg["rope_parameters"] = {**(cfg.get("rope_parameters") or {}), "rope_theta": arch.rope_theta, "rope_type": "default"}
    if "rope_theta" in cfg or not same:
        cfg["rope_theta"] = arch.rope_theta
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype_name
    return cfg


def export_hf_llama(ckpt: str | Path, output: str | Path, *, dtype: str = "auto", max_shard_size: str | int = "5GB",
                    overwrite: bool = False, show_progress: bool = True) -> Path:
    """Causal framework checkpoint -> transformers LlamaForCausalLM folder.

    dtype 'auto' restores the dtype of an imported HF checkpoint (so HF -> framework -> HF is
    bit-exact), else float32."""
    max_bytes = parse_size(max_shard_size)
    check_output_dir(output, overwrite=overwrite)
    src = open_checkpoint(ckpt, show_progress=show_progress)
    if src.arch.num_experts or src.arch.qk_norm:
        raise ConvertError("--to hf-llama writes a dense Llama/Qwen2 model without q/k norms; this checkpoint has "
                           "model.num_moe_experts or model.qk_layernorm: use --to hf")
    if src.arch.objective != "ar" or src.arch.shift_logits:
        raise ConvertError(f"--to hf-llama writes a causal LM, but this checkpoint is diffusion.objective={src.arch.objective!r}"
                           f"{' with shift_logits' if src.arch.shift_logits else ''}; use --to hf (bidirectional denoiser)")
    source = src.meta.get("source") or {}
    if dtype == "auto":
        dtype = source.get("dtype") if source.get("dtype") in HF_DTYPES else "float32"
    if dtype not in HF_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not valid for HF exports (use auto, {', '.join(HF_DTYPES)})")
    out = prepare_output_dir(output, overwrite=overwrite)
    tensors = llama_state_dict(src.weights, src.arch, HF_DTYPES[dtype])
    save_sharded(tensors, out, max_shard_bytes=max_bytes, show_progress=show_progress)
    ids = write_tokenizer_files(src.tokenizer_file, out, model_max_length=src.arch.seq_len)
    write_json(out / "config.json", llama_config(src.arch, ids, dtype, source.get("hf_config")))
    return out


# ---------------------------------------------------------------------------------------
# Import: Llama / Qwen2 safetensors -> framework checkpoint


SUPPORTED_IMPORT = ("llama", "qwen2", "mistral", "qwen3_moe")


def read_hf_config(hf_dir: Path) -> dict:
    f = hf_dir / "config.json"
    if not f.is_file():
        raise ConvertError(f"{hf_dir} has no config.json (expected a Hugging Face model folder)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{f} is not valid JSON ({e})") from None
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        raise ConvertError(f"{hf_dir} is a multimodal model ({cfg.get('model_type')}); only text-only models can be imported ({', '.join(SUPPORTED_IMPORT)})")
    return cfg


def hf_tensor_index(hf_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file (model.safetensors or the sharded index)."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ConvertError(f"{index} is not a safetensors index (no weight_map)") from None
        files = {n: hf_dir / f for n, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise ConvertError(f"{index} names {f.name}, which is missing")
        return files
    if single.is_file():
        with safe_open(str(single), framework="pt") as fh:
            return {n: single for n in fh.keys()}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise ConvertError(f"{hf_dir} holds PyTorch pickle weights; only safetensors checkpoints are imported "
                           f"(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise ConvertError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling")
    rope_type = (rp.get("rope_type") or rp.get("type") or "default") if rp else "default"
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        rope_type = rs.get("rope_type") or rs.get("type")
    if rope_type != "default":
        raise ConvertError(f"rope scaling {rope_type!r} is not supported (the framework uses plain RoPE)")
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def arch_from_hf(cfg: dict) -> tuple[Arch, dict]:
    """Check an HF config against what the framework's transformer can express."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_IMPORT:
        raise ConvertError(f"model_type {mt!r} is not supported for import (supported: {', '.join(SUPPORTED_IMPORT)})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"hidden_act {act!r} is not supported (the framework's MLP is SwiGLU)")
    if mt in ("qwen2", "mistral") and cfg.get("use_sliding_window", mt == "mistral" and cfg.get("sliding_window")):
        raise ConvertError("sliding-window attention is not supported")
    if cfg.get("mlp_bias"):
        raise ConvertError("mlp_bias=true is not supported (the framework's layers have no biases)")
    try:
        H, nh, L = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        ffn, V = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise ConvertError(f"config.json lacks {e.args[0]!r}") from None
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or H // nh)  # heads x head_dim may differ from hidden_size (model.kv_channels)
    if nh % nkv:
        raise ConvertError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    theta = _rope_theta(cfg)
    moe = _moe_from_hf(cfg, L) if mt == "qwen3_moe" else {}
    arch = Arch(num_layers=L, hidden_size=H, num_heads=nh, num_groups=nkv, head_dim=hd, ffn_hidden_size=ffn,
                vocab_size=V, padded_vocab_size=V, rope_theta=theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tied=bool(cfg.get("tie_word_embeddings", False)), objective="ar", block_size=None, shift_logits=False,
                seq_len=int(cfg.get("max_position_embeddings", 2048)), init_std=float(cfg.get("initializer_range", 0.02)),
                **moe)
    return arch, {"model_type": mt}


def _moe_from_hf(cfg: dict, num_layers: int) -> dict:
    """Arch fields of a Qwen3-MoE config: per-head q/k RMSNorm, softmax routing over all experts
    with the top-k renormalised iff norm_topk_prob (megatron-core: moe_router_pre_softmax =
    not norm_topk_prob), MoE in every layer, no shared expert."""
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConvertError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not supported: "
                           "the framework's dense layers come first (model.moe_first_k_dense) or every n-th")
    if cfg.get("attention_bias"):
        raise ConvertError("attention_bias=true is not supported for Qwen3-MoE import")
    E = int(cfg.get("num_experts") or cfg["num_local_experts"])  # transformers 5 writes num_local_experts
    return {"qk_norm": True, "num_experts": E, "moe_topk": int(cfg["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(cfg["moe_intermediate_size"]), "moe_layers": (1,) * num_layers,
            "moe_pre_softmax": not bool(cfg.get("norm_topk_prob", False)), "moe_score_function": "softmax"}


def _hf_dtype_name(cfg: dict, first: torch.Tensor) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name in HF_DTYPES:
        return name
    return {v: k for k, v in HF_DTYPES.items()}.get(first.dtype, "float32")


def load_hf_weights(hf_dir: Path, arch: Arch, model_type: str, *, show_progress: bool = True) -> tuple[Weights, str]:
    """Read Llama-layout tensors into neutral fp32 weights (and the checkpoint's dtype name)."""
    files = hf_tensor_index(hf_dir)
    handles: dict[Path, object] = {}

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        f = files.get(name)
        if f is None:
            if required:
                raise ConvertError(f"{hf_dir} lacks tensor '{name}'")
            return None
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != shape:
            raise ConvertError(f"tensor '{name}' has shape {tuple(t.shape)}, config implies {shape}")
        used.add(name)
        return t

    H, hd = arch.hidden_size, arch.head_dim
    embed = take("model.embed_tokens.weight", (arch.vocab_size, H))
    dtype_name = _hf_dtype_name(read_hf_config(hf_dir), embed)
    # q/k/v biases (Qwen2; Llama with attention_bias) become model.add_qkv_bias: all or none.
    arch.qkv_bias = "model.layers.0.self_attn.q_proj.bias" in files
    bias_rows = {"q_proj": arch.num_heads * hd, "k_proj": arch.num_groups * hd, "v_proj": arch.num_groups * hd}
    layers = []
    for i in track(range(arch.num_layers), desc="reading layers", total=arch.num_layers, enabled=show_progress):
        b = f"model.layers.{i}."
        biases = {}
        for proj, rows in bias_rows.items():
            name = f"{b}self_attn.{proj}.bias"
            if arch.qkv_bias:
                biases[proj] = take(name, (rows,)).float()
            elif name in files:
                raise ConvertError(f"{hf_dir} has '{name}' but layer 0 has no q_proj bias; q/k/v biases must be on every layer or none")
        o_bias = get(f"{b}self_attn.o_proj.bias", required=False)
        if o_bias is not None:  # Llama's attention_bias=True also adds one to the output projection
            used.add(f"{b}self_attn.o_proj.bias")
            if bool(o_bias.float().abs().max() > 0):
                raise ConvertError(f"{model_type} checkpoint has a nonzero output-projection bias '{b}self_attn.o_proj.bias'; "
                                   f"the framework has biases only on q/k/v (model.add_qkv_bias), so it cannot be imported exactly")
        attn = dict(
            attn_norm=take(b + "input_layernorm.weight", (H,)).float(),
            q=take(b + "self_attn.q_proj.weight", (arch.num_heads * hd, H)).float(),
            k=take(b + "self_attn.k_proj.weight", (arch.num_groups * hd, H)).float(),
            v=take(b + "self_attn.v_proj.weight", (arch.num_groups * hd, H)).float(),
            o=take(b + "self_attn.o_proj.weight", (H, arch.num_heads * hd)).float(),
            mlp_norm=take(b + "post_attention_layernorm.weight", (H,)).float(),
        )
        if arch.num_experts:
            layers.append(Layer(**attn, gate=None, up=None, down=None,
                                q_norm=take(b + "self_attn.q_norm.weight", (hd,)).float(),
                                k_norm=take(b + "self_attn.k_norm.weight", (hd,)).float(),
                                **_hf_experts(take, b, arch)))
            continue
        layers.append(Layer(
            **attn,
            gate=take(b + "mlp.gate_proj.weight", (arch.ffn_hidden_size, H)).float(),
            up=take(b + "mlp.up_proj.weight", (arch.ffn_hidden_size, H)).float(),
            down=take(b + "mlp.down_proj.weight", (H, arch.ffn_hidden_size)).float(),
            q_bias=biases.get("q_proj"), k_bias=biases.get("k_proj"), v_bias=biases.get("v_proj"),
        ))
    final_norm = take("model.norm.weight", (H,)).float()
    head = None
    if not arch.tied:
        head = take("lm_head.weight", (arch.vocab_size, H)).float()
    elif "lm_head.weight" in files:  # some tied checkpoints store the copy anyway
        used.add("lm_head.weight")
    leftover = sorted(n for n in files if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ConvertError(f"{hf_dir} has tensors the importer does not understand: {', '.join(leftover[:4])}"
                           f"{', ...' if len(leftover) > 4 else ''}")
    return Weights(embed=embed.float(), final_norm=final_norm, lm_head=head, layers=layers), dtype_name


def _hf_experts(take, b: str, arch: Arch) -> dict:
    """A Qwen3-MoE layer's router (``mlp.gate``) and experts (``mlp.experts.{e}.*_proj``)."""
    H, f = arch.hidden_size, arch.moe_ffn_hidden_size
    experts = [(take(f"{b}mlp.experts.{e}.gate_proj.weight", (f, H)).float(),
                take(f"{b}mlp.experts.{e}.up_proj.weight", (f, H)).float(),
                take(f"{b}mlp.experts.{e}.down_proj.weight", (H, f)).float()) for e in range(arch.num_experts)]
    return {"router": take(b + "mlp.gate.weight", (arch.num_experts, H)).float(), "experts": experts}


def _tokenizer_for_import(hf_dir: Path, tokenizer: str | None, out: Path) -> tuple[Path, list[str]]:
    """Copy the tokenizer into the output; append the framework's special tokens if missing."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..data.tokenizer import SPECIAL_TOKENS

    src = Path(tokenizer) if tokenizer else hf_dir / "tokenizer.json"
    if not src.is_file():
        raise ConvertError(f"no tokenizer: {src} does not exist (pass --tokenizer FILE, a HF tokenizer.json)")
    try:
        tok = HFTokenizer.from_file(str(src))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise ConvertError(f"{src} is not a HF tokenizers JSON file ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    dst = out / "tokenizer.json"
    if missing:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.save(str(dst))
    else:
        shutil.copyfile(src, dst)
    return dst, missing


def import_hf(hf_dir: str | Path, output: str | Path, *, tp: int = 1, pp: int = 1, tokenizer: str | None = None,
              objective: str = "ar", seq_len: int | None = None, overwrite: bool = False, show_progress: bool = True) -> Path:
    """HF Llama/Qwen2 folder -> framework run directory whose latest checkpoint (step 0,
    ``engine: null``) holds the weights in a TP x PP layout. Returns the checkpoint folder.

    The config is derived from the HF config; train from it with
    ``train.init_from=OUTPUT`` (or ``train.output_dir=OUTPUT`` to continue in place)."""
    from ..config import Config, ConfigError, from_dict, to_dict
    from ..data.tokenizer import load_tokenizer
    from .reshard import write_layout

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"--from-hf {hf_dir} is not a directory")
    check_output_dir(output, overwrite=overwrite)
    hf_cfg = read_hf_config(hf_dir)
    arch, info = arch_from_hf(hf_cfg)
    weights, dtype_name = load_hf_weights(hf_dir, arch, info["model_type"], show_progress=show_progress)
    out = prepare_output_dir(output, overwrite=overwrite)
    tok_file, added = _tokenizer_for_import(hf_dir, tokenizer, out)
    tok = load_tokenizer(tok_file.resolve())

    vocab = max(arch.vocab_size, tok.vocab_size)
    if vocab > arch.vocab_size:
        # New special tokens (e.g. <|mask|>) get embedding/head rows at the mean of the others.
        extra = vocab - arch.vocab_size
        weights.embed = torch.cat([weights.embed, weights.embed.mean(0, keepdim=True).expand(extra, -1)])
        if weights.lm_head is not None:
            weights.lm_head = torch.cat([weights.lm_head, weights.lm_head.mean(0, keepdim=True).expand(extra, -1)])
        arch.vocab_size = vocab

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = arch.num_layers, arch.hidden_size, arch.num_heads
    m.num_query_groups = arch.num_groups if arch.num_groups != arch.num_heads else None
    m.kv_channels = arch.head_dim if arch.head_dim * arch.num_heads != arch.hidden_size else None
    m.ffn_hidden_size, m.vocab_size = arch.ffn_hidden_size, vocab
    if float(arch.rope_theta) != int(arch.rope_theta):
        raise ConvertError(f"rope_theta={arch.rope_theta} is not an integer (model.rotary_base is an integer)")
    m.rotary_base, m.norm_epsilon, m.tie_embeddings = int(arch.rope_theta), arch.norm_eps, arch.tied
    m.init_method_std = arch.init_std
    m.add_qkv_bias = arch.qkv_bias
    if arch.num_experts:
        m.qk_layernorm, m.num_moe_experts, m.moe_router_topk = True, arch.num_experts, arch.moe_topk
        m.moe_ffn_hidden_size, m.moe_router_pre_softmax = arch.moe_ffn_hidden_size, arch.moe_pre_softmax
        m.moe_aux_loss_coeff = float(hf_cfg.get("router_aux_loss_coef", 0.0))
    cfg.diffusion.objective = objective
    cfg.data.tokenizer = str(tok_file.resolve())
    cfg.data.seq_len = int(seq_len or min(arch.seq_len, 4096))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.train.output_dir = str(out.resolve())
    try:
        cfg = from_dict(to_dict(cfg))
    except ConfigError as e:
        raise ConvertError(f"the imported model does not fit the requested layout: {e}") from None
    from ..config import padded_vocab_size

    rows = padded_vocab_size(vocab, cfg.model, 1)
    weights.embed = _pad_rows(weights.embed, rows)
    if weights.lm_head is not None:
        weights.lm_head = _pad_rows(weights.lm_head, rows)
    arch.padded_vocab_size = rows
    full = canonical_from_weights(weights, arch)
    meta = {
        "config": to_dict(cfg),
        "layout": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": 0},
        "tokenizer_sha256": tok.sha256,
        "vocab_size": vocab,
        "consumed_samples": 0,
        "engine": None,
        "source": {"format": f"hf-{info['model_type']}", "path": str(hf_dir.resolve()), "dtype": dtype_name,
                   "hf_config": hf_cfg, "added_special_tokens": added},
    }
    return write_layout(full, meta, out, step=0, show_progress=show_progress)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
