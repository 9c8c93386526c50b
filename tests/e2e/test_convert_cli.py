"""tools/convert.py end to end on tiny trained checkpoints: HF export (LLaDA layout, our
modeling code, logits and sampler vs the framework), GGUF files (metadata, and a forward pass
in llama.cpp's own conventions vs the framework), resharding (bit-exact, trainer resumes),
and HF Llama / Qwen2 import (causal logits vs transformers, bit-exact round trip).

The real llama.cpp check is tests/e2e/test_gguf_llamacpp.py. Checkpoints are trained for 2
steps (three runs in parallel) and their norm weights are then randomised, so a swapped norm
or projection cannot hide behind weights that are all ~1."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from common import COMMON_OVERRIDES, PY, REPO, env, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here loads from local folders
pytestmark = pytest.mark.e2e

CONVERT = [PY, "tools/convert.py"]
TRAIN_OVERRIDES = list(COMMON_OVERRIDES) + ["train.steps=2"]
BUILTIN_TOKENIZER = Path(REPO) / "dlm_megatron" / "assets" / "tokenizer" / "shakespeare_bpe8k.json"


# ---------------------------------------------------------------------------------------
# Helpers (also used by test_gguf_llamacpp.py)


def train_tiny(out: Path, *extra: str, config: str = "configs/tiny.yaml", nproc: int = 1) -> subprocess.Popen:
    """Start a 2-step tiny training run (returns the process; see wait_all)."""
    launcher = [PY, "-m", "dlm_megatron.train"] if nproc == 1 else \
        [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dlm_megatron.train"]
    cmd = launcher + [config, *TRAIN_OVERRIDES, f"train.output_dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"training failed ({p.returncode}): {' '.join(p.args)}\n{out[-4000:]}")


def perturb_norms(run_dir: Path) -> None:
    """Randomise every norm weight of a checkpoint in place (same values on every TP rank)."""
    from safetensors.torch import load_file, save_file

    from dlm_megatron.checkpoint import resolve

    for f in sorted((resolve(run_dir) / "model").glob("*.safetensors")):
        sd = load_file(str(f))
        for name, t in sd.items():
            if "layernorm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                sd[name] = torch.rand(t.shape, generator=g) + 0.5
        save_file(sd, str(f))


def framework_logits(ckpt, tokens_BS: torch.Tensor) -> torch.Tensor:
    """The framework's own forward (merged to one process), all padded vocabulary columns."""
    from dlm_megatron.generate import load_model

    model, *_ = load_model(str(ckpt))
    with torch.no_grad():
        return model(tokens_BS, None, None).double()


def convert(*args) -> int:
    """tools/convert.py main() in this process (fast; the CLI's own process is tested below)."""
    spec = importlib.util.spec_from_file_location("dlm_convert_cli", Path(REPO) / "tools" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args] + ["--quiet"])


def convert_cli(*args) -> subprocess.CompletedProcess:
    return run(CONVERT + [str(a) for a in args], check=False, timeout=300)


def sample_tokens(vocab: int, mask_id: int, B: int = 2, S: int = 24, seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(seed))
    x[:, 4] = mask_id
    x[0, 9:13] = mask_id
    return x


