"""The worker side of parallel tokenization (`shards.tokenize_texts`, tools/shard.py).

Deliberately light: the standard library and the tokenizer wrapper only, no numpy, so a
spawned worker process is ready after importing `tokenizers` (about 0.1 s) instead of
the whole data package. A chunk's ids come back as one flat `array.array` in the shard
token dtype plus the document lengths: one buffer per chunk to pickle, which the main
process wraps without copying (`np.frombuffer`).

Chunk boundaries depend only on the texts (never on the worker count), so the output is
identical for any number of workers.
"""
from __future__ import annotations

import array
import os
from typing import Iterable, Iterator

from dlm_megatron.data import DataError
from dlm_megatron.data.tokenizer import Tokenizer, load_tokenizer

# ~256 KiB of text per task: small enough that the last tasks of a run leave no worker
# idle for long (a whole document is never split), large enough that per-task costs
# (pickling, one encode_batch call) stay negligible.
CHUNK_CHARS = 1 << 18
CHUNK_DOCS = 1024
# Text in flight per worker (queued + being encoded + results not yet consumed).
IN_FLIGHT_CHARS = 2 << 20

_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(path: str, sha256: str) -> None:
    """Load the tokenizer once per worker process and make sure it is the same file."""
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER_TOKENIZER = load_tokenizer(path)
    if _WORKER_TOKENIZER.sha256 != sha256:
        raise DataError(f"tokenizer {path} changed while sharding; rerun")


def encode_chunk(texts: list[str], typecode: str,
                 tokenizer: Tokenizer | None = None) -> tuple[array.array, list[int]]:
    """Ids of all `texts` concatenated (array of `typecode`, e.g. 'H' = uint16) and the
    number of ids of each text."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    flat = array.array(typecode)
    lengths = []
    for ids in tokenizer.encode_batch(texts):
        # fromlist: ~2x faster than extend; OverflowError if an id does not fit the dtype
        flat.fromlist(ids if isinstance(ids, list) else list(ids))
        lengths.append(len(ids))
    return flat, lengths


def chunk_texts(texts: Iterable[str], chunk_chars: int = CHUNK_CHARS,
                chunk_docs: int = CHUNK_DOCS) -> Iterator[list[str]]:
    """Group texts into chunks; boundaries depend only on the texts, never on workers."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars or len(chunk) >= chunk_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
