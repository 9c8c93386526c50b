"""JSON Lines records with file line numbers for one-line errors (SFT data, eval inputs)."""
from __future__ import annotations

import json
from typing import Iterator


def jsonl_records(text: str, path, error: type[Exception]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of ``text`` (the contents of
    ``path``); a line that is not JSON raises ``error("PATH:N is not valid JSON")``."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError:
            raise error(f"{path}:{n} is not valid JSON") from None
