"""Tokenizer wrapper around a Hugging Face `tokenizers` JSON file.

The shipped tokenizer (`assets/tokenizer/shakespeare_bpe8k.json`, built by
`tools/build_tokenizer.py`) is an 8192-entry byte-level BPE whose first three ids are
the special tokens below. Any other HF tokenizer JSON works if it defines them too.

Identity: `Tokenizer.sha256` hashes the file's bytes; shard manifests record it so a
corpus tokenized with one vocabulary is never silently trained with another.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dlm_megatron.data import DataError

if TYPE_CHECKING:  # numpy only for annotations: shard.py's worker processes skip importing it
    import numpy as np

EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOT_TOKEN, MASK_TOKEN, PAD_TOKEN)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_TOKENIZER = ASSETS_DIR / "tokenizer" / "shakespeare_bpe8k.json"


class Tokenizer:
    """A loaded tokenizer: encode/decode plus the ids the diffusion objectives need.

    Attributes:
        path: the tokenizer file.
        sha256: hex digest of the file's bytes (the identity stored in shard manifests).
        vocab_size: number of ids including special tokens (embedding rows needed).
        eot_id, mask_id, pad_id: ids of `<|endoftext|>`, `<|mask|>`, `<|pad|>`.
    """

    def __init__(self, hf_tokenizer, path: Path, sha256: str) -> None:
        self._tok = hf_tokenizer
        # Text such as "<|mask|>" inside a document must stay ordinary bytes: a corpus
        # must never be able to inject the MASK/EOT ids the objectives rely on.
        self._tok.encode_special_tokens = True
        self.path = path
        self.sha256 = sha256
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.eot_id = _special_id(hf_tokenizer, EOT_TOKEN, path)
        self.mask_id = _special_id(hf_tokenizer, MASK_TOKEN, path)
        self.pad_id = _special_id(hf_tokenizer, PAD_TOKEN, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in order (uses the library's thread pool).

        `encode_batch_fast` (tokenizers >= 0.21) gives the same ids without computing
        character offsets, which nothing here uses; it is about 1.5x faster.
        """
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """Text of `ids`; special tokens are shown (e.g. `<|mask|>`) unless skip_special."""
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"sha256={self.sha256[:12]}...)")


def _special_id(hf_tokenizer, token: str, path: Path) -> int:
    """Id of a required special token, or a DataError saying which one is missing."""
    token_id = hf_tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(
            f"tokenizer {path} lacks the special token {token!r} (needs "
            f"{', '.join(SPECIAL_TOKENS)}); "
            "add it or rebuild with tools/build_tokenizer.py"
        )
    return int(token_id)


def resolve_tokenizer_path(path: str | Path | None) -> Path:
    """Map None / "builtin" to the shipped tokenizer file; otherwise return `path`."""
    if path is None or str(path) == "builtin":
        return BUILTIN_TOKENIZER
    return Path(path).expanduser()


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a HF `tokenizers` JSON file (None or "builtin": the shipped Shakespeare BPE), or
    a tiktoken BPE ranks file named `*.tiktoken` (see TiktokenTokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer  # heavy-ish import, only when needed

    file = resolve_tokenizer_path(path)
    if not file.is_file():
        raise DataError(
            f"tokenizer file {file} does not exist; set data.tokenizer to a HF tokenizer "
            "JSON file or 'builtin'"
        )
    if file.name.endswith(TIKTOKEN_SUFFIX):
        return _load_tiktoken(file)
    data = file.read_bytes()
    try:
        json.loads(data)
        hf_tokenizer = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{file} is not a Hugging Face tokenizers JSON file ({reason[:120]}); "
            "point data.tokenizer at a tokenizer.json"
        ) from None
    return Tokenizer(hf_tokenizer, file, hashlib.sha256(data).hexdigest())


# --- tiktoken BPE ranks files (`*.tiktoken`) -------------------------------------------
#
# A `.tiktoken` file has one line per mergeable token: `<base64 bytes> <rank>` (e.g. the
# MIT-licensed GPT-2 ranks that ship as `whisper/assets/gpt2.tiktoken` in the
# `openai-whisper` package). It is loaded with the `tiktoken` package (offline: only a
# local file is read) using the GPT-2 pre-tokenisation pattern; the special tokens
# <|endoftext|>, <|mask|>, <|pad|> are appended after the last rank, in that order (for
# gpt2.tiktoken: eot 50256, mask 50257, pad 50258, vocab_size 50259).

TIKTOKEN_SUFFIX = ".tiktoken"
GPT2_PAT_STR = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class TiktokenTokenizer(Tokenizer):
    """A `.tiktoken` BPE ranks file behind the `Tokenizer` interface.

    `sha256` hashes the file's bytes together with the pattern and the special tokens, so
    changing either invalidates shards made with the old identity.
    """

    def __init__(self, path: Path, data: bytes) -> None:  # noqa: D107 (no super().__init__)
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"tokenizer {path} is a .tiktoken ranks file, which needs the "
                            "tiktoken package: pip install tiktoken") from None
        ranks: dict[bytes, int] = {}
        try:
            for lineno, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}:{lineno} is not a tiktoken ranks line ('<base64> <rank>'); "
                            "point data.tokenizer at a .tiktoken file") from None
        if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
            raise DataError(f"{path}: ranks must be 0..N-1 without gaps; not a usable "
                            ".tiktoken file")
        n = len(ranks)
        specials = {tok: n + k for k, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=f"dlm:{path.name}", pat_str=GPT2_PAT_STR,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self._num_ranks = n
        self.path = path
        material = data + b"\0" + GPT2_PAT_STR.encode() + b"\0" + ",".join(SPECIAL_TOKENS).encode()
        self.sha256 = hashlib.sha256(material).hexdigest()
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.eot_id, self.mask_id, self.pad_id = (specials[t] for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text stays ordinary bytes."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, in order (single-threaded: shard.py's workers parallelise)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 at a cut becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self._num_ranks]
        return self._enc.decode(ids, errors="replace")


def _load_tiktoken(file: Path) -> Tokenizer:
    """Load a `.tiktoken` ranks file (called by load_tokenizer for that suffix)."""
    return TiktokenTokenizer(file, file.read_bytes())
