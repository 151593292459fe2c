"""The operator's public text for distillation: .txt/.jsonl files, tokenized and packed into blocks."""

from __future__ import annotations

import torch

from tandem.stages.textfiles import TextFilesError, read_records

from .errors import TextError


def read_texts(data_dir: str) -> list[str]:
    """Texts of a directory's .txt files and .jsonl rows (prompt and completion joined), in name order."""
    try:
        return [p + c for p, c in read_records(data_dir, "--distill-data")]
    except TextFilesError as e:
        raise TextError(str(e)) from None


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
