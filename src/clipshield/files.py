"""File helpers: writing a file or folder atomically, reading a JSON object with a one-line error."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields `path.partial` to write a file or folder into; when the block completes it replaces `path`, and if
    the block fails it is removed: a reader never sees half of it, and an existing `path` stays until then."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def json_object(data: str | bytes, where: str, fix: str, error: type[Exception]) -> dict:
    """The JSON object in `data`, or `error` saying what is wrong with `where` and how to `fix` it."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where} is not valid JSON ({e}); {fix}") from e
    if not isinstance(value, dict):
        raise error(f"{where} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value
