"""The data layer's start-up at scale: no content hashing in training, index arrays built
once per dataset + config in data.cache_dir/index and memory-mapped by every rank and run.

(Start-up time and peak RSS against corpus size: benchmarks/bench_startup.py.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dlm_megatron.data import DataError, load_tokenizer, write_shards
from dlm_megatron.data import shards as shards_mod
from dlm_megatron.data.index_cache import IndexCache
from dlm_megatron.data.loader import BlendedDataset, PackedDataset, SampleOrder, sample_indices


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tok):
    """Two megatron-format corpora of random documents (several shards each)."""
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(0)
    out = []
    for name, num_docs in (("a", 300), ("b", 120)):
        docs = [rng.integers(0, tok.vocab_size - 3, rng.integers(1, 200), dtype=np.uint16) for _ in range(num_docs)]
        write_shards(docs, root / name, tok, "megatron", target_shard_tokens=5000)
        out.append(root / name)
    return out


def _no_content_reads(monkeypatch):
    """Fail on any content hash or per-document index read of a shard."""
    def refuse(*a, **k):
        raise AssertionError("read shard contents at start-up")

    monkeypatch.setattr(hashlib, "file_digest", refuse)
    monkeypatch.setattr(shards_mod._Shard, "reader", refuse)


def test_cached_datasets_equal_in_memory_ones_and_are_built_once(tmp_path, corpora, tok, monkeypatch):
    a, b = corpora
    builder = IndexCache(tmp_path, build=True)
    ds = PackedDataset(a, 16, tok.eot_id, tok.sha256, index_cache=builder)
    blend = BlendedDataset([ds, PackedDataset(b, 16, tok.eot_id, index_cache=builder)], [0.6, 0.4], seed=3,
                           size=3000, index_cache=builder)
    order = SampleOrder(len(ds), 5, builder, num_positions=3 * len(ds))  # three epochs
    assert len(builder.built) == len(set(builder.built)) > 5, builder.built  # docs x2, blend, perms

    # a later run (or another rank): everything is mapped, nothing is built, no shard
    # content or per-document index is read
    _no_content_reads(monkeypatch)
    reader = IndexCache(tmp_path, build=False)
    ds2 = PackedDataset(a, 16, tok.eot_id, tok.sha256, index_cache=reader)
    blend2 = BlendedDataset([ds2, PackedDataset(b, 16, tok.eot_id, index_cache=reader)], [0.6, 0.4], seed=3,
                            size=3000, index_cache=reader)
    order2 = SampleOrder(len(ds2), 5, reader, num_positions=3 * len(ds2))
    assert reader.built == [] and sorted(set(reader.opened)) == sorted(builder.built)
    # resident memory: the per-document and per-sample arrays are file mappings
    assert isinstance(ds2._eot_positions, np.memmap) and ds2.store._doc_offsets is None
    assert all(isinstance(order2.epoch_permutation(e), np.memmap) for e in range(3))
    assert isinstance(blend2.dataset_index, np.memmap) and isinstance(blend2.draw_index, np.memmap)
    monkeypatch.undo()

    plain = PackedDataset(a, 16, tok.eot_id)
    np.testing.assert_array_equal(np.asarray(ds2._eot_positions), plain._eot_positions)
    for i in range(0, len(plain), 7):
        np.testing.assert_array_equal(ds2[i], plain[i])
        np.testing.assert_array_equal(ds2.segment_ids(i), plain.segment_ids(i))
    for step in range(0, 3 * len(ds) // 8, 5):  # crosses epoch boundaries
        np.testing.assert_array_equal(order2.indices(step, 8), sample_indices(step, 8, len(plain), 5))
    plain_blend = BlendedDataset([plain, PackedDataset(b, 16, tok.eot_id)], [0.6, 0.4], seed=3, size=3000)
    for i in range(0, 3000, 11):
        assert blend2.locate(i) == plain_blend.locate(i)


def test_training_opens_shards_without_reading_contents(tmp_path, corpora, tok, monkeypatch):
    """The trainer's dataset path (build_train_dataset + val) hashes nothing and reads no
    per-document index once the cache exists; headers and sizes are still checked."""
    from dlm_megatron.config import Config
    from dlm_megatron.data.loader import build_train_dataset

    a, _ = corpora
    cfg = Config()
    cfg.data.train_path, cfg.data.seq_len = str(a), 16
    build_train_dataset(cfg, tok, tmp_path, index_cache=IndexCache(tmp_path, build=True))
    _no_content_reads(monkeypatch)
    ds = build_train_dataset(cfg, tok, tmp_path, index_cache=IndexCache(tmp_path, build=False))
    assert len(ds[0]) == 16
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(a, bad)
    binf = sorted(bad.glob("*.bin"))[1]
    binf.write_bytes(binf.read_bytes()[:-2])
    cfg.data.train_path = str(bad)
    with pytest.raises(DataError, match=f"{binf}: .* bytes but manifest.json records .* truncated"):
        build_train_dataset(cfg, tok, tmp_path, index_cache=IndexCache(tmp_path, build=True))


def test_missing_stale_and_partial_caches_are_refused_in_one_line(tmp_path, corpora, tok):
    a, _ = corpora

    def open_(build=False):
        return PackedDataset(a, 16, tok.eot_id, index_cache=IndexCache(tmp_path, build=build))

    def one_line(match):
        with pytest.raises(DataError) as e:
            open_()
        msg = str(e.value)
        assert "\n" not in msg and match in msg, msg
        return msg

    # a rank that does not build finds nothing: the cache is not shared with rank 0
    assert "must be on a filesystem every node sees" in one_line("was not found after rank 0 built it")
    open_(build=True)
    (entry,) = (tmp_path / "index").iterdir()
    meta_file, npy = entry / "meta.json", entry / "eot_positions.npy"
    meta = json.loads(meta_file.read_text())
    good_meta, good_npy = meta_file.read_text(), npy.read_bytes()
    # stale: built for another description
    meta["desc"]["num_docs"] += 1
    meta_file.write_text(json.dumps(meta))
    assert "delete that folder" in one_line(f"index cache {entry} is stale")
    meta_file.write_text(good_meta)
    # partial: truncated array, missing array, missing meta.json
    npy.write_bytes(good_npy[:-8])
    one_line(f"index cache {entry} is partial (eot_positions.npy has")
    npy.unlink()
    one_line("eot_positions.npy is missing")
    npy.write_bytes(good_npy)
    meta_file.unlink()
    one_line(f"index cache {entry} is partial (no meta.json)")
    # valid JSON of the wrong shape (hand-edited, or another tool's file): one line, no KeyError
    for wrong in ([], {**meta, "desc": json.loads(good_meta)["desc"], "arrays": None},
                  {**json.loads(good_meta), "arrays": {"eot_positions": {"dtype": "<i8"}}}):
        meta_file.write_text(json.dumps(wrong))
        one_line(f"index cache {entry} is partial (meta.json is not an index-cache description)")
    # an entry that lacks an array its reader needs
    meta_file.write_text(json.dumps({**json.loads(good_meta), "arrays": {}}))
    one_line("no array 'eot_positions' in meta.json")
    meta_file.write_text(good_meta)
    np.testing.assert_array_equal(open_()._eot_positions, PackedDataset(a, 16, tok.eot_id)._eot_positions)


def test_unwritable_cache_dir_is_one_line(tmp_path, corpora, tok, monkeypatch):
    """Rank 0 cannot create the cache (read-only or foreign folder): one line naming the setting.
    Root ignores permission bits, so the failure is injected at the folder creation."""
    a, _ = corpora

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(DataError) as e:
        PackedDataset(a, 16, tok.eot_id, index_cache=IndexCache(tmp_path / "ro", build=True))
    assert "\n" not in str(e.value) and "Permission denied" in str(e.value) and "data.cache_dir" in str(e.value)
