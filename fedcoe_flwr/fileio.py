"""Crash-safe file writes: every file the package writes goes through these two helpers,
so a reader (a resumed run, a monitoring tool, a test) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write ``content`` (bytes, text, or a function that writes to a binary file) to a
    temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append one JSON line and fsync: a line is either whole on disk or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(record), default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a JSONL file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
