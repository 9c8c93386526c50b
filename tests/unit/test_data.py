"""Unit tests of dlm_megatron.data and the data tools (CPU only, ~30 s).

Covers: tokenizer round trip, special ids and rebuild determinism; corpus asset
determinism and the train/val split; Megatron indexed format compatibility with
megatron-core (both directions); WebDataset compatibility; manifest checks; tools/shard.py
(worker-count independence, error exit codes); packing; global sample order; blending.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dlm_megatron.data import (
    BlendedDataset,
    DataError,
    PackedDataset,
    load_tokenizer,
    open_shards,
    prepare_builtin_corpus,
    resolve_data_path,
    sample_indices,
    write_shards,
)
from dlm_megatron.data import corpus as corpus_mod
from dlm_megatron.data.indexed import IndexedReader, IndexedWriter
from dlm_megatron.data.shards import token_dtype
from dlm_megatron.data.wds import WdsShardReader

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def one_line_error(exc_info) -> str:
    """The message of a raised DataError, asserting it is a single line."""
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def builtin_dirs(tmp_path_factory, tok):
    return prepare_builtin_corpus(tmp_path_factory.mktemp("cache"), tok, verbose=False)


@pytest.fixture(scope="module")
def small_docs(tok):
    """Token arrays of a few short works (fast to shard in every format)."""
    docs = corpus_mod.load_builtin_documents("all")
    texts = [d["text"] for d in sorted(docs, key=lambda d: len(d["text"]))[:6]]
    return [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(texts)]


# --- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_special_ids_and_round_trip(tok):
    assert (tok.eot_id, tok.mask_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 8192
    assert tok.sha256 == hashlib.sha256(Path(tok.path).read_bytes()).hexdigest()
    text = "To be, or not:\n\n  that is the question. Ünïcödé 🙂 <|mask|>\t<|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Special-token strings in raw text are ordinary bytes, never the special ids.
    assert not {tok.eot_id, tok.mask_id, tok.pad_id} & set(ids)
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert tok.decode([tok.mask_id, tok.eot_id]) == "<|mask|><|endoftext|>"
    assert load_tokenizer("builtin").sha256 == tok.sha256


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_tokenizer(tmp_path / "nope.json")
    assert "does not exist" in one_line_error(e)
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(DataError) as e:
        load_tokenizer(bad)
    assert "not a Hugging Face tokenizers JSON" in one_line_error(e)
    from tokenizers import Tokenizer, models

    plain = tmp_path / "plain.json"
    Tokenizer(models.BPE()).save(str(plain))
    with pytest.raises(DataError) as e:
        load_tokenizer(plain)
    assert "<|endoftext|>" in one_line_error(e)


def test_tokenizer_rebuild_is_identical():
    result = subprocess.run([sys.executable, str(TOOLS / "build_tokenizer.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- corpus ------------------------------------------------------------------------------

def test_corpus_asset_is_reproducible():
    """Rebuilding the JSONL from the asset's texts gives the pinned content.

    (Recompressing takes ~5 s, so xz byte-equality is left to `build_corpus.py --check`.)
    """
    sys.path.insert(0, str(TOOLS))
    try:
        import build_corpus
    finally:
        sys.path.remove(str(TOOLS))
    docs = corpus_mod.load_builtin_documents("all")
    assert len(docs) == 42
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    raw = build_corpus.build_jsonl({d["id"] + "_gut.txt": d["text"] for d in docs})
    assert hashlib.sha256(raw).hexdigest() == corpus_mod.CORPUS_SHA256
    assert lzma.decompress(corpus_mod.CORPUS_FILE.read_bytes()) == raw


def test_val_plays_disjoint_from_train():
    train = corpus_mod.load_builtin_documents("train")
    val = corpus_mod.load_builtin_documents("val")
    assert sorted(d["id"] for d in val) == sorted(corpus_mod.VAL_PLAYS)
    assert not {d["id"] for d in train} & {d["id"] for d in val}
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    assert len(train) + len(val) == 42
    share = sum(len(d["text"]) for d in val) / sum(len(d["text"]) for d in train + val)
    assert 0.03 < share < 0.08


def test_builtin_corpus_and_resolve(builtin_dirs, tok, tmp_path):
    train, val = open_shards(builtin_dirs["train"], tok.sha256), open_shards(builtin_dirs["val"])
    assert (train.num_docs, val.num_docs) == (40, 2)
    assert tok.decode(val.document(0)) == corpus_mod.load_builtin_documents("val")[0]["text"]
    cache = Path(builtin_dirs["train"]).parent.parent
    assert resolve_data_path("builtin:shakespeare/val", cache, tok) == builtin_dirs["val"]
    for bad, hint in (("builtin:shakespeare/test", "unknown builtin"),
                      (str(tmp_path / "missing"), "tools/shard.py")):
        with pytest.raises(DataError) as e:
            resolve_data_path(bad, cache, tok)
        assert hint in one_line_error(e)


def test_prepare_builtin_corpus_concurrent(tmp_path, tok, monkeypatch):
    """Two racing callers both succeed, agree, and leave exactly one directory behind."""
    real = corpus_mod.load_builtin_documents
    monkeypatch.setattr(corpus_mod, "load_builtin_documents",
                        lambda split: [d for d in real(split) if len(d["text"]) < 20000]
                        or real(split)[:1])
    results, errors = [], []

    def call():
        try:
            results.append(prepare_builtin_corpus(tmp_path, tok, verbose=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert [p.name for p in tmp_path.iterdir()] == [Path(results[0]["train"]).parent.name]
    assert prepare_builtin_corpus(tmp_path, tok, verbose=False) == results[0]  # idempotent


# --- indexed (Megatron) format -----------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core's own numpy use
def test_indexed_cross_compatible_with_megatron(tmp_path, small_docs):
    torch = pytest.importorskip("torch")
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    with IndexedWriter(tmp_path / "ours", np.uint16) as w:
        for doc in small_docs:
            w.add_document(doc)
    theirs = mi.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(small_docs)
    assert list(theirs.document_indices) == list(range(len(small_docs) + 1))
    for i, doc in enumerate(small_docs):
        np.testing.assert_array_equal(theirs[i], doc)

    # megatron-core's builder, with a two-sequence document, read back by ours.
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    builder.add_item(torch.from_numpy(small_docs[0].astype(np.int64)))
    builder.add_item(torch.from_numpy(small_docs[1].astype(np.int64)))
    builder.end_document()
    builder.add_document(torch.from_numpy(small_docs[2].astype(np.int64)), [len(small_docs[2])])
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedReader(tmp_path / "mc")
    assert (ours.num_sequences, ours.num_documents, ours.dtype) == (3, 2, np.uint16)
    np.testing.assert_array_equal(ours[1], small_docs[1])
    offsets = ours.document_token_offsets()
    np.testing.assert_array_equal(ours.tokens[offsets[0]:offsets[1]],
                                  np.concatenate(small_docs[:2]))
    # Same bytes either way for the one-sequence-per-document case.
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "mc2.bin"), dtype=np.uint16)
    for doc in small_docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "mc2.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mc2{ext}").read_bytes() == (tmp_path / f"ours{ext}").read_bytes()


def test_indexed_corruption_is_detected(tmp_path, small_docs):
    with IndexedWriter(tmp_path / "d", np.uint16) as w:
        for doc in small_docs:
            w.add_document(doc)
    bin_file, idx_file = tmp_path / "d.bin", tmp_path / "d.idx"
    bin_file.write_bytes(bin_file.read_bytes()[:-2])
    with pytest.raises(DataError) as e:
        IndexedReader(tmp_path / "d")
    assert "d.bin" in one_line_error(e)
    idx_file.write_bytes(b"XXXXXXXXX" + idx_file.read_bytes()[9:])
    with pytest.raises(DataError) as e:
        IndexedReader(tmp_path / "d")
    assert "d.idx" in one_line_error(e) and "magic" in str(e.value)


# --- WebDataset format -------------------------------------------------------------------

def test_wds_shards_readable_by_webdataset(tmp_path, tok, small_docs):
    wds = pytest.importorskip("webdataset")
    manifest = write_shards(small_docs, tmp_path / "w", tok, "wds", target_shard_tokens=20000)
    tars = [str(tmp_path / "w" / f"{s['name']}.tar") for s in manifest["shards"]]
    assert len(tars) > 1
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(len(small_docs))]
    for sample, doc in zip(samples, small_docs):
        assert sample["tokens.npy"].dtype == np.uint16
        np.testing.assert_array_equal(sample["tokens.npy"], doc)
    ours = [d for t in tars for d in WdsShardReader(t)]
    assert all(np.array_equal(a, b) for a, b in zip(ours, small_docs))
    # Same documents, same bytes: the archives are deterministic.
    again = write_shards(small_docs, tmp_path / "w2", tok, "wds", target_shard_tokens=20000)
    assert again == manifest


def test_wds_corruption_is_detected(tmp_path, tok, small_docs):
    write_shards(small_docs, tmp_path / "w", tok, "wds")
    tar = tmp_path / "w" / "shard-00000.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        WdsShardReader(tar)
    assert "shard-00000.tar" in one_line_error(e)


# --- shard directories -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["megatron", "wds"])
def test_shard_dir_flat_view(tmp_path, tok, small_docs, fmt):
    write_shards(small_docs, tmp_path / "s", tok, fmt, target_shard_tokens=15000)
    store = open_shards(tmp_path / "s", tok.sha256)
    flat = np.concatenate(small_docs)
    assert (store.num_docs, store.num_tokens) == (len(small_docs), len(flat))
    assert len(store.manifest["shards"]) > 1
    np.testing.assert_array_equal(store.tokens(0, store.num_tokens), flat)
    np.testing.assert_array_equal(store.tokens(9000, 31000), flat[9000:31000])
    for i, doc in enumerate(small_docs):
        np.testing.assert_array_equal(store.document(i), doc)
    assert store.dtype == token_dtype(tok.vocab_size) == np.uint16
    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.int32


def test_shard_dir_errors(tmp_path, tok, small_docs):
    write_shards(small_docs, tmp_path / "s", tok, "megatron")
    with pytest.raises(DataError) as e:
        open_shards(tmp_path / "s", expected_tokenizer_sha="0" * 64)
    msg = one_line_error(e)
    assert "were made with tokenizer sha" in msg and "data.tokenizer" in msg
    with pytest.raises(DataError) as e:
        write_shards(small_docs, tmp_path / "s", tok, "megatron")
    assert "not empty" in one_line_error(e)
    bin_file = tmp_path / "s" / "shard-00000.bin"
    data = bytearray(bin_file.read_bytes())
    data[10] ^= 1
    bin_file.write_bytes(bytes(data))
    open_shards(tmp_path / "s")  # training-time checks: headers, sizes, counts (no content read)
    with pytest.raises(DataError) as e:
        open_shards(tmp_path / "s", verify=True)
    assert "sha256" in one_line_error(e)
    with pytest.raises(DataError) as e:
        write_shards([[], np.array([], dtype=np.uint16)], tmp_path / "empty", tok)
    assert "empty" in one_line_error(e)
    with pytest.raises(DataError) as e:
        write_shards([[tok.vocab_size]], tmp_path / "oov", tok)
    assert "outside the vocabulary" in one_line_error(e)
    with pytest.raises(DataError) as e:
        open_shards(tmp_path / "nowhere")
    assert "tools/shard.py" in one_line_error(e)


# --- tools/shard.py ----------------------------------------------------------------------

def _shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / "shard.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_shard_cli_worker_independent(tmp_path):
    docs = sorted(corpus_mod.load_builtin_documents("all"), key=lambda d: len(d["text"]))[:5]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for d in docs[:3]:
            f.write(json.dumps({"body": d["text"]}) + "\n")
        f.write("{not json\n[1, 2]\n\n")
    with gzip.open(tmp_path / "in" / "b.txt.gz", "wt") as f:
        f.write(docs[3]["text"])
    (tmp_path / "in" / "c.txt").write_text(docs[4]["text"])
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        result = _shard_cli("--input", str(tmp_path / "in" / "*"), "--tokenizer", "builtin",
                            "--output", str(out), "--format", "megatron", "--field", "body",
                            "--workers", workers, "--shard-tokens", "6000")
        assert result.returncode == 0, result.stderr
        assert "2 bad records" in result.stdout and "a.jsonl:4" in result.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    manifest = json.loads(outputs[0]["manifest.json"])
    assert manifest["num_docs"] == 5 and len(manifest["shards"]) > 1


def test_bad_records_skip_is_recorded_and_fail_stops(tmp_path):
    """--on-bad-record skip (default) records the count and first locations in the manifest
    and --verify prints them; fail stops at the first bad record (exit 2, its file:line) and
    leaves neither output nor a partial build directory."""
    (tmp_path / "in").mkdir()
    good = [json.dumps({"text": f"document number {i} " * 20}) for i in range(6)]
    lines = good[:2] + ["{not json", good[2], '{"other": 1}', *good[3:]]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "skip"
    result = _shard_cli("--input", str(tmp_path / "in" / "a.jsonl"), "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    skipped = json.loads((out / "manifest.json").read_text())["source"]["skipped"]
    assert skipped["bad_records"] == 2 and skipped["empty_documents"] == 0
    assert [e.split(": ")[0] for e in skipped["first_bad_records"]] == [f"{tmp_path}/in/a.jsonl:3", f"{tmp_path}/in/a.jsonl:5"]
    result = _shard_cli("--verify", str(out))
    assert result.returncode == 0 and "2 bad records" in result.stdout and "a.jsonl:3" in result.stdout, result.stdout
    for workers in ("1", "2"):
        out = tmp_path / f"fail{workers}"
        result = _shard_cli("--input", str(tmp_path / "in" / "a.jsonl"), "--output", str(out), "--no-progress",
                            "--on-bad-record", "fail", "--workers", workers, "--shard-tokens", "50")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and f"{tmp_path}/in/a.jsonl:3" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists() and not list(tmp_path.glob(f".fail{workers}*")), list(tmp_path.iterdir())


def test_tokenize_texts_chunking_and_workers(tok):
    """Many small chunks (several in flight per worker): same arrays, in order, as encoding
    each text alone, for 1 and 2 workers; empty texts give empty arrays."""
    from dlm_megatron.data.shards import tokenize_texts

    texts = [d["text"][:3000] for d in corpus_mod.load_builtin_documents("all")[:12]]
    texts[3] = ""
    expected = [tok.encode(t) for t in texts]
    for workers in (1, 2):
        got = list(tokenize_texts(iter(texts), tok, workers, chunk_chars=5000, chunk_docs=2))
        assert [g.tolist() for g in got] == expected
        assert all(g.dtype == np.uint16 for g in got)


def test_shard_tool_workers_import_no_numpy():
    """Spawned tokenizer workers import tools/shard.py (as __mp_main__) and the encode_pool
    module; neither may pull in numpy or the rest of the data package (start-up cost)."""
    code = ("import sys, runpy; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            "import dlm_megatron.data.encode_pool; "
            "print(sorted(m for m in ('numpy', 'torch', 'dlm_megatron.data.shards') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(TOOLS / "shard.py")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_shard_cli_errors(tmp_path):
    result = _shard_cli("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "empty.txt").write_text("  \n")
    result = _shard_cli("--input", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- packing, order, blending ------------------------------------------------------------

def test_packed_dataset_matches_reference(builtin_dirs, tok):
    store = open_shards(builtin_dirs["val"])
    stream = np.concatenate([np.append(d.astype(np.int64), tok.eot_id) for d in store])
    ds = PackedDataset(builtin_dirs["val"], 1000, tok.eot_id, tok.sha256)
    assert len(ds) == len(stream) // 1000
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (1000,)
        np.testing.assert_array_equal(sample, stream[i * 1000:(i + 1) * 1000])
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000  # pickled by path, not by content
    np.testing.assert_array_equal(clone[len(ds) - 1], ds[len(ds) - 1])
    with pytest.raises(DataError) as e:
        PackedDataset(builtin_dirs["val"], len(stream) + 1, tok.eot_id)
    assert "fewer than data.seq_len" in one_line_error(e)


def test_sample_indices_permutation_and_slicing():
    n, g, seed = 96, 8, 1234
    epoch0 = np.concatenate([sample_indices(s, g, n, seed) for s in range(n // g)])
    assert sorted(epoch0) == list(range(n))
    epoch1 = np.concatenate([sample_indices(s, g, n, seed) for s in range(n // g, 2 * n // g)])
    assert sorted(epoch1) == list(range(n)) and not np.array_equal(epoch0, epoch1)
    # Independent of how it is later sliced: other batch sizes see the same global order.
    flat = np.concatenate([sample_indices(s, 12, n, seed) for s in range(16)])
    np.testing.assert_array_equal(flat, np.concatenate([epoch0, epoch1]))
    # A batch straddling an epoch boundary; purity; seed dependence.
    odd = np.concatenate([sample_indices(s, 7, n, seed) for s in range(30)])
    np.testing.assert_array_equal(odd[:2 * n], flat)
    np.testing.assert_array_equal(sample_indices(5, g, n, seed), sample_indices(5, g, n, seed))
    assert not np.array_equal(sample_indices(0, g, n, seed), sample_indices(0, g, n, seed + 1))
    # Which of these rows each data-parallel rank feeds: tests/unit/test_dp_feed.py.


class _Range:
    def __init__(self, n: int, tag: int) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        assert 0 <= i < self.n
        return self.tag, i


def test_blended_dataset_proportions():
    datasets = [_Range(1000, 0), _Range(300, 1), _Range(50, 2)]
    weights = [0.6, 0.3, 0.1]
    blend = BlendedDataset(datasets, weights, seed=7, size=3000)
    tags = np.array([blend[i][0] for i in range(len(blend))])
    for k, w in enumerate(weights):
        for n in (100, 1000, 3000):  # every prefix stays close to its share
            assert abs(np.sum(tags[:n] == k) - w * n) <= len(weights)
    # Each pass over a small dataset visits every sample exactly once.
    small = [blend[i][1] for i in range(len(blend)) if blend[i][0] == 2]
    assert sorted(small[:50]) == list(range(50)) and sorted(small[50:100]) == list(range(50))
    again = BlendedDataset(datasets, weights, seed=7, size=3000)
    assert [again[i] for i in range(0, 3000, 37)] == [blend[i] for i in range(0, 3000, 37)]
    assert len(BlendedDataset(datasets, weights, seed=7)) == 500  # 50 / 0.1: no repeats
    with pytest.raises(DataError) as e:
        BlendedDataset(datasets, [1.0, -1.0, 1.0], seed=0)
    one_line_error(e)
