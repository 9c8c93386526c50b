"""GGUF export checked with a real llama.cpp (llama-cpp-python's low-level API).

llama-cpp-python is source-only on PyPI, so the built wheel is cached in
``~/.cache/dlm_megatron/wheels/`` (``DLM_WHEEL_CACHE``). This test installs it from there when
``llama_cpp`` is not importable; with an empty cache it builds the wheel first (one time per
machine, one line announcing it with the expected time): only libllama and ggml, on every core
(about 3 minutes on 2 cores; the package's default build, with llama.cpp's common and
multimodal libraries, took about 10). It skips with the reason only if that build is impossible
(no C/C++ compiler, no package index); ``DLM_SKIP_LLAMA_CPP_BUILD=1`` skips instead of
building. Under ``CI=true`` such a skip is a failure (tests/ci_strict.py).

The check: a tiny masked-diffusion checkpoint (GQA, norms randomised) exported as f32 and
q8_0 GGUF; llama.cpp must load it as a diffusion model (``llama_model_is_diffusion``) with
our mask token, non-shifted logits and our tokenizer (same token ids for a sample text),
and its logits (one ``llama_decode`` of a whole sequence, n_ubatch >= n_tokens, flash
attention off) must equal the framework's: f32 within 1e-3, q8_0 within 0.05.

llama.cpp runs in a child process (this file's ``__main__``), so a native crash fails the
test instead of killing the test session.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_VERSION = "0.3.36"
REPO_ROOT = Path(__file__).resolve().parents[2]
# A machine-level cache (outside the checkout) so every clone on this machine, CI's fresh
# clone included, reuses one build; DLM_WHEEL_CACHE overrides.
WHEEL_DIR = Path(os.environ.get("DLM_WHEEL_CACHE", Path.home() / ".cache" / "dlm_megatron" / "wheels"))
pytestmark = pytest.mark.e2e


# ---------------------------------------------------------------------------------------
# Child process: run llama.cpp on one GGUF file


def llama_cpp_run(gguf_path: str, tokens: list[int], text: str) -> dict:
    """Load a GGUF with llama.cpp, decode ``tokens`` in one batch, return logits and facts."""
    import ctypes

    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(gguf_path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    vocab = L.llama_model_get_vocab(model)
    buf = ctypes.create_string_buffer(64)
    L.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
    arch = buf.value.decode()
    L.llama_model_meta_val_str(model, b"diffusion.shift_logits", buf, 64)
    shift = buf.value.decode()
    n_vocab = L.llama_vocab_n_tokens(vocab)
    raw = text.encode()
    ids = (L.llama_token * (len(raw) + 8))()
    n_ids = L.llama_tokenize(vocab, raw, len(raw), ids, len(raw) + 8, False, False)

    n = len(tokens)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(n, 32)  # the llada graph needs n_ubatch >= n_tokens
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.n_threads = cp.n_threads_batch = 2
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    L.llama_set_causal_attn(ctx, False)  # as llama.cpp's diffusion example does
    batch = L.llama_batch_init(n, 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, True
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    logits = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in range(n)])
    facts = {"arch": arch, "is_diffusion": bool(L.llama_model_is_diffusion(model)), "mask_id": int(L.llama_vocab_mask(vocab)),
             "eos_id": int(L.llama_vocab_eos(vocab)), "n_vocab": int(n_vocab), "shift_logits": shift,
             "tokens": [int(ids[i]) for i in range(n_ids)] if n_ids >= 0 else None}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {"facts": facts, "logits": logits}


def _child_main(argv: list[str]) -> int:
    gguf_path, request, out = argv
    req = json.loads(Path(request).read_text())
    res = llama_cpp_run(gguf_path, req["tokens"], req["text"])
    np.save(out + ".npy", res["logits"])
    Path(out + ".json").write_text(json.dumps(res["facts"]))
    return 0


# ---------------------------------------------------------------------------------------
# Getting llama-cpp-python


def _say(request, msg: str) -> None:
    """A line on the terminal even while pytest captures output (fd-level capture would
    otherwise swallow the terminal reporter's own writes until the test ends)."""
    rep = request.config.pluginmanager.get_plugin("terminalreporter") if request is not None else None
    capman = request.config.pluginmanager.get_plugin("capturemanager") if request is not None else None
    if rep is None:
        print(f"[test_gguf_llamacpp] {msg}", file=sys.stderr, flush=True)
        return
    if capman is not None:
        with capman.global_and_fixture_disabled():
            rep.write_line(f"[test_gguf_llamacpp] {msg}")
            rep.flush()
    else:
        rep.write_line(f"[test_gguf_llamacpp] {msg}")


def _importable() -> bool:
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    return r.returncode == 0


# The one line of llama-cpp-python's CMakeLists.txt that forces llama.cpp's "common" library
# (argument parsing, chat templates, JSON: about 27k lines of heavy C++) into the build. The
# Python bindings load only libllama and ggml, so the build turns it off.
_COMMON_FORCED_ON = 'set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
# Measured: 172 s for the library-only build on 2 cores (2026-12); the full default build
# (common, mtmd, all targets) took 585 s on the same machine.
_BUILD_CORE_SECONDS = 350


def build_wheel(request, log: Path) -> list[str]:
    """Build the llama-cpp-python wheel with only the library the tests call: libllama and
    ggml's CPU backend. Off: llama.cpp's common library, the multimodal mtmd library
    (LLAVA_BUILD), examples, tools, server and tests (already off when llama.cpp is a
    subproject). Every core compiles. Returns the built wheels."""
    import tarfile
    import tempfile

    cores = os.cpu_count() or 2
    _say(request, f"building llama.cpp's library for llama-cpp-python=={LLAMA_CPP_VERSION} (one time per machine; "
                  f"expected about {max(1, round(_BUILD_CORE_SECONDS / cores / 60))} min on {cores} cores; log: {log}); "
                  f"the wheel is cached in {WHEEL_DIR}")
    with tempfile.TemporaryDirectory() as tmp, open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", tmp], stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
        sdists = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            return []
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
        cmake = src / "CMakeLists.txt"
        text = cmake.read_text()
        if _COMMON_FORCED_ON not in text:
            fh.write(f"\n{cmake} no longer forces LLAMA_BUILD_COMMON on: building it as shipped\n")
        cmake.write_text(text.replace(_COMMON_FORCED_ON, _COMMON_FORCED_ON.replace(" ON ", " OFF ")))
        cmake_args = " ".join(["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", os.environ.get("CMAKE_ARGS", "")]).strip()
        env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(cores))
        fh.flush()
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(WHEEL_DIR)],
                       env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=3 * 3600)
    return sorted(glob.glob(str(WHEEL_DIR / f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl")))


def ensure_llama_cpp(request) -> None:
    """Make llama_cpp importable: installed, or from the cached wheel, or built once. Setup
    problems are skips with the reason; under CI=true tests/ci_strict.py fails them."""
    if _importable():
        return
    wheels = sorted(glob.glob(str(WHEEL_DIR / f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl")))
    if not wheels:
        if os.environ.get("DLM_SKIP_LLAMA_CPP_BUILD"):
            pytest.skip("llama-cpp-python is not installed, no cached wheel in the wheel cache, and DLM_SKIP_LLAMA_CPP_BUILD is set")
        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            pytest.skip("cannot build llama-cpp-python: no C++ compiler on this machine")
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        log = WHEEL_DIR / f"llama_cpp_python-{LLAMA_CPP_VERSION}-build.log"
        t0 = time.time()
        wheels = build_wheel(request, log)
        if not wheels:
            tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else ["?"]
            pytest.skip(f"building llama-cpp-python failed (see {log}): {tail[0][:200]}")
        _say(request, f"built {Path(wheels[-1]).name} in {time.time() - t0:.0f} s")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", wheels[-1]], capture_output=True, text=True)
    if r.returncode != 0 or not _importable():
        pytest.skip(f"installing {Path(wheels[-1]).name} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------------------
# The test


def _run_in_llama_cpp(tmp_path, run_dir, tokens, text: str, name: str, dtype: str = "f32"):
    """Export ``run_dir`` to GGUF and run ``tokens`` through real llama.cpp in a child process.
    -> (facts the child reports, its logits [S, n_vocab] as numpy)"""
    from test_convert_cli import convert

    req = tmp_path / f"request-{name}.json"
    req.write_text(json.dumps({"tokens": tokens, "text": text}))
    gguf_file = tmp_path / f"{name}.gguf"
    assert convert("--ckpt", run_dir, "--to", "gguf", "--output", gguf_file, "--dtype", dtype) == 0
    out = str(tmp_path / f"llama-{name}")
    p = subprocess.run([sys.executable, __file__, str(gguf_file), str(req), out], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, f"llama.cpp child failed ({p.returncode}):\n{p.stderr[-3000:]}"
    return json.loads(Path(out + ".json").read_text()), np.load(out + ".npy")


def test_gguf_runs_in_llama_cpp_and_matches_framework_logits(request, tmp_path):
    ensure_llama_cpp(request)
    from test_convert_cli import framework_logits, perturb_norms, sample_tokens, train_tiny, wait_all

    from dlm_megatron.data.tokenizer import load_tokenizer

    run_dir = tmp_path / "run"
    wait_all([train_tiny(run_dir, "model.num_query_groups=2")])
    perturb_norms(run_dir)
    tok = load_tokenizer("builtin")
    x = sample_tokens(tok.vocab_size, tok.mask_id, B=1, S=24)
    ref = framework_logits(run_dir, x)[0, :, : tok.vocab_size].numpy()
    text = "ROMEO: But soft, what light through yonder window breaks?\nIt is the east."

    limits = {"f32": 1e-3, "q8_0": 0.05}
    for dtype, limit in limits.items():
        facts, got = _run_in_llama_cpp(tmp_path, run_dir, x[0].tolist(), text, f"model-{dtype}", dtype)
        assert facts["arch"] == "llada" and facts["is_diffusion"], facts
        assert facts["mask_id"] == tok.mask_id and facts["eos_id"] == tok.eot_id, facts
        assert facts["n_vocab"] == tok.vocab_size and facts["shift_logits"] == "false", facts
        assert facts["tokens"] == tok.encode(text), "llama.cpp tokenizes differently from the framework"
        diff = float(np.abs(got - ref).max())
        print(f"\n[gguf/llama.cpp] {dtype}: max |logit diff| vs framework = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
        assert got.shape == ref.shape and diff < limit, (dtype, diff)


def test_qwen2_biased_checkpoint_runs_in_llama_cpp_as_dream(request, tmp_path):
    """A masked denoiser initialised from a Qwen2 checkpoint with nonzero q/k/v biases: llama.cpp's
    llada graph has no bias tensors, so the export is a ``dream`` GGUF (Qwen2-based diffusion, NEOX
    rope, biases). llama.cpp must load it as a diffusion model and match the framework's logits."""
    ensure_llama_cpp(request)
    from test_convert_cli import _tiny_hf, convert, framework_logits, sample_tokens

    from dlm_megatron.data.tokenizer import load_tokenizer

    hf_dir, run_dir = tmp_path / "qwen2", tmp_path / "dlm"
    _tiny_hf("qwen2", hf_dir, initializer_range=0.1)  # peaked attention: a wrong rope layout shows (~2 vs 2e-6)
    assert convert("--from-hf", hf_dir, "--output", run_dir, "--objective", "masked") == 0
    tok = load_tokenizer(run_dir / "tokenizer.json")
    x = sample_tokens(tok.vocab_size, tok.mask_id, B=1, S=24)
    V = 8200  # the Qwen2 config's vocabulary (tokenizer ids + unused rows)
    ref = framework_logits(run_dir, x)[0, :, :V].numpy()
    facts, got = _run_in_llama_cpp(tmp_path, run_dir, x[0].tolist(), "ROMEO: But soft", "dream")
    assert facts["arch"] == "dream" and facts["is_diffusion"] and facts["mask_id"] == tok.mask_id, facts
    assert facts["n_vocab"] == V and facts["shift_logits"] == "false", facts
    diff = float(np.abs(got - ref).max())
    print(f"\n[gguf/llama.cpp] dream (q/k/v biases) f32: max |logit diff| vs framework = {diff:.2e} "
          f"(max |logit| {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape and diff < 1e-3


def test_moe_checkpoint_runs_in_llama_cpp_as_llada_moe(request, tmp_path):
    """A mixture-of-experts denoiser in LLaDA-MoE's layout (per-head q/k norms, MoE in every
    layer, softmax over all experts without top-k renormalisation, NEOX rope) exported as a
    ``llada-moe`` GGUF: llama.cpp loads it as a diffusion model and its logits match the
    framework's within the dense f32 export's limit."""
    ensure_llama_cpp(request)
    from test_convert_cli import framework_logits, perturb_norms, sample_tokens, train_tiny, wait_all

    from dlm_megatron.data.tokenizer import load_tokenizer

    run_dir = tmp_path / "run"
    wait_all([train_tiny(run_dir, "model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=96",
                         "model.qk_layernorm=true", "model.moe_router_pre_softmax=true", "model.moe_aux_loss_coeff=0.01")])
    perturb_norms(run_dir)  # q/k norms included
    tok = load_tokenizer("builtin")
    x = sample_tokens(tok.vocab_size, tok.mask_id, B=1, S=24)
    ref = framework_logits(run_dir, x)[0, :, : tok.vocab_size].numpy()
    facts, got = _run_in_llama_cpp(tmp_path, run_dir, x[0].tolist(), "ROMEO: But soft", "moe")
    assert facts["arch"] == "llada-moe" and facts["is_diffusion"] and facts["mask_id"] == tok.mask_id, facts
    diff = float(np.abs(got - ref).max())
    print(f"\n[gguf/llama.cpp] llada-moe f32: max |logit diff| vs framework = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape and diff < 1e-3


def test_wide_heads_run_in_llama_cpp_as_llada(request, tmp_path):
    """A masked denoiser from a Llama whose heads are wider than hidden / heads (4 heads of 32
    on a 64-wide model, Qwen3-style; model.kv_channels): llama.cpp's llada graph sizes its
    heads from attention.key_length / value_length, loads the file and matches the
    framework's logits. (Its dream and llada-moe graphs take q as n_embd wide: those exports
    are refused, tests/e2e/test_moe_export.py and test_convert_cli.py.)"""
    ensure_llama_cpp(request)
    from test_convert_cli import _tiny_hf, convert, framework_logits, sample_tokens

    from dlm_megatron.data.tokenizer import load_tokenizer

    hf_dir, run_dir = tmp_path / "llama", tmp_path / "dlm"
    _tiny_hf("llama", hf_dir, head_dim=32, initializer_range=0.1)  # peaked attention: a wrong head split shows
    assert convert("--from-hf", hf_dir, "--output", run_dir, "--objective", "masked") == 0
    tok = load_tokenizer(run_dir / "tokenizer.json")
    x = sample_tokens(tok.vocab_size, tok.mask_id, B=1, S=24)
    V = 8200  # the Llama config's vocabulary
    ref = framework_logits(run_dir, x)[0, :, :V].numpy()
    facts, got = _run_in_llama_cpp(tmp_path, run_dir, x[0].tolist(), "ROMEO: But soft", "wide")
    assert facts["arch"] == "llada" and facts["is_diffusion"] and facts["mask_id"] == tok.mask_id, facts
    diff = float(np.abs(got - ref).max())
    print(f"\n[gguf/llama.cpp] llada, head_dim 32 on hidden 64, f32: max |logit diff| vs framework = {diff:.2e} "
          f"(max |logit| {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape and diff < 1e-3


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
