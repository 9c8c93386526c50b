#!/usr/bin/env python
"""Train the shipped byte-level BPE tokenizer on the train split of the embedded corpus.

Writes `dlm_megatron/assets/tokenizer/shakespeare_bpe8k.json`: 8192 ids in total, of
which ids 0, 1, 2 are `<|endoftext|>`, `<|mask|>`, `<|pad|>`. Byte-level pre-tokenizer
and decoder (GPT-2 style) with no normalizer, so any text decodes back exactly.

Only the train split (dlm_megatron.data.corpus, VAL_PLAYS held out) is used, so the
validation plays never shape the vocabulary. Training is deterministic; `--check`
rebuilds and compares with the committed file.

Examples:
    python tools/build_tokenizer.py            # rewrite the shipped tokenizer
    python tools/build_tokenizer.py --check    # exit 1 if a rebuild would differ
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_VOCAB_SIZE = 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every flag is documented for --help."""
    from dlm_megatron.data.tokenizer import BUILTIN_TOKENIZER

    parser = argparse.ArgumentParser(
        description="Train the byte-level BPE shipped as "
        "dlm_megatron/assets/tokenizer/shakespeare_bpe8k.json on the train split of the "
        "embedded Shakespeare corpus (deterministic).",
    )
    parser.add_argument("--output", metavar="PATH", default=str(BUILTIN_TOKENIZER),
                        help="where to write the tokenizer JSON (default: %(default)s).")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N",
                        help="total vocabulary size including the 3 special tokens and the "
                        "256 byte tokens (default: %(default)s).")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the rebuilt file differs from "
                        "--output, 0 if identical.")
    return parser.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE whose first ids are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dlm_megatron.data.tokenizer import SPECIAL_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def build(vocab_size: int) -> bytes:
    """The tokenizer JSON bytes trained on the corpus train split."""
    from dlm_megatron.data.corpus import load_builtin_documents

    if vocab_size < 259 + 1:
        raise ValueError(f"--vocab-size {vocab_size} is too small: 256 bytes + 3 specials "
                         "already need 259; use at least 260")
    texts = [doc["text"] for doc in load_builtin_documents("train")]
    tokenizer = train_tokenizer(texts, vocab_size)
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # BPE stops early when it runs out of pairs to merge
        raise ValueError(f"training produced {got} ids, not {vocab_size}; lower --vocab-size")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(str(path), pretty=True)
        return path.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """Entry point: build, then write or compare."""
    args = parse_args(argv)
    from dlm_megatron.data import DataError

    try:
        data = build(args.vocab_size)
    except (DataError, ValueError) as exc:
        print(f"build_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        same = output.is_file() and output.read_bytes() == data
        print(f"{'identical' if same else 'DIFFERENT'}: {output} (rebuilt sha256 {digest})")
        return 0 if same else 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    print(f"wrote {output}: vocab {args.vocab_size}, {len(data)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
