"""Mixture-of-experts checkpoints through tools/convert.py: --to hf (our modeling code, loaded
offline by transformers) gives the framework's logits, for LLaDA-MoE's routing (softmax over
all experts, no top-k renormalisation, per-head q/k norm) and DeepSeek-V3 / LLaDA 2.0's
(sigmoid scores with an aux-free expert bias, a shared expert, a dense first layer)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from test_convert_cli import _load_hf, _max_diff, convert, framework_logits, perturb_norms, sample_tokens, train_tiny, wait_all

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.e2e

MOE = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=96", "model.moe_aux_loss_coeff=0.01"]
LLADA_MOE = MOE + ["model.qk_layernorm=true", "model.moe_router_pre_softmax=true"]
# 3 layers: a dense first layer, then MoE layers with sigmoid routing, expert bias (moved by
# 4 steps at a large update rate, so it changes the choice of experts) and a shared expert.
DEEPSEEK = MOE + ["model.num_layers=3", "model.moe_first_k_dense=1", "model.moe_router_score_function=sigmoid",
                  "model.moe_router_enable_expert_bias=true", "model.moe_router_bias_update_rate=0.05",
                  "model.moe_shared_expert_intermediate_size=64", "parallel.engine=megatron", "train.steps=4"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_export")
    runs = {"llada_moe": root / "llada_moe", "deepseek": root / "deepseek"}
    wait_all([train_tiny(runs["llada_moe"], *LLADA_MOE), train_tiny(runs["deepseek"], *DEEPSEEK)])
    for r in runs.values():
        perturb_norms(r)  # q/k norms included ("layernorm" in their names)
    return runs


@pytest.mark.parametrize("name", ["llada_moe", "deepseek"])
def test_hf_export_moe_logits_equal_framework(ckpts, tmp_path, name):
    from dlm_megatron.checkpoint import load_full_state_dict, resolve

    full = load_full_state_dict(resolve(ckpts[name]))
    if name == "deepseek":  # the features under test are really in the checkpoint
        biases = [v for k, v in full.items() if k.endswith("router.expert_bias")]
        assert len(biases) == 2 and all(b.abs().max() > 0 for b in biases)
        assert "decoder.layers.0.mlp.linear_fc1.weight" in full and "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in full
    else:
        assert "decoder.layers.0.self_attention.q_layernorm.weight" in full
    out = tmp_path / "hf"
    assert convert("--ckpt", ckpts[name], "--to", "hf", "--output", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe_num_experts"] == 4 and cfg["moe_top_k"] == 2
    from dlm_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    x = sample_tokens(tok.vocab_size, tok.mask_id)
    hf = _load_hf(out)
    with torch.no_grad():
        got = hf(x).logits
    diff = _max_diff(got, framework_logits(ckpts[name], x))
    print(f"\n[convert] MoE {name}: HF export vs framework logits max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_hf_llama_export_refuses_moe(ckpts, tmp_path):
    from dlm_megatron.convert import ConvertError
    from dlm_megatron.convert.hf import export_hf_llama

    with pytest.raises(ConvertError, match="model.num_moe_experts or model.qk_layernorm: use --to hf"):
        export_hf_llama(ckpts["llada_moe"], tmp_path / "x", show_progress=False)


def test_gguf_refuses_what_llada_moe_cannot_express(ckpts, tmp_path):
    """llama.cpp's llada-moe: no shared expert, softmax routing without bias or top-k
    renormalisation, MoE in every layer, q/k norms. Each missing feature is one line."""
    import dataclasses

    from dlm_megatron.convert import ConvertError, arch_from_meta
    from dlm_megatron.convert.gguf import check_llada_moe
    from dlm_megatron.checkpoint import read_meta, resolve

    with pytest.raises(ConvertError, match="cannot express a shared expert") as e:
        convert_raising(ckpts["deepseek"], tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
    good = arch_from_meta(read_meta(resolve(ckpts["llada_moe"])))
    check_llada_moe(good)  # the LLaDA-MoE layout passes
    for change, needle in (({"moe_score_function": "sigmoid"}, "sigmoid routing"), ({"moe_expert_bias": True}, "expert bias"),
                           ({"moe_layers": (0, 1)}, "dense layers"), ({"moe_pre_softmax": False}, "renormalised"),
                           ({"qk_norm": False}, "without q/k norms"), ({"moe_shared_ffn_hidden_size": 8}, "shared expert")):
        with pytest.raises(ConvertError, match=needle):
            check_llada_moe(dataclasses.replace(good, **change))


def convert_raising(ckpt, out):
    from dlm_megatron.convert.gguf import export_gguf

    return export_gguf(ckpt, out, show_progress=False)


def test_gguf_llada_moe_tensors_and_reference_forward(ckpts, tmp_path):
    """The llada-moe file's metadata and a forward pass in llama.cpp's conventions
    (test_convert_cli.gguf_reference_logits: NEOX rope, per-head q/k norm, softmax top-k
    without renormalisation) equal the framework's logits, as for the dense export (f32 1e-4).
    The real llama.cpp run is tests/e2e/test_gguf_llamacpp.py."""
    from gguf import GGUFReader

    from dlm_megatron.data.tokenizer import load_tokenizer
    from test_convert_cli import gguf_reference_logits

    f = tmp_path / "moe.gguf"
    assert convert("--ckpt", ckpts["llada_moe"], "--to", "gguf", "--output", f) == 0
    r = GGUFReader(str(f))
    kv = {k: v.contents() for k, v in r.fields.items() if k.startswith("llada-moe.")}
    assert r.fields["general.architecture"].contents() == "llada-moe"
    assert kv["llada-moe.expert_count"] == 4 and kv["llada-moe.expert_used_count"] == 2
    assert kv["llada-moe.expert_feed_forward_length"] == 96
    shapes = {t.name: [int(n) for n in reversed(t.shape.tolist())] for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == [4, 96, 64] and shapes["blk.0.ffn_down_exps.weight"] == [4, 64, 96]
    assert shapes["blk.1.attn_q_norm.weight"] == [16] and "output.weight" in shapes
    tok = load_tokenizer("builtin")
    x = sample_tokens(tok.vocab_size, tok.mask_id, B=1)
    ref = framework_logits(ckpts["llada_moe"], x)[0, :, : tok.vocab_size]
    diff = _max_diff(gguf_reference_logits(f, x[0]), ref)
    print(f"\n[convert] llada-moe GGUF reference forward vs framework max |diff| = {diff:.2e}")
    assert diff < 1e-4


def qwen3_moe(hf_dir, norm_topk_prob: bool = False, head_dim: int = 16):
    """A random Qwen3-MoE (hidden 64, 4 heads of ``head_dim``, 2 KV heads, per-head q/k RMSNorm,
    4 experts, top-2) built with transformers and saved with our tokenizer; norms and router
    randomised so a missing q/k norm or a wrong choice or weighting of experts shows."""
    import shutil

    import transformers

    from test_convert_cli import BUILTIN_TOKENIZER

    cfg = transformers.Qwen3MoeConfig(vocab_size=8200, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # q/k norms included: a missing one shows
            elif n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # peaked routing: a wrong choice or weighting of experts shows
    model.save_pretrained(str(hf_dir))
    shutil.copyfile(BUILTIN_TOKENIZER, hf_dir / "tokenizer.json")
    return model.eval()


# head_dim 32 on hidden 64 with 4 heads: Qwen3's heads x head_dim != hidden (model.kv_channels)
@pytest.mark.parametrize("norm_topk_prob,head_dim", [(False, 16), (True, 16), (False, 32)])
def test_import_qwen3_moe_causal_logits(tmp_path, norm_topk_prob, head_dim):
    """A random Qwen3-MoE imported with --from-hf: the framework's causal logits equal
    Qwen3MoeForCausalLM's, with the top-k renormalised (norm_topk_prob, megatron
    moe_router_pre_softmax=false) or not (=true), and with heads wider than hidden / heads
    (head_dim -> model.kv_channels), as every released Qwen3-MoE has them."""
    from dlm_megatron.checkpoint import read_meta, resolve

    hf_dir = tmp_path / "qwen3moe"
    model = qwen3_moe(hf_dir, norm_topk_prob, head_dim)
    imp = tmp_path / "imported"
    assert convert("--from-hf", hf_dir, "--output", imp) == 0
    m = read_meta(resolve(imp))["config"]["model"]
    assert (m["num_moe_experts"], m["moe_router_topk"], m["qk_layernorm"]) == (4, 2, True)
    assert m["moe_router_pre_softmax"] is (not norm_topk_prob)
    assert m["kv_channels"] == (None if head_dim * 4 == 64 else head_dim)
    x = sample_tokens(8192, 1)
    with torch.no_grad():
        want = model(x).logits
    diff = _max_diff(framework_logits(imp, x)[..., :8200], want)
    print(f"\n[convert] Qwen3-MoE import (norm_topk_prob={norm_topk_prob}, head_dim={head_dim}): "
          f"framework vs transformers max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_qwen3_moe_wide_heads_export_hf_and_gguf_refusal(tmp_path):
    """Qwen3-MoE with heads of 32 on a 64-wide model (q width 128), imported as a masked
    denoiser: the --to hf export (head_dim in config.json) loads in transformers with the
    framework's logits. The pinned llama.cpp's llada-moe graph sizes attn_q as n_embd x n_embd
    (it refused such a file when tried), so --to gguf refuses it in one line."""
    from dlm_megatron.convert import ConvertError
    from dlm_megatron.convert.gguf import export_gguf
    from dlm_megatron.data.tokenizer import load_tokenizer

    hf_dir, imp = tmp_path / "qwen3moe", tmp_path / "dlm"
    qwen3_moe(hf_dir, head_dim=32)
    assert convert("--from-hf", hf_dir, "--output", imp, "--objective", "masked") == 0
    tok = load_tokenizer(imp / "tokenizer.json")
    x = sample_tokens(tok.vocab_size, tok.mask_id)
    out = tmp_path / "hf"
    assert convert("--ckpt", imp, "--to", "hf", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["head_dim"] == 32
    with torch.no_grad():
        got = _load_hf(out)(x).logits
    diff = _max_diff(got, framework_logits(imp, x))
    print(f"\n[convert] Qwen3-MoE head_dim 32: HF export vs framework logits max |diff| = {diff:.2e}")
    assert diff < 1e-4
    with pytest.raises(ConvertError, match=r"llada-moe graph needs heads x head width = hidden size, but this checkpoint "
                                           r"has 4 x 32 = 128 != 64 \(model.kv_channels\); export it with --to hf") as e:
        export_gguf(imp, tmp_path / "moe.gguf", show_progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "moe.gguf").exists()