def gguf_reference_logits(path, tokens_S) -> torch.Tensor:
    """Forward pass of a ``llada``, ``dream`` or ``llada-moe`` GGUF file in llama.cpp's
    conventions, in fp64: tensors as stored (dequantised), llada's NORM rope rotating adjacent
    pairs (2i, 2i+1) or dream's / llada-moe's NEOX rope rotating (i, i + d/2), q/k/v biases
    when stored, per-head q/k RMSNorm when stored (llada-moe), heads of width
    ``attention.key_length`` (n_embd / n_head without it), GQA broadcast of kv head
    h // (heads / kv_heads), bidirectional attention; llada-moe's MLP as its graph computes
    it: softmax over all ``expert_count`` router logits, the ``expert_used_count`` largest
    weights used as they are (no renormalisation), SwiGLU experts from the stacked
    ``ffn_{gate,up,down}_exps``; output = ``output`` or ``token_embd``."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    kv = {k[len(arch) + 1:]: f.contents() for k, f in r.fields.items() if k.startswith(arch + ".")}
    T = {}
    for t in r.tensors:
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
        T[t.name] = torch.from_numpy(a.reshape([int(n) for n in reversed(t.shape.tolist())]).copy())
    nh, nkv = kv["attention.head_count"], kv["attention.head_count_kv"]
    eps, base = kv["attention.layer_norm_rms_epsilon"], kv["rope.freq_base"]
    x = T["token_embd.weight"][torch.as_tensor(tokens_S)]
    S, H = x.shape
    d = kv.get("attention.key_length", H // nh)  # as llama.cpp: the head width when stored
    ang = torch.arange(S, dtype=torch.float64)[:, None] / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(v):  # [S, heads, d]
        pairs = (slice(0, None, 2), slice(1, None, 2)) if arch == "llada" else (slice(0, d // 2), slice(d // 2, None))
        a, b = v[..., pairs[0]], v[..., pairs[1]]
        out = torch.empty_like(v)
        out[..., pairs[0]], out[..., pairs[1]] = a * cos - b * sin, a * sin + b * cos
        return out

    def proj(h, name):
        y = h @ T[name + ".weight"].T
        return y + T[name + ".bias"] if name + ".bias" in T else y

    def norm(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w

    for i in range(kv["block_count"]):
        p = f"blk.{i}."
        h = norm(x, T[p + "attn_norm.weight"])
        q, k = proj(h, p + "attn_q").view(S, nh, d), proj(h, p + "attn_k").view(S, nkv, d)
        if p + "attn_q_norm.weight" in T:
            q, k = norm(q, T[p + "attn_q_norm.weight"]), norm(k, T[p + "attn_k_norm.weight"])
        q = rope(q)
        k = rope(k).repeat_interleave(nh // nkv, 1)
        v = proj(h, p + "attn_v").view(S, nkv, d).repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5, -1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(S, nh * d) @ T[p + "attn_output.weight"].T
        h = norm(x, T[p + "ffn_norm.weight"])
        if p + "ffn_gate_inp.weight" in T:
            w, idx = torch.softmax(h @ T[p + "ffn_gate_inp.weight"].T, -1).topk(kv["expert_used_count"], -1)
            out = torch.zeros_like(x)
            for s_ in range(S):
                for w_e, e in zip(w[s_], idx[s_].tolist()):
                    g = T[p + "ffn_gate_exps.weight"][e] @ h[s_]
                    out[s_] += w_e * (T[p + "ffn_down_exps.weight"][e] @ (g * torch.sigmoid(g) * (T[p + "ffn_up_exps.weight"][e] @ h[s_])))
            x = x + out
            continue
        g = h @ T[p + "ffn_gate.weight"].T
        x = x + (g * torch.sigmoid(g) * (h @ T[p + "ffn_up.weight"].T)) @ T[p + "ffn_down.weight"].T
    x = norm(x, T["output_norm.weight"])
    return x @ T.get("output.weight", T["token_embd.weight"]).T


# ---------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """masked (MHA, TP=1), block (block_size 8) and TP=2 GQA (2 query groups) runs."""
    root = tmp_path_factory.mktemp("convert_ckpts")
    runs = {"masked": root / "masked", "block": root / "block", "tp2": root / "tp2"}
    wait_all([
        train_tiny(runs["masked"]),
        train_tiny(runs["block"], "diffusion.block_size=8", config="configs/tiny_block.yaml"),
        train_tiny(runs["tp2"], "model.num_query_groups=2", "parallel.tp=2", nproc=2),
    ])
    for r in runs.values():
        perturb_norms(r)
    return runs


def _load_hf(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), trust_remote_code=True).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _import_matches_hf(imp, ref_model, label: str):
    """Causal logits of imported checkpoint ``imp`` on sampled tokens against the source HF
    model's (max |diff| < 1e-4, fp32); returns (tokens, the HF logits)."""
    x = sample_tokens(8192, 1)
    with torch.no_grad():
        want = ref_model(x).logits
    diff = _max_diff(framework_logits(imp, x)[..., :8200], want)
    print(f"\n[convert] {label} max |diff| = {diff:.2e}")
    assert diff < 1e-4
    return x, want


# ---------------------------------------------------------------------------------------
# HF export


def test_hf_export_masked_logits_tokenizer_and_sampler(ckpts, tmp_path):
    from transformers import AutoTokenizer

    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.generate import load_model, logits_fn_for
    from dlm_megatron.sampling import SamplerConfig, generate

    out = tmp_path / "hf_masked"
    assert convert("--ckpt", ckpts["masked"], "--to", "hf", "--output", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dlm_megatron" and cfg["architectures"] == ["DLMModelLM"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_dlm.DLMModelLM"
    assert (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 0, 2)
    assert (cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"], cfg["mlp_hidden_size"]) == (64, 4, 4, 2, 192)
    assert (cfg["vocab_size"], cfg["embedding_size"], cfg["objective"]) == (8192, 8192, "masked")
    assert "block_size" not in cfg
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "configuration_dlm.py", "modeling_dlm.py"):
        assert (out / f).is_file(), f
    for f in ("configuration_dlm.py", "modeling_dlm.py"):  # self-contained: never imports the framework
        assert not re.search(r"^\s*(from|import)\s+dlm_megatron", (out / f).read_text(), re.M)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
            "model.transformer.blocks.1.q_proj.weight", "model.transformer.blocks.1.ff_proj.weight",
            "model.transformer.blocks.1.up_proj.weight", "model.transformer.blocks.1.ff_out.weight",
            "model.transformer.blocks.1.attn_out.weight", "model.transformer.blocks.1.attn_norm.weight",
            "model.transformer.blocks.1.ff_norm.weight"} <= names

    hf = _load_hf(out)
    x = sample_tokens(8192, 1)
    ref = framework_logits(ckpts["masked"], x)
    with torch.no_grad():
        got = hf(x).logits
    diff = _max_diff(got, ref)
    print(f"\n[convert] HF export (masked, fp32) max |logit diff| = {diff:.2e}")
    assert diff < 1e-4

    tok = load_tokenizer("builtin")
    hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.mask_token_id == 1

    # generate() is the framework's masked sampler, token for token.
    model, tok, fcfg, _ = load_model(str(ckpts["masked"]))
    prompt = torch.tensor([tok.encode("ROMEO: But soft")[:5], tok.encode("JULIET: Ay me, ")[:5]])
    for temperature, rule in ((0.0, "low_confidence"), (0.8, "low_confidence"), (1.0, "random")):
        scfg = SamplerConfig(steps=16, gen_length=16, block_length=8, temperature=temperature, remasking=rule, seed=3)
        want = generate(logits_fn_for(model, tok.vocab_size), prompt, tok.mask_id, scfg, eos_id=tok.eot_id, suppress_ids=(tok.pad_id,))
        got = hf.generate(prompt, gen_length=16, steps=16, block_length=8, temperature=temperature, remasking=rule, seed=3)
        assert torch.equal(got, want), (temperature, rule)


