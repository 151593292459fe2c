"""Reading a folder of .txt and .jsonl text: the one reader behind `client tune --data` and `cloud emulator build --distill-data`."""

from __future__ import annotations

import json
import os


class TextFilesError(ValueError):
    """A text folder is missing, empty, unreadable or holds a malformed row; the message says which."""


def parse_row(line: str, where: str) -> tuple[str, str]:
    """One JSON-lines row as (prompt, completion): {"text"} has an empty prompt. `where` is FILE:LINE for errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TextFilesError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return "", row["text"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    raise TextFilesError(f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}')


def read_records(data_dir: str, flag: str = "--data") -> list[tuple[str, str]]:
    """(prompt, completion) pairs from DIR's .txt files and .jsonl rows, in file-name order.

    A .txt file and a {"text"} row are one record with an empty prompt; {"prompt", "completion"}
    rows keep both parts. `flag` names the option in error messages.
    """
    if not os.path.isdir(data_dir):
        raise TextFilesError(f"{flag} {data_dir!r} is not a directory; point it at a folder of .txt or .jsonl files")
    names = sorted(n for n in os.listdir(data_dir) if n.endswith((".txt", ".jsonl")))
    if not names:
        raise TextFilesError(f"{flag} {data_dir!r} has no .txt or .jsonl files")
    out: list[tuple[str, str]] = []
    for name in names:
        path = os.path.join(data_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                if name.endswith(".txt"):
                    text = f.read()
                    if text.strip():
                        out.append(("", text))
                    continue
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        out.append(parse_row(line, f"{path}:{lineno}"))
        except (OSError, UnicodeDecodeError) as e:
            raise TextFilesError(f"cannot read {path}: {e}") from None
    if not out:
        raise TextFilesError(f"{flag} {data_dir!r} contains no text")
    return out
