"""The operator's public text for distillation: .txt/.jsonl files, tokenized and packed into blocks."""
from __future__ import annotations

import json
import os

import torch

from .errors import TextError


def read_texts(data_dir: str) -> list[str]:
    """Texts of a directory's .txt files and .jsonl rows ({"text"} or {"prompt","completion"}), in name order."""
    if not os.path.isdir(data_dir):
        raise TextError(f"--distill-data {data_dir!r} is not a directory; point it at a folder of .txt or .jsonl files")
    names = sorted(n for n in os.listdir(data_dir) if n.endswith((".txt", ".jsonl")))
    if not names:
        raise TextError(f"--distill-data {data_dir!r} has no .txt or .jsonl files")
    out: list[str] = []
    for name in names:
        path = os.path.join(data_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                if name.endswith(".txt"):
                    out.append(f.read())
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TextError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise TextError(f"{path}:{lineno}: expected a JSON object")
                    text = row.get("text") if isinstance(row.get("text"), str) else \
                        (row.get("prompt") or "") + (row.get("completion") or "")
                    out.append(text)
        except (OSError, UnicodeDecodeError) as e:
            raise TextError(f"cannot read {path}: {e}") from None
    out = [t for t in out if t.strip()]
    if not out:
        raise TextError(f"--distill-data {data_dir!r} contains no text")
    return out


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenizes texts joined by EOS and cuts the stream into full blocks of seq_len: (N, seq_len) ids."""
    if seq_len < 2:
        raise TextError(f"--seq-len must be >= 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + eos
    n = len(ids) // seq_len
    if n < 2:
        raise TextError(f"the distillation text yields {n} block(s) of {seq_len} tokens; add text or lower --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def split_blocks(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation split of packed blocks; both parts non-empty."""
    n = blocks.shape[0]
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[perm[n_val:]], blocks[perm[:n_val]]