def test_hf_export_block_checkpoint(ckpts, tmp_path):
    from dlm_megatron.generate import load_model
    from dlm_megatron.sampling import SamplerConfig, generate_blocks

    out = tmp_path / "hf_block"
    assert convert("--ckpt", ckpts["block"], "--to", "hf", "--output", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "block" and cfg["block_size"] == 8
    hf = _load_hf(out)
    x = sample_tokens(8192, 1)
    with torch.no_grad():
        got = hf(x).logits
    diff = _max_diff(got, framework_logits(ckpts["block"], x))  # plain bidirectional forward
    print(f"\n[convert] HF export (block, fp32) max |logit diff| = {diff:.2e}")
    assert diff < 1e-4

    model, tok, _, _ = load_model(str(ckpts["block"]))
    prompt = torch.tensor([tok.encode("ROMEO: But soft, what light")[:11]] * 2)  # 11: not on the block grid
    prompt[1, 3] = tok.encode(" the")[0]
    for temperature in (0.0, 0.7):
        scfg = SamplerConfig(steps=16, gen_length=16, block_length=8, temperature=temperature, seed=5)
        want = generate_blocks(model, prompt, tok.mask_id, scfg, vocab_size=tok.vocab_size, eos_id=tok.eot_id,
                               suppress_ids=(tok.pad_id,))
        got = hf.generate(prompt, gen_length=16, steps=16, temperature=temperature, seed=5)  # KV cache (default)
        assert torch.equal(got, want), temperature
        again = hf.generate(prompt, gen_length=16, steps=16, temperature=temperature, seed=5, use_cache=False)
        assert torch.equal(again, want), temperature
    # Prompt ending on the block grid (its 2 whole blocks are cached before the first step).
    on_grid = torch.tensor([tok.encode("ROMEO: But soft, what light through yonder window breaks? It is the east")[:16]])
    scfg = SamplerConfig(steps=16, gen_length=16, block_length=8, temperature=0.0)
    want = generate_blocks(model, on_grid, tok.mask_id, scfg, vocab_size=tok.vocab_size, eos_id=tok.eot_id,
                           suppress_ids=(tok.pad_id,))
    seen = []  # token positions the network processes, per generate() call
    hook = hf.model.transformer.wte.register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    assert torch.equal(hf.generate(on_grid, gen_length=16, steps=16), want)
    cached, seen[:] = sum(seen), []
    assert torch.equal(hf.generate(on_grid, gen_length=16, steps=16, use_cache=False), want)
    hook.remove()
    print(f"\n[convert] HF block generate(): {cached} token positions through the network with the KV cache, "
          f"{sum(seen)} without")
    assert cached < sum(seen) / 2


def _sharpened_copy(ckpt, dest: Path, factor: float = 40.0) -> Path:
    """A copy of a checkpoint with its output layer scaled: the 2-step models spread their
    probability thinly (max ~6e-4 over 8192 tokens), so confidence thresholds would sit on
    near-ties; scaled, the first-step confidences are ~0.77 and 3e-4 apart."""
    from safetensors.torch import load_file, save_file

    from dlm_megatron.checkpoint import resolve

    shutil.copytree(resolve(ckpt), dest)
    for f in sorted((dest / "model").glob("*.safetensors")):
        sd = load_file(str(f))
        save_file({k: (v * factor if k.startswith("output_layer") else v) for k, v in sd.items()}, str(f))
    return dest


def _median_confidence(ckpt, prompt) -> float:
    """Median of the first step's max-probabilities of the generated positions: a threshold
    that some positions pass and some do not."""
    from dlm_megatron.generate import load_model, logits_fn_for

    model, tok, _, _ = load_model(str(ckpt))
    x = torch.cat([prompt, torch.full((prompt.shape[0], 8), tok.mask_id)], dim=1)
    p = torch.softmax(logits_fn_for(model, tok.vocab_size)(x)[:, prompt.shape[1]:].double(), -1).max(-1).values
    return float(p.flatten().median())


def _framework_and_hf(ckpt, prompt, knobs, *, block: bool, eos=None):
    """(the framework's tokens for these knobs, the matching HF generate() keywords)."""
    from dlm_megatron.generate import load_model, logits_fn_for
    from dlm_megatron.sampling import SamplerConfig, generate, generate_blocks

    model, tok, fcfg, _ = load_model(str(ckpt))
    eos = tok.eot_id if eos is None else eos
    scfg = SamplerConfig(steps=16, gen_length=16, block_length=8, seed=3, **knobs)
    if block:
        want = generate_blocks(model, prompt, tok.mask_id, scfg, vocab_size=tok.vocab_size, eos_id=eos, suppress_ids=(tok.pad_id,))
    else:
        want = generate(logits_fn_for(model, tok.vocab_size, shift=fcfg.diffusion.shift_logits), prompt, tok.mask_id, scfg,
                        eos_id=eos, suppress_ids=(tok.pad_id,))
    return want, dict(gen_length=16, steps=16, seed=3, eos_token_id=eos, **({} if block else {"block_length": 8}), **knobs)


MASKED_KNOBS = [
    dict(temperature=1.0, temperature_schedule="linear"),
    dict(temperature=0.8, temperature_schedule="cosine", acceptance_profile="cosine"),
    dict(temperature=1.0, renoise_profile="constant", renoise_eta=0.3),
    dict(temperature=1.0, renoise_prob=0.3),
    dict(temperature=1.0, renoise_profile="cap", renoise_eta=0.5),
    dict(temperature=1.0, renoise_profile="rescale", renoise_eta=0.8, remasking="random"),
    dict(temperature=1.0, renoise_profile="loop", renoise_eta=0.4, renoise_t_on=0.8, renoise_t_off=0.2, renoise_alpha_on=0.5),
    dict(confidence_threshold="median"),
    dict(parallel_threshold="median"),
    dict(cache="prefix"),
    dict(cache="dual", temperature=0.7),
    dict(cache="dual", parallel_threshold="median", cfg_scale=1.0),
    dict(cfg_scale=2.0, temperature=0.5),
    dict(stop_at_eos=True),
]


def _knob_run(hf, ckpt, prompt, knobs, *, block, plain, frequent):
    """(framework tokens, HF tokens, token positions HF ran, whether the knob changed anything)."""
    knobs = dict(knobs)
    for key in ("confidence_threshold", "parallel_threshold"):
        if knobs.get(key) == "median":
            knobs[key] = _median_confidence(ckpt, prompt)
    eos = frequent if knobs.get("stop_at_eos") else None
    want, kw = _framework_and_hf(ckpt, prompt, knobs, block=block, eos=eos)
    seen = []
    hook = hf.model.transformer.wte.register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
    try:
        got = hf.generate(prompt, **kw)
    finally:
        hook.remove()
    base = plain if eos is None else _framework_and_hf(ckpt, prompt, {}, block=block, eos=eos)[0]
    return want, got, sum(seen), not torch.equal(want, base)


def _exports(ckpt, tmp_path, name):
    """(checkpoint, HF export) as trained, and a copy with a sharpened output layer for the
    threshold knobs (whose decisions must not sit on near-ties)."""
    sharp = _sharpened_copy(ckpt, tmp_path / f"sharp_{name}")
    pairs = {}
    for kind, ck in (("plain", ckpt), ("sharp", sharp)):
        out = tmp_path / f"hf_{name}_{kind}"
        assert convert("--ckpt", ck, "--to", "hf", "--output", out) == 0
        pairs[kind] = (ck, _load_hf(out))
    return pairs


def _check_knobs(pairs, prompt, knob_sets, *, block: bool):
    """Each knob set: HF tokens == framework tokens, and the knob changed the default call's
    tokens or (thresholds, cache) the positions the network ran."""
    P = prompt.shape[1]
    ref = {}
    for kind, (ck, hf) in pairs.items():
        plain, kw = _framework_and_hf(ck, prompt, {}, block=block)
        seen = []
        hook = hf.model.transformer.wte.register_forward_hook(lambda _m, args, _out: seen.append(args[0].numel()))
        assert torch.equal(hf.generate(prompt, **kw), plain)
        hook.remove()
        ref[kind] = (plain, int(plain[:, P:].flatten().mode().values), sum(seen))
    positions = {}
    for knobs in knob_sets:
        kind = "sharp" if "median" in knobs.values() else "plain"
        (ck, hf), (plain, frequent, plain_positions) = pairs[kind], ref[kind]
        want, got, pos, changed = _knob_run(hf, ck, prompt, knobs, block=block, plain=plain, frequent=frequent)
        assert torch.equal(got, want), knobs
        assert changed or pos < plain_positions, (knobs, pos, plain_positions)
        positions[str(knobs)] = pos
    return positions


def test_hf_generate_equals_the_framework_for_every_knob(ckpts, tmp_path):
    """The exported generate() takes every sampler knob of dlm_megatron.sampling and, for the
    same seed, returns the framework's tokens (masked checkpoint)."""
    from dlm_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    prompt = torch.tensor([tok.encode("ROMEO: But soft")[:5], tok.encode("JULIET: Ay me, ")[:5]])
    pairs = _exports(ckpts["masked"], tmp_path, "masked")
    positions = _check_knobs(pairs, prompt, MASKED_KNOBS, block=False)
    # Fast-dLLM's cache: per block one refresh over all 21 positions, then 7 steps over the
    # block (dual) or the block and everything after it (prefix); 2 rows
    assert positions[str(dict(cache="dual", temperature=0.7))] == 2 * (2 * 21 + 2 * 7 * 8)
    assert positions[str(dict(cache="prefix"))] == 2 * (2 * 21 + 7 * 16 + 7 * 8)
    # bad knobs: a ValueError naming the keyword, as SamplerConfig does
    hf = pairs["plain"][1]
    for bad, name in ((dict(acceptance_profile="square"), "acceptance_profile"), (dict(renoise_eta=1.5), "renoise_eta"),
                      (dict(renoise_t_on=0.1, renoise_t_off=0.3), "renoise_t_off"), (dict(cache="full"), "cache"),
                      (dict(parallel_threshold=2.0), "parallel_threshold"), (dict(cfg_scale=-1.0), "cfg_scale"),
                      (dict(parallel_threshold=0.5, renoise_prob=0.1), "parallel_threshold")):
        with pytest.raises(ValueError, match=name):
            hf.generate(prompt, gen_length=8, steps=8, **bad)


BLOCK_KNOBS = [
    dict(temperature=0.8, temperature_schedule="cosine", acceptance_profile="cosine"),
    dict(temperature=1.0, renoise_profile="loop", renoise_eta=0.4, renoise_t_on=0.8, renoise_t_off=0.2, renoise_alpha_on=0.5),
    dict(temperature=1.0, renoise_profile="cap", renoise_eta=0.5),
    dict(parallel_threshold="median"),
    dict(confidence_threshold="median"),
    dict(cfg_scale=1.5, temperature=0.5),
    dict(stop_at_eos=True),
]


def test_hf_block_generate_equals_the_framework_for_every_knob(ckpts, tmp_path):
    """Same for a block-diffusion checkpoint (KV cache on; the uncached reference path too)."""
    from dlm_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin")
    prompt = torch.tensor([tok.encode("ROMEO: But soft, what light")[:11]] * 2)  # not on the block grid
    prompt[1, 3] = tok.encode(" the")[0]
    pairs = _exports(ckpts["block"], tmp_path, "block")
    _check_knobs(pairs, prompt, BLOCK_KNOBS, block=True)
    ck, hf = pairs["plain"]
    for knobs in BLOCK_KNOBS:
        if "median" not in knobs.values():
            eos = int(_framework_and_hf(ck, prompt, {}, block=True)[0][:, 11:].flatten().mode().values) \
                if knobs.get("stop_at_eos") else None
            want, kw = _framework_and_hf(ck, prompt, knobs, block=True, eos=eos)
            assert torch.equal(hf.generate(prompt, use_cache=False, **kw), want), knobs


def test_hf_export_tp2_gqa_sharded_and_bf16(ckpts, tmp_path):
    out = tmp_path / "hf_tp2"
    assert convert("--ckpt", ckpts["tp2"], "--to", "hf", "--output", out, "--max-shard-size", "1MB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_heads"], cfg["n_kv_heads"]) == (4, 2)
    x = sample_tokens(8192, 1)
    ref = framework_logits(ckpts["tp2"], x)
    with torch.no_grad():
        got = _load_hf(out)(x).logits
    diff = _max_diff(got, ref)
    print(f"\n[convert] HF export (TP=2 GQA checkpoint, sharded, fp32) max |logit diff| = {diff:.2e}")
    assert diff < 1e-4

    out16 = tmp_path / "hf_tp2_bf16"
    assert convert("--ckpt", ckpts["tp2"], "--to", "hf", "--output", out16, "--dtype", "bfloat16") == 0
    hf16 = _load_hf(out16)
    assert hf16.model.transformer.wte.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = hf16(x).logits
    diff16 = _max_diff(got16, ref)
    print(f"[convert] HF export (bf16 weights and compute) max |logit diff| = {diff16:.2e}")
    assert diff16 < 0.1


