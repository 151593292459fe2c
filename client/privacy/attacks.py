"""Attacks a curious cloud can run on what it receives, with the weights it shipped: the audit's arsenal."""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.stages.arch import Parts
from tandem.stages.loading import client_parts
from tandem.stages.lora import Binding, bind, inject_slots
from tandem.stages.modules import StageLayout, run_blocks

# Public text for the learned inverter: the docstrings of these standard-library modules (any
# Python installation has them; none of it is the data owner's).
PUBLIC_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "queue",
    "random",
    "re",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "zipfile",
)


@functools.lru_cache(maxsize=1)
def public_text() -> str:
    """English prose from the standard library's docstrings, in a fixed order."""
    docs: list[str] = []
    for name in PUBLIC_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in [(name, mod)] + sorted(vars(mod).items()):
            if attr == name or getattr(obj, "__module__", None) == name:
                doc = inspect.getdoc(obj)
                if doc:
                    docs.append(doc)
    return "\n\n".join(dict.fromkeys(docs))


def public_ids(tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) token ids of public text, at most n_tokens in all."""
    prefix = public_text()[: 16 * n_tokens]  # a prefix is plenty: >= 1 token per 16 chars
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    n = max(1, min(len(ids), n_tokens) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class KnownStages:
    """The attacker's copy of the client's stages: the shipped weights, optionally with a LoRA bound.

    Attributes:
        parts: The client's partial model (blocks renumbered 0..K+M-1).
        layout: Where the model is cut.
        binding: LoRA tensors to bind (the data owner's tuned adapter), or None for the shipped weights.
    """

    parts: Parts
    layout: StageLayout
    binding: Binding | None = None

    @classmethod
    def build(cls, config, layout: StageLayout, state: dict, adapter: tuple[dict, dict] | None = None) -> KnownStages:
        """Builds the stages from shipped weights; `adapter` = (adapter_config, peft tensors) binds a LoRA."""
        parts = client_parts(config, layout, state)
        binding = None
        if adapter is not None:
            adapter_config, tensors = adapter
            targets = tuple(adapter_config["target_modules"])
            specs = inject_slots(parts.blocks, parts.arch, layout.client_blocks, targets)
            pairs = {
                s.name: (tensors[f"{s.name}.lora_A.weight"], tensors[f"{s.name}.lora_B.weight"])
                for s in specs
                if f"{s.name}.lora_A.weight" in tensors
            }
            binding = Binding(pairs, float(adapter_config["lora_alpha"]) / float(adapter_config["r"]))
        return cls(parts, layout, binding)

    @property
    def bottom_blocks(self) -> list:
        return [self.parts.blocks[i] for i in range(self.layout.bottom)]

    @property
    def top_blocks(self) -> list:
        k = self.layout.bottom
        return [self.parts.blocks[i] for i in range(k, k + self.layout.top)]

    @property
    def embedding(self) -> torch.Tensor:
        return self.parts.embed.weight  # (V, H)

    @torch.no_grad()
    def bottom(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bottom-stage output (B, T, H) for token ids (B, T)."""
        with bind(self.binding):
            h = self.parts.embed(ids)
            if self.parts.pos_embed is not None:
                h = h + self.parts.pos_embed(torch.arange(ids.shape[1]).unsqueeze(0))
            return run_blocks(self.parts, self.bottom_blocks, h, attention_mask)

    @torch.no_grad()
    def bottom_masked(self, ids: torch.Tensor, pos: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
        """Bottom stage on one sequence (L,) with explicit positions (L,) and who-sees-whom (L, L) bool."""
        with bind(self.binding):
            h = self.parts.embed(ids.unsqueeze(0))  # (1, L, H)
            if self.parts.pos_embed is not None:
                h = h + self.parts.pos_embed(pos.unsqueeze(0))
            mask = torch.zeros(1, 1, *allow.shape, dtype=h.dtype).masked_fill(~allow, torch.finfo(h.dtype).min)
            kwargs = {"attention_mask": mask}
            if self.parts.rotary is not None:
                kwargs["position_embeddings"] = self.parts.rotary(h, pos.unsqueeze(0))
                kwargs["position_ids"] = pos.unsqueeze(0)
            for block in self.bottom_blocks:
                out = block(h, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            return h[0]  # (L, H)

    @torch.no_grad()
    def top_hidden(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The top blocks and the final norm (the LM head's input), (B, T, H)."""
        with bind(self.binding):
            return self.parts.norm(run_blocks(self.parts, self.top_blocks, h, attention_mask))


def _cos(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1) @ F.normalize(table, dim=-1).T  # (n, V)


def logit_lens(known: KnownStages, h: torch.Tensor) -> torch.Tensor:
    """Attack a1: the model's own final norm and LM head read the cut state as if it were the last layer."""
    with torch.no_grad():
        return known.parts.head(known.parts.norm(h)).argmax(-1)  # (n,)


def nearest_embedding(known: KnownStages, h: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Attack a2: the input embedding nearest (cosine) to the state, after removing the public-text mean."""
    with torch.no_grad():
        return _cos(h - mean, known.embedding).argmax(-1)  # (n,)


class RidgeInverter:
    """Attack b: a linear map from cut states to input embeddings, fitted on public text; decodes to the nearest token.

    The attacker passes public text through the known bottom stage (and through the same clipping and
    noise when the run used them: the defense's settings are in the clear), then solves ridge
    regression from the states to the embeddings of the tokens that produced them.
    """

    def __init__(self, known: KnownStages, ids: torch.Tensor, defense=None, lam: float = 1e-2, batch: int = 8):
        states, targets = [], []
        for i in range(0, len(ids), batch):
            x = ids[i : i + batch]
            h = known.bottom(x, torch.ones_like(x))  # (b, T, H)
            if defense is not None:
                h = defense(h, None, 0, 10_007 + i, True)  # the attacker's own noise draws
            states.append(h[:, 1:].reshape(-1, h.shape[-1]))  # position 0 is an outlier; fitted apart below
            targets.append(x[:, 1:].reshape(-1))
        x = torch.cat(states).double()
        self.mean = x.mean(0)
        self.cov = torch.cov(x.T)  # (H, H): what the adaptive attacker aligns received states to
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, H+1)
        y = known.embedding.detach()[torch.cat(targets)].double()  # (n, H)
        gram = xa.T @ xa
        reg = lam * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        self.w = torch.linalg.solve(gram + reg, xa.T @ y).float()  # (H+1, H)
        self.mean = self.mean.float()
        self.embedding = known.embedding.detach()

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Cosine of the predicted embedding with every token's, (n, V)."""
        with torch.no_grad():
            pred = torch.cat([h, torch.ones(len(h), 1)], 1) @ self.w  # (n, H)
            return _cos(pred, self.embedding)


def search_attack(
    known: KnownStages,
    h: torch.Tensor,
    cands: torch.Tensor,
    defense=None,
    iters: int = 12,
    chunk_tokens: int = 512,
    prior: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Attack c: the candidate tokens whose bottom-stage output matches the received states.

    Exploits causality: position t's state depends only on tokens <= t. Each iteration scores every
    candidate of every position under the current guess of its prefix in one masked pass (each
    candidate sees the prefix and itself, at position t), keeps the nearest, and stops when nothing
    changes: the fixed point is the greedy left-to-right search. Only positions after the first
    change are rescored.

    Args:
        known: The attacker's stages.
        h: Received states of one sequence's valid tokens, (T, H).
        cands: Candidate token ids per position, (T, C) (e.g. the learned inverter's top C).
        defense: The run's cut defense; its clipping is applied to the candidates' outputs.
        iters: Upper bound on iterations.
        chunk_tokens: Candidate slots per masked pass (memory bound).
        prior: Log-prior of each candidate, (T, C), subtracted from distance / scale (None: distance alone).
        scale: What a squared distance is divided by before the prior is subtracted.
    """
    t_len, c = cands.shape
    x = cands[:, 0].clone()
    dist = torch.full((t_len, c), float("inf"))
    start = 0
    per = max(1, chunk_tokens // c)
    for _ in range(iters):
        for lo in range(start, t_len, per):
            hi = min(t_len, lo + per)
            pos_c = torch.arange(lo, hi).repeat_interleave(c)  # (P*C,)
            seq = torch.cat([x[:hi], cands[lo:hi].reshape(-1)])
            pos = torch.cat([torch.arange(hi), pos_c])
            n = len(seq)
            allow = torch.zeros(n, n, dtype=torch.bool)
            allow[:hi, :hi] = torch.ones(hi, hi, dtype=torch.bool).tril()
            rows = torch.arange(hi, n)
            allow[rows.unsqueeze(1), torch.arange(hi).unsqueeze(0)] = torch.arange(hi).unsqueeze(0) < pos_c.unsqueeze(1)
            allow[rows, rows] = True
            out = known.bottom_masked(seq, pos, allow)[hi:].view(hi - lo, c, -1)  # (P, C, H)
            if defense is not None:
                out = _clip_at(defense, out, lo)
            dist[lo:hi] = ((out - h[lo:hi].unsqueeze(1)) ** 2).sum(-1) / scale
        cost = dist if prior is None else dist - prior
        new = cands[torch.arange(t_len), cost.argmin(1)]
        changed = (new != x).nonzero()
        x = new
        if len(changed) == 0:
            break
        start = int(changed[0]) + 1
        if start >= t_len:
            break
    return x


def _clip_at(defense, out: torch.Tensor, lo: int) -> torch.Tensor:
    """Clips candidate outputs (P, C, H) of positions lo.. with the defense's per-position bounds."""
    p = out.shape[0]
    bounds = defense.bounds(torch.zeros(1, lo + p, 1))[0, lo:]  # (P, 1)
    norm = out.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (P, C, 1)
    return out * (bounds.unsqueeze(1) / norm).clamp(max=1.0)


def gradient_attack(
    known: KnownStages, h_mid: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Label attack on the top cut: which next token does each received gradient push towards?

    The cloud holds the middle's output h' (it computed it) and receives g = dL/dh'. With the shipped
    top blocks, norm and head it pushes -g forward (a central finite-difference Jacobian-vector
    product) to the logits; the label's logit rises most, because g = J^T (softmax - onehot) / n.

    Returns:
        (B, T) guessed label at each position (the token at position t + 1).
    """
    return gradient_logits(known, h_mid, grad, attention_mask).argmax(-1)


def gradient_logits(
    known: KnownStages, h_mid: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The received gradient -g pushed forward to the logits (gradient_attack's scores), (B, T, V)."""
    d = -grad
    eps = 1e-3 * float(h_mid.norm()) / max(float(d.norm()), 1e-30)
    up = known.top_hidden(h_mid + eps * d, attention_mask)
    down = known.top_hidden(h_mid - eps * d, attention_mask)
    tangent = (up - down) / (2 * eps)  # (B, T, H)
    with torch.no_grad():
        return tangent @ known.parts.head.weight.T  # (B, T, V)


def lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: list, hypothesis: list) -> float:
    """ROUGE-L F1 (beta = 1) of two token or word sequences."""
    n = lcs(reference, hypothesis)
    if n == 0:
        return 0.0
    p, r = n / len(hypothesis), n / len(reference)
    return 2 * p * r / (p + r)
