"""Conversion building blocks (no training, no megatron import): fused-QKV layout, RoPE row
permutation for llama.cpp, safetensors sharding, pipeline-stage placement, GGUF vocabulary.

The end-to-end checks (real checkpoints -> HF / GGUF / reshard / import, logits compared with
the framework) are in tests/e2e/test_convert.py and tests/e2e/test_gguf_llamacpp.py."""
from __future__ import annotations

import json

import pytest
import torch

from dlm_megatron.convert import Arch, ConvertError, fuse_qkv, split_qkv
from dlm_megatron.convert.gguf import _pre_tokenizer_name, permute_rope_rows, tokenizer_vocab
from dlm_megatron.convert.hf import parse_size, save_sharded
from dlm_megatron.convert.reshard import stage_of
from dlm_megatron.data.tokenizer import BUILTIN_TOKENIZER


def _arch(heads=4, groups=2, hd=4):
    return Arch(num_layers=2, hidden_size=heads * hd, num_heads=heads, num_groups=groups, head_dim=hd, ffn_hidden_size=8,
                vocab_size=10, padded_vocab_size=128, rope_theta=10000.0, norm_eps=1e-5, tied=False, objective="masked",
                block_size=None, shift_logits=False, seq_len=16)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_layout_is_group_major(heads, groups):
    """megatron's linear_qkv: per group [its q heads, its k head, its v head] x head_dim rows."""
    a = _arch(heads, groups)
    hd, hpg = a.head_dim, heads // groups
    # Label each row with (kind, head, dim) the way megatron lays them out.
    rows = []
    for g in range(groups):
        rows += [("q", g * hpg + j, d) for j in range(hpg) for d in range(hd)]
        rows += [("k", g, d) for d in range(hd)]
        rows += [("v", g, d) for d in range(hd)]
    code = {r: i for i, r in enumerate(rows)}
    w = torch.tensor([[float(code[r])] for r in rows])
    q, k, v = split_qkv(w, a)
    assert [rows[int(x)] for x in q[:, 0]] == [("q", h, d) for h in range(heads) for d in range(hd)]
    assert [rows[int(x)] for x in k[:, 0]] == [("k", g, d) for g in range(groups) for d in range(hd)]
    assert [rows[int(x)] for x in v[:, 0]] == [("v", g, d) for g in range(groups) for d in range(hd)]
    assert torch.equal(fuse_qkv(q, k, v, a), w)


def test_split_qkv_rejects_wrong_shape():
    with pytest.raises(ConvertError, match="linear_qkv"):
        split_qkv(torch.zeros(7, 16), _arch())


def _rope_half(x, pos, theta=10000.0):
    """HF / megatron rotate-half RoPE on [..., d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def _rope_pairs(x, pos, theta=10000.0):
    """llama.cpp's NORM rope: adjacent pairs (2i, 2i+1) rotate by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    ang = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_rope_permutation_matches_llama_cpp_norm_rope():
    """NORM rope on the permuted weights gives the same rotated vectors, in permuted order,
    hence the same attention scores."""
    torch.manual_seed(0)
    heads, d, hidden = 3, 8, 12
    w = torch.randn(heads * d, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    wp = permute_rope_rows(w, heads)
    perm = [j for i in range(d // 2) for j in (i, i + d // 2)]
    for pos in (0, 1, 5, 17):
        ref = _rope_half((w @ x).view(heads, d), pos)
        got = _rope_pairs((wp @ x).view(heads, d), pos)
        assert torch.allclose(got, ref[:, perm], atol=1e-12)
    # scores q.k are invariant
    k = torch.randn(heads * d, hidden, dtype=torch.float64)
    s_ref = (_rope_half((w @ x).view(heads, d), 3) * _rope_half((k @ x).view(heads, d), 7)).sum(-1)
    s_got = (_rope_pairs((wp @ x).view(heads, d), 3) * _rope_pairs((permute_rope_rows(k, heads) @ x).view(heads, d), 7)).sum(-1)
    assert torch.allclose(s_ref, s_got, atol=1e-12)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1234") == 1234
    with pytest.raises(ConvertError, match="max-shard-size"):
        parse_size("lots")


def test_save_sharded_writes_index(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    files = save_sharded(tensors, tmp_path, max_shard_bytes=2100, show_progress=False)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    for name, f in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / f))[name], tensors[name])
    single = tmp_path / "single"
    single.mkdir()
    assert save_sharded(tensors, single, max_shard_bytes=10**9, show_progress=False) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


def test_stage_placement():
    assert stage_of("decoder.layers.5.mlp.linear_fc1.weight", 8, 4) == [2]
    assert stage_of("embedding.word_embeddings.weight", 8, 4) == [0]
    assert stage_of("output_layer.weight", 8, 4) == [3]
    assert stage_of("decoder.final_layernorm.weight", 8, 2) == [1]
    assert stage_of("time_embedding.weight", 8, 1) == [0]
    assert stage_of("time_embedding.weight", 8, 2, {"time_embedding.weight": {"first", "last"}}) == [0, 1]
    with pytest.raises(ConvertError, match="pipeline stage"):
        stage_of("time_embedding.weight", 8, 2)


def test_gguf_vocab_of_builtin_tokenizer():
    import gguf

    tokens, types, merges, pre = tokenizer_vocab(BUILTIN_TOKENIZER, 8200)
    assert pre == "gpt-2"
    assert tokens[:3] == ["<|endoftext|>", "<|mask|>", "<|pad|>"]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert types[3] == int(gguf.TokenType.NORMAL)
    assert tokens[8195] == "[PAD8195]" and types[8195] == int(gguf.TokenType.UNUSED)
    assert merges[0].count(" ") == 1
    with pytest.raises(ConvertError, match="vocabulary rows"):
        tokenizer_vocab(BUILTIN_TOKENIZER, 100)


def test_pre_tokenizer_detection():
    assert _pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert _pre_tokenizer_name({"type": "Whitespace"}) is None
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    seq = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": llama3}},
                                                  {"type": "ByteLevel", "use_regex": False}]}
    assert _pre_tokenizer_name(seq) == "llama-bpe"