def test_shift_logits_flag_reaches_hf_and_gguf(ckpts, tmp_path):
    """A diffusion.shift_logits checkpoint (DiffuLLaMA/Dream style, token i read from output
    i-1): config.json and the GGUF carry the flag, generate() shifts like the framework."""
    import dataclasses

    from gguf import GGUFReader

    from dlm_megatron.checkpoint import resolve
    from dlm_megatron.config import DiffusionConfig
    from dlm_megatron.generate import load_model, logits_fn_for
    from dlm_megatron.sampling import SamplerConfig, generate

    assert "shift_logits" in {f.name for f in dataclasses.fields(DiffusionConfig)}  # the feature under test exists
    ck = tmp_path / "shift_ckpt"
    shutil.copytree(resolve(ckpts["masked"]), ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["config"]["diffusion"]["shift_logits"] = True
    (ck / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "hf_shift"
    assert convert("--ckpt", ck, "--to", "hf", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["shift_logits"] is True
    assert convert("--ckpt", ck, "--to", "gguf", "--output", tmp_path / "shift.gguf") == 0
    assert GGUFReader(str(tmp_path / "shift.gguf")).fields["diffusion.shift_logits"].contents() is True

    model, tok, _, _ = load_model(str(ck))
    prompt = torch.tensor([tok.encode("ROMEO: But soft")[:5]])
    scfg = SamplerConfig(steps=8, gen_length=8, block_length=8, temperature=0.0)
    want = generate(logits_fn_for(model, tok.vocab_size, shift=True), prompt, tok.mask_id, scfg, eos_id=tok.eot_id,
                    suppress_ids=(tok.pad_id,))
    got = _load_hf(out).generate(prompt, gen_length=8, steps=8)
    assert torch.equal(got, want)
    # the Fast-dLLM cache reads token i from output i-1 too (its window starts one position early)
    for cache in ("prefix", "dual"):
        scfg = SamplerConfig(steps=8, gen_length=8, block_length=4, temperature=0.0, cache=cache)
        want = generate(logits_fn_for(model, tok.vocab_size, shift=True), prompt, tok.mask_id, scfg, eos_id=tok.eot_id,
                        suppress_ids=(tok.pad_id,))
        assert torch.equal(_load_hf(out).generate(prompt, gen_length=8, steps=8, block_length=4, cache=cache), want), cache
    # guidance: the unconditional row keeps token 0 (a shifted model never sees it masked)
    scfg = SamplerConfig(steps=8, gen_length=8, block_length=8, temperature=0.0, cfg_scale=1.0)
    want = generate(logits_fn_for(model, tok.vocab_size, shift=True), prompt, tok.mask_id, scfg, eos_id=tok.eot_id,
                    suppress_ids=(tok.pad_id,))
    assert torch.equal(_load_hf(out).generate(prompt, gen_length=8, steps=8, cfg_scale=1.0), want)


# ---------------------------------------------------------------------------------------
# GGUF files (llama.cpp itself: test_gguf_llamacpp.py)


def test_gguf_metadata_and_reference_forward(ckpts, tmp_path):
    from gguf import GGUFReader

    x = sample_tokens(8192, 1, B=1)
    ref = framework_logits(ckpts["tp2"], x)[0, :, :8192]
    tol = {"f32": 1e-4, "f16": 5e-3, "q8_0": 0.05}
    for dtype, limit in tol.items():
        f = tmp_path / f"tp2-{dtype}.gguf"
        assert convert("--ckpt", ckpts["tp2"], "--to", "gguf", "--output", f, "--dtype", dtype) == 0
        diff = _max_diff(gguf_reference_logits(f, x[0]), ref)
        print(f"\n[convert] GGUF {dtype}: reference forward (llama.cpp conventions) max |logit diff| = {diff:.2e}")
        assert diff < limit, dtype
    r = GGUFReader(str(tmp_path / "tp2-q8_0.gguf"))
    kv = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.tokens")
          and k not in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert kv["general.architecture"] == "llada"
    assert kv["llada.attention.causal"] is False and kv["diffusion.shift_logits"] is False
    assert (kv["llada.attention.head_count"], kv["llada.attention.head_count_kv"], kv["llada.block_count"]) == (4, 2, 2)
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert (kv["tokenizer.ggml.mask_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (1, 0, 2)
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 8192
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


# ---------------------------------------------------------------------------------------
# Reshard


def test_reshard_any_layout_bit_exact_and_trainer_resumes(ckpts, tmp_path):
    from safetensors import safe_open

    from dlm_megatron.checkpoint import load_full_state_dict, read_meta, resolve

    src = resolve(ckpts["tp2"])
    want = load_full_state_dict(src)
    chain = [(src, None), (tmp_path / "tp1pp2", (1, 2)), (tmp_path / "tp2pp2", (2, 2)), (tmp_path / "tp1pp1", (1, 1))]
    for (prev, _), (dst, (tp, pp)) in zip(chain, chain[1:]):
        assert convert("reshard", "--ckpt", prev, "--output", dst, "--tp", tp, "--pp", pp) == 0
        ck = resolve(dst)
        meta = read_meta(ck)
        assert meta["layout"]["tp"] == tp and meta["layout"]["pp"] == pp and meta["engine"] is None
        assert meta["step"] == 2 and (meta["config"]["parallel"]["tp"], meta["config"]["parallel"]["pp"]) == (tp, pp)
        assert sorted(p.name for p in (ck / "model").iterdir()) == sorted(f"tp{t}_pp{p}.safetensors" for t in range(tp) for p in range(pp))
        got = load_full_state_dict(ck)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[n], want[n]) for n in want), dst
    with safe_open(str(resolve(tmp_path / "tp1pp2") / "model" / "tp0_pp1.safetensors"), "pt") as fh:
        last = set(fh.keys())
    assert "output_layer.weight" in last and "decoder.final_layernorm.weight" in last
    assert not any(n.startswith(("embedding.", "decoder.layers.0.")) for n in last)

    # The trainer continues from a weights-only checkpoint at its step (fresh optimizer).
    out = tmp_path / "tp1pp1"
    p = run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *TRAIN_OVERRIDES, "model.num_query_groups=2",
             "train.steps=3", f"train.output_dir={out}"], timeout=600)
    assert "initialised weights from" in p.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"

    bad = convert_cli("reshard", "--ckpt", ckpts["tp2"], "--output", tmp_path / "bad", "--tp", "3", "--pp", "1")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "tp=3" in bad.stderr


# ---------------------------------------------------------------------------------------
# HF import


def _tiny_hf(kind: str, out: Path, dtype=torch.float32, **over):
    """A random tiny Llama / Qwen2 checkpoint with our tokenizer; norms randomised."""
    import transformers

    cls_cfg, cls_model = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[kind]
    kw = dict(vocab_size=8200, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(0)
    model = getattr(transformers, cls_model)(getattr(transformers, cls_cfg)(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):  # transformers starts them at 0
                p.uniform_(-0.5, 0.5)
    model.to(dtype).save_pretrained(str(out))
    shutil.copyfile(BUILTIN_TOKENIZER, out / "tokenizer.json")
    return model.float().eval()


def test_import_llama_tp2_pp2_causal_logits_and_bit_exact_round_trip(tmp_path):
    from safetensors.torch import load_file

    from dlm_megatron.checkpoint import read_meta, resolve

    hf_dir = tmp_path / "llama"
    ref_model = _tiny_hf("llama", hf_dir)
    imp = tmp_path / "imported"
    assert convert("--from-hf", hf_dir, "--output", imp, "--tp", "2", "--pp", "2") == 0
    meta = read_meta(resolve(imp))
    assert meta["engine"] is None and meta["step"] == 0 and meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    assert meta["vocab_size"] == 8200 and meta["config"]["model"]["num_query_groups"] == 2
    assert meta["config"]["diffusion"]["objective"] == "ar"
    assert len(list((resolve(imp) / "model").glob("*.safetensors"))) == 4

    x, want = _import_matches_hf(imp, ref_model, "HF Llama import: framework causal logits vs transformers LlamaForCausalLM")

    back = tmp_path / "back"
    assert convert("--ckpt", imp, "--to", "hf-llama", "--output", back) == 0
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())

    # bf16 source: the round trip restores bf16 bit for bit.
    hf16 = tmp_path / "llama_bf16"
    _tiny_hf("llama", hf16, dtype=torch.bfloat16)
    assert convert("--from-hf", hf16, "--output", tmp_path / "imp16") == 0
    assert convert("--ckpt", tmp_path / "imp16", "--to", "hf-llama", "--output", tmp_path / "back16") == 0
    a, b = load_file(str(hf16 / "model.safetensors")), load_file(str(tmp_path / "back16" / "model.safetensors"))
    assert all(b[n].dtype == torch.bfloat16 and torch.equal(a[n], b[n]) for n in a)

    # A framework-native causal checkpoint (no imported config) exports to a loadable Llama.
    assert type(_export_native_causal(imp, tmp_path / "native", x, want)).__name__ == "LlamaForCausalLM"


def test_import_wide_heads_tp2_causal_logits_and_export(tmp_path):
    """Heads wider than hidden / heads (Qwen3-style head_dim: 4 heads of 32 on a 64-wide
    model, with Qwen2's q/k/v biases of width heads x head_dim) import as model.kv_channels,
    at TP2 with the causal logits of transformers' model, and export back (--to hf-llama,
    head_dim in config.json) bit for bit and, as if trained here, to a loadable model."""
    from safetensors.torch import load_file

    from dlm_megatron.checkpoint import read_meta, resolve

    hf_dir = tmp_path / "qwen2"
    ref_model = _tiny_hf("qwen2", hf_dir, head_dim=32, initializer_range=0.1)
    assert ref_model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    imp = tmp_path / "imported"
    assert convert("--from-hf", hf_dir, "--output", imp, "--tp", "2") == 0
    assert read_meta(resolve(imp))["config"]["model"]["kv_channels"] == 32
    x, want = _import_matches_hf(imp, ref_model, "HF Qwen2 import, head_dim 32 on hidden 64: framework vs transformers")
    back = tmp_path / "back"
    assert convert("--ckpt", imp, "--to", "hf-llama", "--output", back) == 0
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((back / "config.json").read_text())["head_dim"] == 32
    assert type(_export_native_causal(imp, tmp_path / "native", x, want)).__name__ == "Qwen2ForCausalLM"
    # as a denoiser: Qwen2's biases make it a dream GGUF, whose llama.cpp graph has n_embd-wide q
    assert convert("--from-hf", hf_dir, "--output", tmp_path / "dream", "--objective", "masked") == 0
    from dlm_megatron.convert import ConvertError
    from dlm_megatron.convert.gguf import export_gguf

    with pytest.raises(ConvertError, match=r"dream graph needs heads x head width = hidden size.*4 x 32 = 128 != 64"):
        export_gguf(tmp_path / "dream", tmp_path / "d.gguf", show_progress=False)
    assert not (tmp_path / "d.gguf").exists()

    # A Llama with the same heads as a masked denoiser: llada GGUF with the head width as
    # attention.key_length / value_length; llama.cpp's conventions give the framework's logits.
    from gguf import GGUFReader

    _tiny_hf("llama", tmp_path / "llama", head_dim=32, initializer_range=0.1)
    dlm = tmp_path / "llada"
    assert convert("--from-hf", tmp_path / "llama", "--output", dlm, "--objective", "masked") == 0
    f = tmp_path / "llada.gguf"
    assert convert("--ckpt", dlm, "--to", "gguf", "--output", f) == 0
    kv = {k: v.contents() for k, v in GGUFReader(str(f)).fields.items() if k.startswith("llada.")}
    assert (kv["llada.attention.key_length"], kv["llada.attention.value_length"], kv["llada.rope.dimension_count"]) == (32, 32, 32)
    diff = _max_diff(gguf_reference_logits(f, x[0]), framework_logits(dlm, x)[0, :, :8200])
    print(f"\n[convert] llada GGUF, head_dim 32 on hidden 64: reference forward vs framework max |diff| = {diff:.2e}")
    assert diff < 1e-4


def _export_native_causal(imp: Path, out: Path, x: torch.Tensor, want: torch.Tensor):
    """Forget where an imported checkpoint came from (as if trained here), export it with
    --to hf-llama, load it with AutoModelForCausalLM and compare logits; returns the model."""
    from transformers import AutoModelForCausalLM

    from dlm_megatron.checkpoint import resolve

    meta_file = resolve(imp) / "meta.json"
    m = json.loads(meta_file.read_text())
    m.pop("source")
    meta_file.write_text(json.dumps(m))
    assert convert("--ckpt", imp, "--to", "hf-llama", "--output", out) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert _max_diff(model(x).logits, want) < 1e-4
    return model


def test_import_qwen2_biases_tp2_pp2_round_trip_and_diffusion_exports(tmp_path):
    """A Qwen2 checkpoint with real (nonzero) q/k/v biases: imported at TP2 x PP2 its causal
    logits equal Qwen2ForCausalLM's; --to hf-llama writes it back as Qwen2 bit for bit; as a
    masked-diffusion start point it exports to HF (include_qkv_bias) and to a llama.cpp
    ``dream`` GGUF (llada has no bias tensors) whose reference forward matches."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from dlm_megatron.checkpoint import load_full_state_dict, read_meta, resolve
    from dlm_megatron.config import from_dict
    from dlm_megatron.planner import model_dims, param_counts

    hf_dir = tmp_path / "qwen2"
    ref_model = _tiny_hf("qwen2", hf_dir, initializer_range=0.1)  # peaked attention: rope/bias layout errors show
    biases = {n: p for n, p in ref_model.named_parameters() if n.endswith("proj.bias")}
    assert len(biases) == 6 and all(float(p.abs().min()) > 0 for p in biases.values())
    imp = tmp_path / "imported"
    assert convert("--from-hf", hf_dir, "--output", imp, "--tp", "2", "--pp", "2") == 0
    meta = read_meta(resolve(imp))
    assert meta["config"]["model"]["add_qkv_bias"] is True and meta["source"]["format"] == "hf-qwen2"

    x = sample_tokens(8192, 1)
    with torch.no_grad():
        want = ref_model(x).logits
        for p in biases.values():
            p.zero_()
        without_bias = ref_model(x).logits
    diff = _max_diff(framework_logits(imp, x)[..., :8200], want)
    print(f"\n[convert] HF Qwen2 (nonzero q/k/v biases) import at TP2xPP2: causal logits vs Qwen2ForCausalLM "
          f"max |diff| = {diff:.2e} (biases move logits by {_max_diff(want, without_bias):.2f})")
    assert diff < 1e-4 and _max_diff(want, without_bias) > 1e-2

    # The planner counts the biases: same total as the checkpoint holds.
    cfg = from_dict(meta["config"])
    full = load_full_state_dict(resolve(imp))
    assert param_counts(model_dims(cfg, meta["vocab_size"]))["total"] == sum(t.numel() for t in full.values())

    back = tmp_path / "back"
    assert convert("--ckpt", imp, "--to", "hf-llama", "--output", back) == 0
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b) and any(n.endswith("q_proj.bias") for n in b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())

    # As the start of AR -> diffusion adaptation: masked objective, HF and GGUF exports.
    dlm = tmp_path / "dlm"
    assert convert("--from-hf", hf_dir, "--output", dlm, "--objective", "masked") == 0
    ref = framework_logits(dlm, x)
    out = tmp_path / "hf_dlm"
    assert convert("--ckpt", dlm, "--to", "hf", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["include_qkv_bias"] is True
    with torch.no_grad():
        got = _load_hf(out)(x).logits
    diff_hf = _max_diff(got, ref)
    gguf_file = tmp_path / "dlm.gguf"
    assert convert("--ckpt", dlm, "--to", "gguf", "--output", gguf_file) == 0
    r = GGUFReader(str(gguf_file))
    assert r.fields["general.architecture"].contents() == "dream"
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= {t.name for t in r.tensors}
    diff_gguf = _max_diff(gguf_reference_logits(gguf_file, x[0]), ref[0, :, :8200])
    print(f"[convert] Qwen2-initialised masked denoiser: HF export {diff_hf:.2e}, dream GGUF reference forward {diff_gguf:.2e}")
    assert diff_hf < 1e-4 and diff_gguf < 1e-4

    # Training continues from it with the biases (train.init_from), and refuses to drop them.
    new_run = tmp_path / "adapt"
    train = [PY, "-m", "dlm_megatron.train", str(dlm / "config.yaml"), *TRAIN_OVERRIDES, "train.steps=2",
             "model.vocab_size=8200", "model.num_query_groups=2", f"train.init_from={dlm}", f"train.output_dir={new_run}"]
    p = run(train, timeout=600)
    assert "initialised weights from" in p.stdout
    name = "decoder.layers.1.self_attention.linear_qkv.bias"
    before, after = load_full_state_dict(resolve(dlm))[name], load_full_state_dict(resolve(new_run))[name]
    assert after.abs().min() > 0 and 0 < _max_diff(after, before) < 0.1  # started from the biases, then trained
    p = run(train[:-1] + [f"train.output_dir={tmp_path / 'nobias'}", "model.add_qkv_bias=false"], check=False, timeout=300)
    assert p.returncode == 2 and "model.add_qkv_bias=true" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]

    # A framework-native checkpoint with biases (no imported config) exports to a loadable Qwen2.
    assert type(_export_native_causal(imp, tmp_path / "native", x, want)).__name__ == "Qwen2ForCausalLM"


def test_import_refuses_nonzero_output_projection_bias(tmp_path):
    """Llama's attention_bias=True also puts a bias on o_proj, which the framework lacks."""
    hf_dir = tmp_path / "llama_bias"
    model = _tiny_hf("llama", hf_dir, attention_bias=True)
    assert convert("--from-hf", hf_dir, "--output", tmp_path / "ok") == 0  # o_proj bias all zero: exact
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias.fill_(0.1)
    model.save_pretrained(str(hf_dir))
    p = convert_cli("--from-hf", hf_dir, "--output", tmp_path / "imp2")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "o_proj.bias" in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------
# CLI surface


def test_cli_help_and_one_line_errors(ckpts, tmp_path, capsys):
    h = convert_cli("--help")
    assert h.returncode == 0
    for flag in ("--ckpt", "--from-hf", "--to", "--output", "--dtype", "--max-shard-size", "--tokenizer-pre", "--tp", "--pp",
                 "--tokenizer", "--objective", "--seq-len", "--overwrite", "--quiet", "reshard"):
        assert flag in h.stdout, flag
    h = convert_cli("reshard", "--help")
    for flag in ("--ckpt", "--output", "--tp", "--pp", "--overwrite", "--quiet"):
        assert flag in h.stdout, flag
    p = convert_cli("--ckpt", tmp_path / "nope", "--to", "hf", "--output", tmp_path / "o0")  # the real process
    assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.strip().count("\n") == 0, p.stderr
    assert "does not exist" in p.stderr and p.stdout == ""

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (["--ckpt", ckpts["masked"], "--to", "gguf", "--output", tmp_path / "o.gguf", "--dtype", "float32"], "GGUF type"),
        (["--ckpt", ckpts["masked"], "--to", "hf", "--output", busy], "--overwrite"),
        (["--ckpt", ckpts["masked"], "--to", "hf-llama", "--output", tmp_path / "o2"], "causal"),
        (["--ckpt", ckpts["masked"], "--output", tmp_path / "o3"], "--to"),
        (["--ckpt", ckpts["masked"], "--to", "hf", "--output", tmp_path / "o4", "--max-shard-size", "big"], "max-shard-size"),
        (["--from-hf", tmp_path, "--output", tmp_path / "o5"], "config.json"),
        (["reshard", "--ckpt", ckpts["masked"], "--output", tmp_path / "o6", "--tp", "1"], "--pp"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        try:
            rc = convert(*args)
        except SystemExit as e:  # argparse errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert err.startswith("error:") and err.strip().count("\n") == 0 and needle in err, (args, err)
    assert (busy / "x").is_file()  # a refused export leaves the folder alone
