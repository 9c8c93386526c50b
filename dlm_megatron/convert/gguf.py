"""GGUF export for llama.cpp's ``llada`` architecture (masked / block diffusion denoisers),
or its ``dream`` architecture for checkpoints with q/k/v biases (``model.add_qkv_bias``,
e.g. adapted from Qwen2): ``llada`` has no bias tensors, ``dream`` (Qwen2-based) requires them.
Mixture-of-experts checkpoints become ``llada-moe`` (LLaDA-MoE's layout: per-head q/k norms
``attn_{q,k}_norm``, router ``ffn_gate_inp``, stacked experts ``ffn_{gate,up,down}_exps``,
NEOX rope, softmax routing without top-k renormalisation; ``check_llada_moe`` refuses the
rest).

Written with the ``gguf`` PyPI package (the writer llama.cpp's own converters use). What
llama.cpp's ``llada`` loader needs and gets here:

- hyper-parameters under ``llada.*`` (context/embedding/feed-forward length, block count,
  head counts, RoPE base and dimension, RMSNorm epsilon, vocab size),
  ``llada.attention.causal = false`` and ``llada.diffusion.shift_logits`` (false unless the
  checkpoint was trained with diffusion.shift_logits);
- tensors ``token_embd``, ``blk.{i}.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
  ffn_gate,ffn_up,ffn_down}``, ``output_norm``, ``output`` (omitted when the embedding is
  tied: llama.cpp then reuses token_embd). Vocabulary rows are cut to the real vocabulary;
- the tokenizer embedded as a GPT-2 style BPE (``tokenizer.ggml.model = gpt2``): token
  strings, types (special tokens CONTROL), merges, pre-tokenizer name, EOS/PAD/MASK ids;
- Q and K rows permuted per head from megatron's rotate-half RoPE layout (dims i and
  i + d/2 rotate together) to the interleaved pairs (2i, 2i+1) that llama.cpp's NORM rope
  rotates: row order [0, d/2, 1, d/2+1, ...], which is what llama.cpp's converter does to
  Llama-layout HF weights.

For ``dream`` the hyper-parameters live under ``dream.*``, the tensors additionally include
``blk.{i}.attn_{q,k,v}.bias``, and Q/K rows keep the rotate-half order: llama.cpp applies
its NEOX rope (dims i and i + d/2 rotate together) to Qwen2-family models.

Also stored, for our own tools: ``dlm_megatron.objective`` and ``dlm_megatron.block_size``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from . import Arch, ConvertError, Weights, open_checkpoint, special_ids

DTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_arch(arch: Arch) -> str:
    """llama.cpp architecture of an export: ``llada-moe`` for mixture-of-experts checkpoints,
    ``dream`` when q/k/v have biases, else ``llada``."""
    if arch.num_experts:
        return "llada-moe"
    return "dream" if arch.qkv_bias else "llada"


def check_head_width(arch: Arch) -> None:
    """Heads wider (or narrower) than hidden / heads (model.kv_channels): llama.cpp's ``llada``
    graph sizes q and the output projection as heads x attention.key_length, but its ``dream``
    and ``llada-moe`` graphs (llama-cpp-python 0.3.36, the pinned build) create attn_q and
    attn_output as n_embd x n_embd and refuse the file. Refused here in one line instead."""
    q = arch.num_heads * arch.head_dim
    if q != arch.hidden_size and gguf_arch(arch) != "llada":
        raise ConvertError(f"llama.cpp's {gguf_arch(arch)} graph needs heads x head width = hidden size, but this checkpoint "
                           f"has {arch.num_heads} x {arch.head_dim} = {q} != {arch.hidden_size} (model.kv_channels); "
                           f"export it with --to hf")


def check_llada_moe(arch: Arch) -> None:
    """Refuse, in one line, what llama.cpp's ``llada-moe`` graph (src/models/llada-moe.cpp)
    cannot compute: it has per-head q/k RMSNorm, a MoE MLP in every layer, no shared expert,
    no biases, and softmax over all experts whose top-k weights are used as they are."""
    problems = [
        (arch.moe_shared_ffn_hidden_size > 0, "a shared expert (model.moe_shared_expert_intermediate_size=0)"),
        (arch.moe_score_function != "softmax", "sigmoid routing (model.moe_router_score_function=softmax)"),
        (arch.moe_expert_bias, "an expert bias (model.moe_router_enable_expert_bias=false)"),
        (0 in arch.moe_layers, "dense layers between MoE layers (model.moe_first_k_dense=0, model.moe_layer_freq=1)"),
        (not arch.moe_pre_softmax, "top-k renormalised routing weights (model.moe_router_pre_softmax=true)"),
        (not arch.qk_norm, "attention without q/k norms (model.qk_layernorm=true)"),
        (arch.qkv_bias, "q/k/v biases (model.add_qkv_bias=false)"),
    ]
    bad = [what for cond, what in problems if cond]
    if bad:
        raise ConvertError(f"llama.cpp's llada-moe architecture cannot express {bad[0]}; export with --to hf instead")

# Split regexes of known HF pre-tokenizers -> llama.cpp pre-tokenizer names.
_KNOWN_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order -> llama.cpp's interleaved pair order, per head.

    [heads * d, in]: within each head, row j of the first half and row j of the second half
    (a rotate-half pair) become adjacent rows 2j, 2j+1."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ---------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer_name(pre) -> str | None:
    """llama.cpp pre-tokenizer name for a tokenizers ``pre_tokenizer`` JSON, or None if unknown."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        splits = [p for p in items if p.get("type") == "Split"]
        rest = [p for p in items if p.get("type") != "Split"]
        if len(splits) == 1 and all(p.get("type") == "ByteLevel" and not p.get("use_regex", True) for p in rest):
            regex = splits[0].get("pattern", {}).get("Regex")
            return _KNOWN_SPLIT_REGEXES.get(regex)
        if not splits and len(rest) == 1:
            return _pre_tokenizer_name(rest[0])
    return None


