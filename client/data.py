"""The data owner's text: reading .txt/.jsonl, packing into sequences, a held-out split, seeded batches."""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from tandem.stages.textfiles import TextFilesError, parse_row

from .errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")  # plain text: the whole file is one record
ROW_SUFFIXES = (".jsonl",)  # one JSON object a line: {"text"} or {"prompt", "completion"}
_KINDS = "/".join(TEXT_SUFFIXES + ROW_SUFFIXES)
PIECE_CHARS = 4096  # the most characters one tokenizer call sees: memory and time stay linear in the text
READ_CHARS = 1 << 20  # characters read from a file at a time
Text = str | Iterable[str]  # a string, or a stream of pieces of one


@dataclass
class Packed:
    """Packed sequences: (N, T) ids, mask and labels (IGNORE where no loss)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: torch.Tensor) -> dict:
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "labels": self.labels[idx],
        }

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def read_examples(data_dir: str) -> Iterator[tuple[Text, Text]]:
    """(prompt, completion) records, read lazily in file-name order; plain text has an empty prompt.

    The directory is checked now; the files are read as the records are consumed. A plain-text file's
    completion is a stream of bounded pieces (see `pieces`), so a file of any size, one line or many,
    is read in bounded memory.
    """
    return _records(data_dir, data_files(data_dir))


def _records(data_dir: str, names: list[str]) -> Iterator[tuple[Text, Text]]:
    for name in names:
        path = os.path.join(data_dir, name)
        try:
            if name.lower().endswith(TEXT_SUFFIXES):
                if _has_text(path):
                    yield "", pieces(_chunks(path))
                continue
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield parse_row(line, f"{path}:{lineno}")
        except TextFilesError as e:
            raise DataError(str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}") from None


def _chunks(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            yield from iter(lambda: f.read(READ_CHARS), "")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _has_text(path: str) -> bool:
    """Whether the file holds anything but whitespace (stops at the first such character)."""
    return any(not chunk.isspace() for chunk in _chunks(path))


def pieces(chunks: Iterable[str], cap: int = PIECE_CHARS) -> Iterator[str]:
    """Cuts a stream of text into pieces of at most `cap` characters, joined they are the text.

    A piece ends before the last whitespace in its second half (so words stay whole and the next piece
    starts with the space, as byte-level BPE splits anyway); a piece with no whitespace there is cut at `cap`.
    """
    buf = ""
    for chunk in chunks:
        buf += chunk
        at = 0
        while len(buf) - at > cap:
            end = _cut(buf, at, cap)
            yield buf[at:end]
            at = end
        buf = buf[at:]
    if buf:
        yield buf


def _cut(buf: str, at: int, cap: int) -> int:
    lo, hi = at + cap // 2, at + cap
    ws = max(buf.rfind(c, lo, hi) for c in " \n\t")
    return ws if ws > lo else hi


def data_files(data_dir: str, warn: bool = False) -> list[str]:
    """Names of the files of `data_dir` that are read, in reading order; with `warn`, logs the files it skips.

    Read: plain text (TEXT_SUFFIXES) and JSON lines (ROW_SUFFIXES), any letter case; not subfolders.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"--data {data_dir!r} is not a directory; point it at a folder of {_KINDS} files")
    try:
        entries = sorted(os.listdir(data_dir))
    except OSError as e:
        raise DataError(f"--data {data_dir!r}: cannot list it ({e.strerror or e})") from None
    names, skipped = [], []
    for n in entries:
        if n.lower().endswith(TEXT_SUFFIXES + ROW_SUFFIXES) and os.path.isfile(os.path.join(data_dir, n)):
            names.append(n)
        elif not n.startswith("."):
            skipped.append(n)
    if not names:
        raise DataError(f"--data {data_dir!r} has no {_KINDS} files")
    if skipped and warn:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        log.warning("--data %s: ignoring %d file(s) that are not %s: %s", data_dir, len(skipped), _KINDS, shown)
    return names


def fingerprint(data_dir: str) -> str:
    """SHA-256 over the names, sizes and contents of the files read: equal iff the same data is read.

    Checks --data (and names the files it skips) before a run touches anything else.
    """
    h = hashlib.sha256()
    for name in data_files(data_dir, warn=True):
        path = os.path.join(data_dir, name)
        try:
            with open(path, "rb") as f:
                h.update(f"{name}\0{os.fstat(f.fileno()).st_size}\0".encode())
                for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                    h.update(block)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def pack(examples: Iterable[tuple[Text, Text]], tokenizer, seq_len: int) -> Packed:
    """Tokenizes, joins examples with EOS and cuts the stream into right-padded sequences of seq_len.

    Loss is on every token of plain text, and only on the completion (and its EOS) for prompt/completion rows.
    A prompt or completion is a string or a stream of pieces; every tokenizer call sees at most one piece of
    PIECE_CHARS characters, and tokens are kept as 8-byte integers, not Python lists.
    """
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, labels = array("q"), array("q")
    for prompt, completion in examples:
        for part, labelled in ((prompt, False), (completion, True)):
            for piece in pieces([part]) if isinstance(part, str) else part:
                t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(t)
                labels.extend(t if labelled else array("q", [IGNORE]) * len(t))
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
    n_tok = len(ids)
    n = -(-n_tok // seq_len)
    ids.extend(array("q", [pad]) * (n * seq_len - n_tok))
    labels.extend(array("q", [IGNORE]) * (n * seq_len - n_tok))
    mask = torch.zeros(n * seq_len, dtype=torch.long)
    mask[:n_tok] = 1
    as_t = lambda a: torch.frombuffer(a, dtype=torch.long).clone().view(n, seq_len)  # noqa: E731
    return Packed(
        as_t(ids) if n else torch.zeros(0, seq_len, dtype=torch.long),
        mask.view(n, seq_len),
        as_t(labels) if n else torch.zeros(0, seq_len, dtype=torch.long),
    )


@dataclass
class DataSplit:
    """Train and validation sequences, and the seeded batch order."""

    train: Packed
    val: Packed
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def batch_at(self, step: int) -> dict:
        """The batch of global step `step`: depends only on the seed, the data and the step."""
        epoch, i = divmod(step, self.batches_per_epoch)
        perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return self.train.batch(perm[i * self.batch_size : (i + 1) * self.batch_size])

    def val_batches(self):
        for i in range(0, len(self.val), self.batch_size):
            yield self.val.batch(torch.arange(i, min(i + self.batch_size, len(self.val))))


MAX_VAL_SEQUENCES = 512  # held out at most: a large corpus would otherwise spend hours in every evaluation


def load_split(
    data_dir: str,
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    val_fraction: float,
    val_max: int = MAX_VAL_SEQUENCES,
) -> DataSplit:
    """Reads, packs and splits the data owner's text; the split depends only on the seed and the data.

    The validation set is `val_fraction` of the sequences, at most `val_max` of them; the rest train.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    packed = pack(read_examples(data_dir), tokenizer, seq_len)
    n = len(packed)
    if n < 2:
        raise DataError(f"--data yields only {n} sequence of {seq_len} tokens; add text or lower --seq-len")
    n_val = min(n - 1, val_max, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return DataSplit(
        packed.__class__(**packed.batch(train_idx)), packed.__class__(**packed.batch(val_idx)), batch_size, seed
    )


def check_positions(config, seq_len: int) -> None:
    """--seq-len within the model's positions (the cloud refuses longer; GPT-2's position table would raise)."""
    n = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0)
    if n and seq_len > n:
        raise DataError(f"--seq-len {seq_len} is over the model's {n} positions; use --seq-len {n} or less")
