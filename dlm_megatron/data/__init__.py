"""Data layer: tokenizer, shard formats, packed/blended datasets, embedded corpus.

Everything here is plain numpy (no torch), so it runs the same on every rank and in
tools. Bad input raises `DataError`, whose one-line message names the problem and the
fix; CLIs print it without a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """A data/tokenizer problem the user can fix; the message says what and how."""


# Submodules import DataError from here, so it must be defined before these imports.
from dlm_megatron.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from dlm_megatron.data.shards import DocStore, open_shards, write_shards  # noqa: E402
from dlm_megatron.data.loader import (  # noqa: E402
    BlendedDataset,
    PackedDataset,
    sample_indices,
)
from dlm_megatron.data.corpus import (  # noqa: E402
    prepare_builtin_corpus,
    resolve_data_path,
)

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
    "prepare_builtin_corpus",
    "resolve_data_path",
]
