"""Unit tests of the data layer's scale features (CPU only, ~30-60 s on 2 cores).

Covers: Parquet / .zst inputs and their bad-record counting; the tiktoken ranks-file
tokenizer; resuming an interrupted tools/shard.py run (killed midway) to byte-identical
output; weighted blends from the config; document-boundary masks; streaming WebDataset
shards from pipe: URLs. (What each DP rank feeds, at any DP size: tests/unit/test_dp_feed.py.)
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlm_megatron.config import Config
from dlm_megatron.data import (
    BlendedDataset,
    DataError,
    PackedDataset,
    load_tokenizer,
    open_shards,
    write_shards,
)
from dlm_megatron.data import corpus as corpus_mod
from dlm_megatron.data.loader import (
    build_train_dataset,
    document_mask,
    parse_blend,
    with_document_mask,
)
from dlm_megatron.data.shards import resume_point
from dlm_megatron.data.wds import manifest_urls, stream_documents

REPO = Path(__file__).resolve().parents[2]
SHARD = REPO / "tools" / "shard.py"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SHARD), "--no-progress", *args],
                          capture_output=True, text=True, cwd=REPO, **kw)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def paragraphs():
    """Paragraphs of a few short works: many small documents."""
    docs = sorted(corpus_mod.load_builtin_documents("all"), key=lambda d: len(d["text"]))[:4]
    return [p for d in docs for p in d["text"].split("\n\n") if p.strip()]


# --- inputs: Parquet, .zst ---------------------------------------------------------------

def test_parquet_and_zst_match_jsonl(tmp_path, paragraphs):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstd = pytest.importorskip("zstandard")
    texts = paragraphs[:300]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "a.jsonl").write_text(jsonl)
    (tmp_path / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(jsonl.encode()))
    # Parquet with two bad rows (null, invalid UTF-8 in a binary column) and small row groups.
    pq.write_table(pa.table({"text": texts + [None], "n": list(range(len(texts) + 1))}),
                   tmp_path / "a.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": pa.array([b"\xff\xfe", texts[0].encode()], pa.binary())}),
                   tmp_path / "b.parquet")
    outs = {}
    for name in ("a.jsonl", "a.jsonl.zst", "a.parquet"):
        out = tmp_path / f"out-{name}"
        result = _cli("--input", str(tmp_path / name), "--output", str(out),
                      "--shard-tokens", "3000")
        assert result.returncode == 0, result.stderr
        outs[name] = {k: v for k, v in _files(out).items() if k != "manifest.json"}
    assert outs["a.jsonl"] == outs["a.jsonl.zst"] == outs["a.parquet"]
    assert "1 bad records" in result.stdout and "is null" in result.stderr
    result = _cli("--input", str(tmp_path / "b.parquet"), "--output", str(tmp_path / "ob"))
    assert result.returncode == 0 and "1 bad records" in result.stdout
    assert "not UTF-8" in result.stderr
    # One-line errors: missing column, corrupt .zst, not a Parquet file.
    (tmp_path / "bad.zst").write_bytes(b"not zstd")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    for args, want in ((["--input", str(tmp_path / "a.parquet"), "--field", "body"], "no column"),
                       (["--input", str(tmp_path / "bad.zst")], "cannot read input"),
                       (["--input", str(tmp_path / "bad.parquet")], "not a readable Parquet")):
        result = _cli(*args, "--output", str(tmp_path / "o-err"))
        assert result.returncode == 2, result.stderr
        assert want in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- tiktoken ranks file -----------------------------------------------------------------

def test_tiktoken_ranks_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    # A tiny byte-level ranks file: all 256 bytes, then a few merges.
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"in"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.eot_id, tok.mask_id, tok.pad_id) == (263, 260, 261, 262)
    ids = tok.encode("the thin the <|endoftext|>")
    assert 258 in ids and 259 in ids and max(ids) < 260  # special text stays ordinary bytes
    assert tok.decode(ids) == "the thin the <|endoftext|>"
    assert tok.encode_batch(["the", "in"]) == [[257], [259]]
    assert tok.decode([257, tok.mask_id], skip_special=True) == "the"
    assert load_tokenizer(path).sha256 == tok.sha256
    # shard.py with a .tiktoken tokenizer (also exercises the worker processes' reload).
    (tmp_path / "in.txt").write_text("the thin the\nin the\n")
    result = _cli("--input", str(tmp_path / "in.txt"), "--tokenizer", str(path), "--workers",
                  "2", "--docs-per-line", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    store = open_shards(tmp_path / "out", expected_tokenizer_sha=tok.sha256)
    assert [tok.decode(d) for d in store] == ["the thin the", "in the"]
    path.write_text("!!! x\n")
    with pytest.raises(DataError, match="not a tiktoken ranks line"):
        load_tokenizer(path)
    gpt2 = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "whisper" / "assets" / "gpt2.tiktoken"
    if gpt2.is_file():  # the real GPT-2 ranks (openai-whisper's MIT asset), if installed
        g = load_tokenizer(gpt2)
        assert (g.vocab_size, g.eot_id) == (50259, 50256)
        assert g.encode("Hello world") == [15496, 995]


# --- resume ------------------------------------------------------------------------------

def test_shard_resume_after_kill_is_byte_identical(tmp_path, paragraphs):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs))
    common = ["--input", str(src), "--shard-tokens", "1500", "--format", "wds"]
    ref = tmp_path / "ref"
    assert _cli(*common, "--output", str(ref)).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SHARD), "--no-progress", *common,
                             "--output", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    progress = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob(".out.partial-*/.progress.json"))
        if found:
            progress = found[0]
            os.kill(proc.pid, signal.SIGKILL)  # die hard, mid-shard: no cleanup runs
            break
        time.sleep(0.005)
    proc.wait()
    assert progress is not None and not out.exists(), "run finished before it could be killed"
    state = json.loads(progress.read_text())
    assert state["docs_consumed"] > 0 and state["records"]
    # Rerunning the same command resumes and gives byte-identical output.
    result = _cli(*common, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"resumed after {state['docs_consumed']} docs" in result.stdout
    assert _files(out) == _files(ref)
    assert not list(tmp_path.glob(".out.partial-*"))  # build directory consumed


def test_write_shards_resume_in_process(tmp_path, tok, paragraphs):
    docs = [np.asarray(ids, np.uint16) for ids in tok.encode_batch(paragraphs[:200])]
    ref = write_shards(docs, tmp_path / "ref", tok, "megatron", 800)
    key = "k" * 64

    def interrupted():
        for i, d in enumerate(docs):
            if i == 120:
                raise KeyboardInterrupt
            yield d

    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), tmp_path / "out", tok, "megatron", 800, resume_key=key)
    skip = resume_point(tmp_path / "out", key)
    assert 0 < skip <= 120
    assert resume_point(tmp_path / "out", "x" * 64) == 0  # another command: nothing to resume
    manifest = write_shards(docs[skip:], tmp_path / "out", tok, "megatron", 800, resume_key=key)
    assert manifest == ref
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


# --- loader: blends, document masks, DP independence -------------------------------------

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tok, paragraphs):
    root = tmp_path_factory.mktemp("src")
    docs = [np.asarray(ids, np.uint16) for ids in tok.encode_batch(paragraphs)]
    half = len(docs) // 2
    write_shards(docs[:half], root / "a", tok, "megatron", 5000)
    write_shards(docs[half:], root / "b", tok, "wds", 5000)
    return root / "a", root / "b"


def test_blend_from_config(two_sources, tok, tmp_path):
    a, b = two_sources
    assert parse_blend("builtin:shakespeare/train") is None and parse_blend(str(a)) is None
    assert parse_blend(f"0.7:{a}, 0.3:{b}") == [(0.7, str(a)), (0.3, str(b))]
    with pytest.raises(DataError, match="WEIGHT:PATH"):
        parse_blend(f"0.7:{a},{b}")
    cfg = Config()
    cfg.data.seq_len = 32
    cfg.data.train_path = f"3:{a},1:{b}"
    ds = build_train_dataset(cfg, tok, tmp_path)
    assert isinstance(ds, BlendedDataset)
    ks = np.array([ds.locate(i)[0] for i in range(len(ds))])
    assert abs(ks.mean() - 0.25) < 0.01  # 3:1 weights
    pa = PackedDataset(a, 32, tok.eot_id)
    k, j = ds.locate(5)
    assert np.array_equal(ds[5], ds.datasets[k][j])
    cfg.data.train_path = str(a)
    single = build_train_dataset(cfg, tok, tmp_path)
    assert isinstance(single, PackedDataset) and len(single) == len(pa)
    cfg.data.document_masks = True  # wired into the trainer (tests/e2e): the dataset still builds
    assert isinstance(build_train_dataset(cfg, tok, tmp_path), PackedDataset)
    cfg.data.document_masks = False
    cfg.data.train_path = f"1:{tmp_path / 'missing'}"
    with pytest.raises(DataError, match="does not exist"):
        build_train_dataset(cfg, tok, tmp_path)


def test_segment_ids_and_document_mask(two_sources, tok):
    ds = PackedDataset(two_sources[0], 64, tok.eot_id)
    for i in range(min(len(ds), 50)):
        sample, seg = ds[i], ds.segment_ids(i)
        # A new segment starts exactly after each EOT (except one in the last position).
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert np.array_equal(starts, np.flatnonzero(sample[:-1] == tok.eot_id) + 1)
        assert seg[0] == 0
    seg = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    m = document_mask(seg)
    assert m.shape == (2, 1, 5, 5) and m.dtype == bool
    assert not m[1].any() and m[0, 0, 0, 2] and m[0, 0, 3, 1] and not m[0, 0, 4, 2]
    mc = document_mask(seg, causal=True)
    assert mc[1, 0, 0, 1] and not mc[1, 0, 1, 0] and mc[0, 0, 2, 1]
    torch = pytest.importorskip("torch")
    assert torch.equal(document_mask(torch.from_numpy(seg)), torch.from_numpy(m))
    # Combined with an objective's own mask, cut to a shortened batch (random length).
    own = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    own[..., 0, 3] = True
    got = with_document_mask(own, seg, 4)
    assert got.shape == (2, 1, 4, 4) and got[0, 0, 0, 2] and got[1, 0, 0, 3] and not got[1, 0, 0, 2]
    assert torch.equal(with_document_mask(None, seg, 5, causal=True), torch.from_numpy(mc))


# --- streaming WebDataset shards ---------------------------------------------------------

def test_stream_wds_from_pipe_urls(two_sources):
    store = open_shards(two_sources[1])
    urls = [f"pipe:cat {u}" for u in manifest_urls(two_sources[1])]
    assert len(urls) > 1
    streamed = list(stream_documents(urls, dtype=store.dtype))
    assert len(streamed) == store.num_docs
    assert all(np.array_equal(a, b) for a, b in zip(streamed, store))
    assert sum(1 for _ in stream_documents(two_sources[1])) == store.num_docs  # a directory
    with pytest.raises(DataError, match="exited with status"):
        list(stream_documents(["pipe:cat /nonexistent/shard.tar 2>/dev/null"]))
    with pytest.raises(DataError, match="megatron shards"):
        manifest_urls(two_sources[0])
