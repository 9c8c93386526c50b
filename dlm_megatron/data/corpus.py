"""The embedded Shakespeare corpus and `builtin:` data paths.

`assets/corpus/shakespeare.jsonl.xz` (built by tools/build_corpus.py) holds the 42
modern-spelling Project Gutenberg works, one JSON line each: {"id", "title", "text"}.
Two plays (VAL_PLAYS, ~5% of the text) are held out as the validation split; everything
else is train. tools/build_tokenizer.py trains on the same train split, so validation
text never influences the vocabulary either.

`prepare_builtin_corpus` tokenizes both splits into shard directories under a cache
directory keyed by (corpus, tokenizer, format), so changing the tokenizer never reuses
stale shards, and a finished directory is only ever renamed into place (safe when several
processes race to prepare it).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import time
from typing import Sequence
from pathlib import Path

from dlm_megatron.data import DataError
from dlm_megatron.data.shards import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    make_temp_dir,
    tokenize_texts,
    write_shards,
)
from dlm_megatron.data.tokenizer import ASSETS_DIR, Tokenizer

CORPUS_FILE = ASSETS_DIR / "corpus" / "shakespeare.jsonl.xz"
# sha256 of the decompressed JSONL (stable even if another liblzma compresses differently).
CORPUS_SHA256 = "8fb25e28a5c39af5ac8a64e518bfd72631d22bc7eb7207ae21a95919df8b7f46"
CORPUS_NAME = "shakespeare"
# Held-out plays (one tragedy, one comedy; 5.1% of the characters). Never in train.
VAL_PLAYS = ("romeo_and_juliet", "twelfth_night")
SPLITS = ("train", "val")
BUILTIN_PREFIX = "builtin:"
BUILTIN_PATHS = tuple(f"{BUILTIN_PREFIX}{CORPUS_NAME}/{s}" for s in SPLITS)


def load_builtin_documents(split: str = "train") -> list[dict]:
    """The embedded works of `split` ("train", "val" or "all") as {"id","title","text"} dicts."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; use train, val or all")
    try:
        raw = lzma.decompress(CORPUS_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise DataError(f"embedded corpus {CORPUS_FILE} is unreadable ({exc}); restore it "
                        "with git checkout or tools/build_corpus.py") from None
    if hashlib.sha256(raw).hexdigest() != CORPUS_SHA256:
        raise DataError(f"embedded corpus {CORPUS_FILE} has unexpected content; restore it "
                        "with git checkout or tools/build_corpus.py")
    docs = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    if split == "all":
        return docs
    return [d for d in docs if (d["id"] in VAL_PLAYS) == (split == "val")]


def _cache_key(tokenizer: Tokenizer, fmt: str) -> str:
    """Directory name that changes whenever the corpus, tokenizer or format changes."""
    material = f"{CORPUS_SHA256}:{tokenizer.sha256}:{fmt}:{MANIFEST_VERSION}"
    return f"{CORPUS_NAME}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def _is_complete(root: Path) -> bool:
    """A prepared corpus has a manifest in every split (manifests are written last)."""
    return all((root / split / MANIFEST_NAME).is_file() for split in SPLITS)


def _build(tmp_root: Path, tokenizer: Tokenizer, fmt: str) -> dict[str, tuple[int, int]]:
    """Tokenize both splits into `tmp_root/{train,val}`; return (docs, tokens) per split."""
    counts = {}
    for split in SPLITS:
        texts = [d["text"] for d in load_builtin_documents(split)]
        source = {"corpus": f"{BUILTIN_PREFIX}{CORPUS_NAME}/{split}",
                  "corpus_sha256": CORPUS_SHA256}
        manifest = write_shards(tokenize_texts(texts, tokenizer), tmp_root / split, tokenizer,
                                fmt, source=source)
        counts[split] = (manifest["num_docs"], manifest["num_tokens"])
    return counts


def prepare_builtin_corpus(cache_dir: str | Path, tokenizer: Tokenizer, fmt: str = "megatron",
                           verbose: bool = True) -> dict[str, str]:
    """Tokenize the embedded corpus once; return {"train": dir, "val": dir}.

    Idempotent: a finished directory for this corpus+tokenizer+format is reused. Several
    processes may call this at once: each builds in its own temp directory and renames it
    into place; the first rename wins and the others discard their copy.
    """
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / _cache_key(tokenizer, fmt)
    dirs = {split: str(root / split) for split in SPLITS}
    if _is_complete(root):
        return dirs
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp_root = make_temp_dir(cache_dir, f".{root.name}.tmp-")
    try:
        counts = _build(tmp_root, tokenizer, fmt)
        try:
            os.rename(tmp_root, root)
        except OSError:
            if not _is_complete(root):  # not a lost race: a damaged earlier directory
                raise DataError(f"{root} exists but is incomplete; delete it and rerun") from None
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    if verbose:
        (tr_docs, tr_tok), (va_docs, va_tok) = counts["train"], counts["val"]
        print(f"prepared builtin corpus {CORPUS_NAME}: train {tr_docs} docs / {tr_tok} tokens, "
              f"val {va_docs} docs / {va_tok} tokens -> {root} "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
    return dirs


def parse_blend(spec: str) -> list[tuple[float, str]] | None:
    """Parse a blend data path "W1:PATH1,W2:PATH2,..." into [(W1, PATH1), ...].

    Returns None when `spec` is a single plain path (no weights), so existing paths keep
    working (including `builtin:shakespeare/train`: "builtin" is not a number). Weights are
    relative (normalised later); paths in a blend cannot contain commas.
    """
    parts = [p.strip() for p in str(spec).split(",")]
    parsed = []
    for part in parts:
        weight, sep, path = part.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = None
        if not sep or w is None or not path:
            if len(parts) == 1:
                return None
            raise DataError(f"data path {spec!r} looks like a blend but item {part!r} is not "
                            "WEIGHT:PATH; write e.g. '0.7:shards/web,0.3:shards/books'")
        parsed.append((w, path))
    return parsed


def format_blend(items: Sequence[tuple[float, str]]) -> str:
    """Inverse of parse_blend."""
    return ",".join(f"{w!r}:{p}" for w, p in items)


def resolve_data_path(path: str, cache_dir: str | Path, tokenizer: Tokenizer) -> str:
    """Turn a data path from the config into a shard directory.

    `builtin:shakespeare/train` and `builtin:shakespeare/val` are prepared on demand under
    `cache_dir`; anything else must already be a shard directory with a manifest.json.
    A weighted blend "0.7:dirA,0.3:dirB" (see parse_blend) resolves each item and
    returns the blend with resolved paths.
    """
    items = parse_blend(path)
    if items is not None:
        return format_blend([(w, resolve_data_path(p, cache_dir, tokenizer)) for w, p in items])
    if path.startswith(BUILTIN_PREFIX):
        if path not in BUILTIN_PATHS:
            raise DataError(f"unknown builtin data path {path!r}; use one of "
                            f"{', '.join(BUILTIN_PATHS)}")
        split = path.rsplit("/", 1)[1]
        return prepare_builtin_corpus(cache_dir, tokenizer)[split]
    shard_dir = Path(path).expanduser()
    if not (shard_dir / MANIFEST_NAME).is_file():
        what = "does not exist" if not shard_dir.exists() else f"has no {MANIFEST_NAME}"
        raise DataError(
            f"data path {path} {what}; it must be a shard directory: create one with "
            f"`python tools/shard.py --input FILES --tokenizer TOKENIZER --output {path}` "
            f"or use {BUILTIN_PATHS[0]}"
        )
    return str(shard_dir)