def tokenizer_vocab(tokenizer_file: Path, vocab_size: int, pre_override: str | None = None):
    """(tokens, types, merges, pre) of a byte-level BPE tokenizer.json, padded to vocab_size."""
    import gguf

    data = json.loads(Path(tokenizer_file).read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ConvertError(f"GGUF export needs a BPE tokenizer; {tokenizer_file} is {model.get('type')!r}")
    pre = pre_override or _pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise ConvertError(f"cannot tell llama.cpp's pre-tokenizer for {tokenizer_file} "
                           f"(pass --tokenizer-pre NAME, e.g. gpt-2, llama-bpe, qwen2)")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    ttype: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    for a in data.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        ttype[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ConvertError(f"tokenizer has id {max(by_id)} but the model has only {vocab_size} vocabulary rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(ttype[i]))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


# ---------------------------------------------------------------------------------------
# Tensors


def gguf_tensors(w: Weights, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) in file order; vocab rows cut to the real vocabulary."""
    V = arch.vocab_size
    # NEOX rope (dream, llada-moe) = our rotate-half order: no permutation
    neox = gguf_arch(arch) in ("dream", "llada-moe")

    def qk(t: torch.Tensor, heads: int) -> torch.Tensor:
        return t if neox else permute_rope_rows(t, heads)

    out = [("token_embd.weight", w.embed[:V])]
    for i, L in enumerate(w.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", L.attn_norm),
                (b + "attn_q.weight", qk(L.q, arch.num_heads)),
                (b + "attn_k.weight", qk(L.k, arch.num_groups)),
                (b + "attn_v.weight", L.v)]
        if L.q_bias is not None:
            out += [(b + "attn_q.bias", qk(L.q_bias, arch.num_heads)),
                    (b + "attn_k.bias", qk(L.k_bias, arch.num_groups)),
                    (b + "attn_v.bias", L.v_bias)]
        if L.q_norm is not None:
            out += [(b + "attn_q_norm.weight", L.q_norm), (b + "attn_k_norm.weight", L.k_norm)]
        out += [(b + "attn_output.weight", L.o),
                (b + "ffn_norm.weight", L.mlp_norm)]
        if L.router is not None:  # llada-moe: experts stacked [E, f_e, H] / [E, H, f_e]
            out += [(b + "ffn_gate_inp.weight", L.router),
                    (b + "ffn_gate_exps.weight", torch.stack([g for g, _, _ in L.experts])),
                    (b + "ffn_up_exps.weight", torch.stack([u for _, u, _ in L.experts])),
                    (b + "ffn_down_exps.weight", torch.stack([d for _, _, d in L.experts]))]
            continue
        out += [(b + "ffn_gate.weight", L.gate),
                (b + "ffn_up.weight", L.up),
                (b + "ffn_down.weight", L.down)]
    out.append(("output_norm.weight", w.final_norm))
    if w.lm_head is not None:
        out.append(("output.weight", w.lm_head[:V]))
    elif arch.num_experts:  # llada-moe requires an output tensor: a tied head is written out
        out.append(("output.weight", w.embed[:V]))
    return out


def _encode(name: str, t: torch.Tensor, dtype: str):
    """-> (numpy data, raw_dtype or None, used type name). 1-D tensors always stay f32."""
    import gguf

    arr = t.detach().float().contiguous().numpy()
    if arr.ndim == 1 or dtype == "f32":
        return arr, None, "f32"
    if dtype == "f16":
        return arr.astype(np.float16), None, "f16"
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    try:
        return gguf.quants.quantize(arr, qtype), qtype, dtype
    except gguf.QuantError:  # row length not a multiple of the block size
        return arr.astype(np.float16), None, "f16"


def export_gguf(ckpt: str | Path, output: str | Path, *, dtype: str = "f32", tokenizer_pre: str | None = None,
                overwrite: bool = False, show_progress: bool = True) -> Path:
    """Framework checkpoint -> one ``llada`` GGUF file."""
    import gguf

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not valid for GGUF exports (use {', '.join(DTYPES)})")
    out = Path(output)
    if out.is_dir():
        raise ConvertError(f"--output {out} is a directory; GGUF export writes one file (e.g. model.gguf)")
    if out.exists() and not overwrite:
        raise ConvertError(f"--output {out} exists (pass --overwrite to replace it)")
    src = open_checkpoint(ckpt, show_progress=show_progress)
    arch = src.arch
    if arch.objective not in ("masked", "block"):
        raise ConvertError(f"llama.cpp's {gguf_arch(arch)} architecture is a masked-diffusion denoiser; this checkpoint is "
                           f"diffusion.objective={arch.objective!r} (export it with --to hf)")
    if arch.num_experts:
        check_llada_moe(arch)
    check_head_width(arch)
    ids = special_ids(src.tokenizer_file)
    tokens, types, merges, pre = tokenizer_vocab(src.tokenizer_file, arch.vocab_size, tokenizer_pre)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf_arch(arch))
    ok = False
    try:
        writer.add_name(src.path.parent.parent.name or "dlm_megatron")
        writer.add_context_length(arch.seq_len)
        writer.add_embedding_length(arch.hidden_size)
        writer.add_block_count(arch.num_layers)
        writer.add_feed_forward_length(arch.moe_ffn_hidden_size * arch.moe_topk if arch.num_experts else arch.ffn_hidden_size)
        if arch.num_experts:
            writer.add_expert_count(arch.num_experts)
            writer.add_expert_used_count(arch.moe_topk)
            writer.add_expert_feed_forward_length(arch.moe_ffn_hidden_size)
        writer.add_head_count(arch.num_heads)
        writer.add_head_count_kv(arch.num_groups)
        writer.add_rope_freq_base(arch.rope_theta)
        # llama.cpp takes a head's width from n_embd / n_head unless these are set (Qwen3-style
        # heads x head_dim != hidden_size, model.kv_channels); RoPE rotates the whole head.
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
        writer.add_rope_dimension_count(arch.head_dim)
        writer.add_layer_norm_rms_eps(arch.norm_eps)
        writer.add_vocab_size(arch.vocab_size)
        writer.add_causal_attention(False)
        writer.add_diffusion_shift_logits(arch.shift_logits)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer.add_string("dlm_megatron.objective", arch.objective)
        if arch.block_size is not None:
            writer.add_uint32("dlm_megatron.block_size", arch.block_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(ids["eot"])
        writer.add_eos_token_id(ids["eot"])
        writer.add_pad_token_id(ids["pad"])
        writer.add_mask_token_id(ids["mask"])
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        for name, t in gguf_tensors(src.weights, arch):
            data, raw_dtype, _ = _encode(name, t, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=show_progress)
        ok = True
    finally:
        writer.close()
        if not ok:
            tmp.unlink(missing_ok=True)
    os.replace(tmp, out)
    return out
