"""Deterministic, resumable sample addressing: packed sequences, global order, blending.

The training order is a pure function of (seed, step): `sample_indices(step, G, N, seed)`
names the G global samples of an optimizer step, so any data-parallel layout (each rank
takes its slice of that array) and any resume point see exactly the same data. Nothing
here holds iterator state, so "resuming" is just calling it with the next step.

Packing: documents are concatenated into one stream, each followed by EOT:

    stream = doc0 EOT doc1 EOT doc2 EOT ...

and sample i is stream[i*L : (i+1)*L] (L = seq_len; the tail shorter than L is dropped).
For the AR objective, which needs L+1 tokens per sample, build it with seq_len=L+1.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from dlm_megatron.data import DataError
from dlm_megatron.data.corpus import parse_blend, resolve_data_path
from dlm_megatron.data.index_cache import MAX_CACHED_PASSES, IndexCache, _build_in_memory, permutation
from dlm_megatron.data.shards import DocStore, open_shards


class PackedDataset:
    """Fixed-length samples cut from the EOT-joined stream of a shard directory.

    The only index is an int64 array with one entry per document (where each document's
    EOT sits in the stream); tokens are read from the (memory-mapped) shards on demand.
    Without ``index_cache`` that array is built in memory (O(documents)); with one it is
    built once and memory-mapped, so opening costs O(shards) and no resident memory.

    Args:
        shard_dir: a directory written by `write_shards` / tools/shard.py, or a DocStore.
        seq_len: tokens per sample.
        eot_id: id appended after every document.
        tokenizer_sha: if given, the shards must have been made with this tokenizer.
        index_cache: where the document index is built once and mapped (data/index_cache.py).
    """

    def __init__(self, shard_dir: str | Path | DocStore, seq_len: int, eot_id: int,
                 tokenizer_sha: str | None = None, index_cache: IndexCache | None = None) -> None:
        if seq_len < 1:
            raise DataError(f"data.seq_len must be >= 1, got {seq_len}")
        self.store = shard_dir if isinstance(shard_dir, DocStore) else open_shards(
            shard_dir, expected_tokenizer_sha=tokenizer_sha)
        if not 0 <= eot_id < self.store.vocab_size:
            raise DataError(f"eot_id {eot_id} is outside the shards' vocabulary "
                            f"[0, {self.store.vocab_size}); pass the tokenizer's eot_id")
        self.seq_len = seq_len
        self.eot_id = eot_id
        # Stream position of each document's EOT: its end offset plus the EOTs before it.
        store = self.store
        if index_cache is None:
            self._eot_positions = store.doc_offsets[1:] + np.arange(store.num_docs, dtype=np.int64)
        else:
            def build(alloc):
                store.write_eot_positions(alloc("eot_positions", (store.num_docs,), np.int64))

            # keyed by the manifest (it hashes every shard file): a rewritten corpus gets a new entry
            desc = {"manifest_sha256": store.manifest_sha256, "num_docs": store.num_docs, "num_tokens": store.num_tokens}
            self._eot_positions = index_cache.get("docs", desc, build)["eot_positions"]
        self.stream_len = self.store.num_tokens + self.store.num_docs
        self._len = self.stream_len // seq_len
        if self._len == 0:
            raise DataError(
                f"corpus {self.store.path} has {self.stream_len} tokens (incl. one EOT per "
                f"document), fewer than data.seq_len={seq_len}; lower data.seq_len or add data"
            )

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict:
        """Pickle by path: memory maps would otherwise be copied into the pickle (e.g. for
        DataLoader workers started with spawn/forkserver)."""
        return {"path": str(self.store.path), "seq_len": self.seq_len, "eot_id": self.eot_id,
                "sha": self.store.tokenizer_sha256}

    def __setstate__(self, state: dict) -> None:
        store = open_shards(state["path"], expected_tokenizer_sha=state["sha"], verify=False)
        self.__init__(store, state["seq_len"], state["eot_id"])

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample `i`: int64[seq_len]."""
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range [0, {self._len})")
        return self.stream_slice(i * self.seq_len, (i + 1) * self.seq_len)

    def stream_slice(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, in O(stop - start + log documents).

        Non-EOT positions of the window map to one contiguous range of the flat token
        array (the EOTs are the only insertions), so one read plus a scatter suffices.
        """
        eot_lo = int(np.searchsorted(self._eot_positions, start, side="left"))
        eot_hi = int(np.searchsorted(self._eot_positions, stop, side="left"))
        out = np.empty(stop - start, dtype=np.int64)
        is_eot = np.zeros(stop - start, dtype=bool)
        is_eot[self._eot_positions[eot_lo:eot_hi] - start] = True
        out[is_eot] = self.eot_id
        # Tokens before stream position p = p - (EOTs before p).
        out[~is_eot] = self.store.tokens(start - eot_lo, stop - eot_hi)
        return out


@functools.lru_cache(maxsize=4)  # a batch touches at most two epochs (per dataset size)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of one epoch, in memory (cached: consecutive steps share an epoch)."""
    return permutation(num_samples, [seed, epoch])


def sample_indices(step: int, global_batch_size: int, num_samples: int, seed: int,
                   epoch_permutation=None) -> np.ndarray:
    """Global sample indices (int64[global_batch_size]) consumed at optimizer step `step`.

    Global position g = step * G + j (j < G) falls in epoch g // num_samples and takes
    permutation(num_samples; PCG64([seed, epoch]))[g % num_samples]. A batch may straddle
    two epochs. Independent of data-parallel size: rank r of R takes its slice of this.
    ``epoch_permutation(epoch)`` supplies that permutation (default: built in memory;
    SampleOrder maps it from the index cache).
    """
    if step < 0 or global_batch_size < 1 or num_samples < 1 or seed < 0:
        raise DataError(f"sample_indices needs step >= 0, global_batch_size >= 1, "
                        f"num_samples >= 1, seed >= 0; got {step}, {global_batch_size}, "
                        f"{num_samples}, {seed}")
    positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs = positions // num_samples
    out = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        perm = (epoch_permutation or (lambda e: _epoch_permutation(num_samples, seed, e)))(int(epoch))
        out[sel] = perm[positions[sel] % num_samples]
    return out


class SampleOrder:
    """The global order of a dataset's samples (``sample_indices``), with each epoch's
    permutation built once in ``index_cache`` and memory-mapped.

    Args:
        num_samples, seed: as for sample_indices.
        index_cache: where permutations live (None: in memory, as sample_indices).
        num_positions: how many global positions the run will read (steps x global batch):
            the epochs they cover (at most MAX_CACHED_PASSES) are built up front, so no rank
            waits for one mid-run. Other epochs are built in memory when read.
    """

    def __init__(self, num_samples: int, seed: int, index_cache: IndexCache | None = None,
                 num_positions: int = 0) -> None:
        self.num_samples, self.seed, self.cache = num_samples, seed, index_cache
        self._mapped: dict[int, np.ndarray] = {}
        if index_cache is not None:
            for epoch in range(min(-(-num_positions // num_samples), MAX_CACHED_PASSES)):
                self._mapped[epoch] = permutation(num_samples, [seed, epoch], index_cache)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch in self._mapped:
            return self._mapped[epoch]
        return _epoch_permutation(self.num_samples, self.seed, epoch)

    def indices(self, step: int, global_batch_size: int) -> np.ndarray:
        return sample_indices(step, global_batch_size, self.num_samples, self.seed, self.epoch_permutation)


class BlendedDataset:
    """Weighted mixture of datasets with a deterministic interleaving schedule.

    Dataset k's j-th draw is placed at "ideal time" (j + 0.5) / w_k; merging all datasets'
    draws by that time (ties by dataset order) gives a smooth schedule: after any prefix of
    n samples dataset k has been drawn n * w_k times up to a deviation bounded by the
    number of datasets (the idea of Megatron's largest-deficit blending, but vectorised and
    with no sequential loop). Draw j of dataset k maps to a sample via a per-pass
    permutation seeded by (seed, k, pass), so a dataset smaller than its share is
    re-visited in a fresh order rather than the same one.

    Args:
        datasets: objects with `len()` and `__getitem__` (e.g. PackedDataset).
        weights: non-negative mixture weights (normalised here); zero drops a dataset.
        seed: seeds the per-dataset permutations.
        size: number of blended samples; default min_k len_k / w_k, i.e. about one pass
            over the dataset that runs out first (later draws wrap into a new pass).
        index_cache: where the schedule and the per-dataset permutations are built once
            and memory-mapped (None: in memory on each rank).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int,
                 size: int | None = None, index_cache: IndexCache | None = None) -> None:
        w = self._normalised(datasets, weights)
        lengths = np.array([len(d) for d in datasets], dtype=np.int64)
        if size is None:
            # 1e-9: 50 / 0.1 must be 500, not 499.99999.
            size = int(min(np.floor(lengths[k] / w[k] + 1e-9) for k in range(len(w)) if w[k] > 0))
        if size < 1:
            raise DataError(f"blended dataset size must be >= 1, got {size}; check the "
                            "weights and datasets")
        self.datasets, self.weights, self.seed, self._size = list(datasets), w, seed, size
        self.cache = index_cache

        def build(alloc):
            self._schedule(w, size, alloc)

        arrays = (index_cache.get("blend", {"weights": [float(x) for x in w], "size": int(size)}, build)
                  if index_cache is not None else _build_in_memory(build))
        self.dataset_index, self.draw_index = arrays["dataset_index"], arrays["draw_index"]
        # Dataset k is drawn at most ceil(size * w_k) + 1 times, so these passes cover every
        # draw: build their permutations now (once, in the cache) rather than mid-run.
        self._num_passes = [min((int(np.ceil(size * wk)) + 1) // len(d) + 1, MAX_CACHED_PASSES) if wk > 0 else 0
                            for d, wk in zip(self.datasets, w)]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # k -> (pass, permutation)
        if index_cache is not None:
            for k, passes in enumerate(self._num_passes):
                for p in range(passes):
                    permutation(len(self.datasets[k]), [seed, k, p], index_cache)

    @staticmethod
    def _normalised(datasets: Sequence, weights: Sequence[float]) -> np.ndarray:
        """Validate and normalise the weights."""
        w = np.asarray(weights, dtype=np.float64)
        if len(datasets) == 0 or w.shape != (len(datasets),):
            raise DataError(f"need one weight per dataset: {len(datasets)} datasets, "
                            f"{w.size} weights; fix data.weights")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"blend weights must be finite, >= 0 and not all 0, got "
                            f"{list(weights)}; fix data.weights")
        if any(len(d) == 0 for d, wk in zip(datasets, w) if wk > 0):
            raise DataError("a blended dataset with non-zero weight is empty; drop it or add data")
        return w / w.sum()

    @staticmethod
    def _schedule(w: np.ndarray, size: int, alloc) -> None:
        """(dataset id, draw number within that dataset) for each blended sample, written
        into ``alloc``'s arrays dataset_index and draw_index."""
        ids, draws, times = [], [], []
        for k, wk in enumerate(w):
            if wk == 0:
                continue
            n = int(np.ceil(size * wk)) + 1  # enough draws to fill `size` slots
            j = np.arange(n, dtype=np.int64)
            ids.append(np.full(n, k, dtype=np.int64))
            draws.append(j)
            times.append((j + 0.5) / wk)
        ids_all, draws_all = np.concatenate(ids), np.concatenate(draws)
        order = np.argsort(np.concatenate(times), kind="stable")[:size]
        alloc("dataset_index", (size,), np.int16 if len(w) < 2**15 else np.int64)[:] = ids_all[order]
        alloc("draw_index", (size,), np.int64)[:] = draws_all[order]

    def __len__(self) -> int:
        return self._size

    def locate(self, i: int) -> tuple[int, int]:
        """(dataset id, sample index in that dataset) of blended sample `i`."""
        if not 0 <= i < self._size:
            raise IndexError(f"sample {i} out of range [0, {self._size})")
        k, j = int(self.dataset_index[i]), int(self.draw_index[i])
        n = len(self.datasets[k])
        cached = self._perms.get(k)
        if cached is None or cached[0] != j // n:  # one permutation per dataset at a time
            built = j // n < self._num_passes[k]  # built in the cache by __init__
            cached = (j // n, permutation(n, [self.seed, k, j // n], self.cache if built else None))
            self._perms[k] = cached
        return k, int(cached[1][j % n])

    def __getitem__(self, i: int):
        k, index = self.locate(int(i))
        return self.datasets[k][index]


# --- document-boundary attention masks -----------------------------------------------

def _packed_segment_ids(ds: PackedDataset, i: int) -> np.ndarray:
    """Document number (0, 1, ...) of each position of sample `i`, counted from the
    window start. A document's EOT belongs to that document, so a new segment starts
    right after each EOT."""
    i = int(i)
    if not 0 <= i < len(ds):
        raise IndexError(f"sample {i} out of range [0, {len(ds)})")
    start, stop = i * ds.seq_len, (i + 1) * ds.seq_len
    lo = int(np.searchsorted(ds._eot_positions, start, side="left"))
    hi = int(np.searchsorted(ds._eot_positions, stop - 1, side="left"))  # EOTs before last
    starts = np.zeros(ds.seq_len, dtype=np.int32)
    starts[ds._eot_positions[lo:hi] - start + 1] = 1  # a segment starts after each EOT
    return np.cumsum(starts, dtype=np.int32)


PackedDataset.segment_ids = _packed_segment_ids  # method: PackedDataset(...).segment_ids(i)


def _blended_segment_ids(ds: BlendedDataset, i: int) -> np.ndarray:
    k, index = ds.locate(int(i))
    return ds.datasets[k].segment_ids(index)


BlendedDataset.segment_ids = _blended_segment_ids


def document_mask(segment_ids_BL: np.ndarray, causal: bool = False) -> np.ndarray:
    """Boolean attention mask [B, 1, L, L] from per-token segment ids [B, L].

    True means "may not attend" (megatron-core's convention): query q may attend key k
    only when both lie in the same document (and k <= q if `causal`). Works on numpy
    arrays and, unchanged, on torch tensors.
    """
    seg = segment_ids_BL
    if seg.ndim != 2:
        raise DataError(f"segment ids must be [batch, length], got shape {tuple(seg.shape)}")
    blocked = seg[:, None, :, None] != seg[:, None, None, :]
    if causal:
        length = seg.shape[1]
        upper = np.triu(np.ones((length, length), dtype=bool), k=1)
        if not isinstance(seg, np.ndarray):  # torch
            import torch

            upper = torch.from_numpy(upper).to(seg.device)
        blocked = blocked | upper
    return blocked


def with_document_mask(attention_mask, segment_ids_BL, length: int, causal: bool = False):
    """`attention_mask` (None or a bool mask broadcastable to [B, 1, L', L']) combined with
    the document mask of `segment_ids_BL` [B, L] cut to the first `length` positions (the
    masked objective may shorten a batch); returns a torch bool tensor [B, 1, L', L']."""
    import torch

    seg = torch.as_tensor(np.asarray(segment_ids_BL)[:, :length])
    mask = document_mask(seg, causal=causal)
    return mask if attention_mask is None else (mask | attention_mask.to(torch.bool))


# --- weighted blends from the config -------------------------------------------------

def build_train_dataset(cfg, tok, cache_dir: str | Path | None = None, index_cache: IndexCache | None = None):
    """The training dataset of a Config: a PackedDataset, or a BlendedDataset when
    `cfg.data.train_path` is a blend "0.7:dirA,0.3:dirB" (each item a shard directory or a
    builtin: path, resolved like a single path). The blend's interleaving and per-source
    permutations are seeded by cfg.train.seed, so it is as reproducible and DP-independent
    as a single source. With ``index_cache`` every index array is built once and mapped."""
    cache_dir = cfg.data.cache_dir if cache_dir is None else cache_dir
    spec = resolve_data_path(cfg.data.train_path, cache_dir, tok)
    items = parse_blend(spec)

    def packed(path: str) -> PackedDataset:
        return PackedDataset(path, cfg.data.seq_len, tok.eot_id, tokenizer_sha=tok.sha256, index_cache=index_cache)

    if items is None:
        return packed(spec)
    return BlendedDataset([packed(p) for _, p in items], [w for w, _ in items],
                          seed=cfg.train.seed, index_cache=index_cache)
