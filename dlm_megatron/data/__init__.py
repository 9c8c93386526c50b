"""Data layer: tokenizer, shard formats, packed/blended datasets, embedded corpus.

Everything here is plain numpy (no torch), so it runs the same on every rank and in
tools. Bad input raises `DataError`, whose one-line message names the problem and the
fix; CLIs print it without a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """A data/tokenizer problem the user can fix; the message says what and how."""


# Public names resolve lazily (PEP 562), so importing one light submodule (e.g. the
# tokenizer in tools/shard.py's worker processes) does not pull in numpy and the rest.
_EXPORTS = {
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "DocStore": "shards",
    "open_shards": "shards",
    "write_shards": "shards",
    "PackedDataset": "loader",
    "BlendedDataset": "loader",
    "sample_indices": "loader",
    "SampleOrder": "loader",
    "IndexCache": "index_cache",
    "prepare_builtin_corpus": "corpus",
    "resolve_data_path": "corpus",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DataError",
    "Tokenizer",
    "load_tokenizer",
    "DocStore",
    "open_shards",
    "write_shards",
    "PackedDataset",
    "BlendedDataset",
    "sample_indices",
    "SampleOrder",
    "IndexCache",
    "prepare_builtin_corpus",
    "resolve_data_path",
]
