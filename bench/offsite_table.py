"""Benchmark: the Offsite-Tuning protocol that cannot be gamed, on SmolLM2, emulator structures side by side.

For each emulator structure (uniform drop, width-pruned depth, CRaSh-style sharing, gradient-selected, ...) it
builds the package once, tunes the same adapter offsite (through the emulator) and on the full model, each mode at
every learning rate of --lrs and on every data split of --splits, plugs the offsite adapter into the full model,
and reports side by side:

- plug-in and full-tuning perplexity, each mode at its OWN best learning rate (the lowest mean held-out perplexity
  over the splits; the same rule for both modes), mean and sd over the splits, and the recovery (the plug-in's
  share of full tuning's gain over zero-shot, per split, then mean and sd);
- exact-match two-digit addition accuracy of both at those learning rates;
- the emulator's zero-shot perplexity against the model's;
- the package's share of the model's unique parameters (shared blocks counted once);
- client FLOPs per training step (torch's FlopCounterMode), against full tuning's;
- the bottom and top adapters' start-of-tuning gradient cosines with the full middle (tandem.emulator.gradient_select,
  on the data owner's text of the first split).

Full tuning's sweep is computed once and shared by all structures. Every finished cell (a build, a tuned run and its
measurements) is saved in the JSON at once; --resume continues a run from there. A Markdown table goes to stdout.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/offsite_table.py --structures uniform,width256,share,share-learned,share-gradient
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

# Public text for distillation: the docstrings of the standard library's modules, classes and functions
# (real prose, written by people; about 416k SmolLM2 tokens). pydoc_data, the data owner's text, is excluded.
SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "idlelib",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
}
# The named structures of --structures: `cloud emulator build` settings (widthN: every middle block at N neurons).
STRUCTURES = {
    "uniform": {"drop": True},  # --drop-ratio's count of evenly spaced blocks (the paper's)
    "greedy": {"drop": True, "select": "greedy"},  # the same count, the blocks whose removal costs least
    "share": {"drop": True, "structure": "share"},  # as many CKA clusters as --drop-ratio keeps, shared depth
    # the same, clusters of at most 4 blocks and a fitted scale on each slot's update (--max-cluster, --slot-scales)
    "share-scaled": {"drop": True, "structure": "share", "max_cluster": 4, "slot_scales": "fit"},
    # the same, the fitted scales then trained with the blocks in distillation (--slot-scales learn)
    "share-learned": {"drop": True, "structure": "share", "max_cluster": 4, "slot_scales": "learn"},
    "gradient": {"select": "gradient"},  # uniform drops and widths under --budget, by gradient cosine
    "share-gradient": {"structure": "share", "select": "gradient"},  # clusters, representatives and widths
    # the same under clusters of at most 4 blocks, the slot scales fitted and then learned in distillation
    "share-gradient-learned": {"structure": "share", "select": "gradient", "max_cluster": 4, "slot_scales": "learn"},
}
# What changes a cell's result: a --resume run must agree on all of these.
PROTOCOL_KEYS = (
    "model",
    "client_blocks",
    "drop_ratio",
    "budget",
    "kd_steps",
    "kd_lr",
    "kl_weight",
    "kd_norm",
    "tune_steps",
    "lora_rank",
    "lora_targets",
    "batch_size",
    "seq_len",
    "eval_seqs",
    "qa_train",
    "qa_test",
    "public_limit",
    "grad_seqs",
    "select_seqs",
    "seed",
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [n for n in names if not _known(base(n)) or n.partition("+")[2] not in ("", "clusters")]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown structures {bad}; choose from {sorted(STRUCTURES)} or widthN, each optionally +clusters"
        )
    return names


def _known(name: str) -> bool:
    return name in STRUCTURES or re.fullmatch(r"width\d+|blocks\d+(\.\d+)*", name) is not None


def base(name: str) -> str:
    """The emulator structure of a --structures name ("uniform+clusters" -> "uniform"): its build is shared."""
    return name.partition("+")[0]


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, threads=2, seed=0, work="scratch directory", results=True)
    p.add_argument("--client-blocks", default="2:2", help="adapter blocks K:M; default 2:2 (the paper's)")
    p.add_argument(
        "--structures",
        type=_names,
        default=_names("uniform,width256,share,share-learned,share-gradient"),
        help="emulator structures, side by side: uniform (--drop-ratio's evenly spaced blocks), greedy, widthN (all "
        "middle blocks at N MLP neurons), share (CKA clusters, as many as --drop-ratio keeps), share-scaled (the same, "
        "clusters of at most 4 blocks, a fitted scale on each slot's update), share-learned (those scales then trained "
        "in distillation), gradient (uniform "
        "drops and widths under --budget, chosen by gradient cosine), share-gradient (clusters, representatives and "
        "widths by gradient cosine), share-gradient-learned (the same, clusters of at most 4 blocks, learned slot "
        "scales), blocksA.B.C (exactly those middle blocks); NAME+clusters puts LoRA on the blocks the emulator keeps too (client tune "
        "--lora-layers client,clusters), against full tuning with the same placement; default "
        "uniform,width256,share,share-learned,share-gradient",
    )
    p.add_argument(
        "--lrs", type=_floats, default=[5e-4, 1e-3, 2e-3], help="learning rates swept; default 5e-4,1e-3,2e-3"
    )
    p.add_argument(
        "--splits",
        type=_ints,
        default=[0, 1, 2, 3],
        help="data splits (seeds of the split and the LoRA); default 0,1,2,3",
    )
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=0.62,
        help="share of middle blocks uniform/greedy drop and share clusters away; default 0.62 (SmolLM2: 10 of 26)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.6,
        help="largest share of the model's parameters the gradient-selected packages hold; default 0.6",
    )
    p.add_argument(
        "--kd-steps", type=int, default=400, help="distillation steps of every package; default 400 (0: none)"
    )
    p.add_argument("--kd-lr", type=float, default=1e-3, help="distillation learning rate; default 1e-3")
    p.add_argument(
        "--kl-weight", type=float, default=1.0, help="KL(teacher || emulator) weight of the distillation; default 1"
    )
    p.add_argument("--kd-norm", choices=("global", "token"), default="token", help="KD normalisation; default token")
    p.add_argument("--tune-steps", type=int, default=160, help="tuning steps of every tuned run; default 160")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on the adapter blocks; default 8")
    p.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="modules adapted in the adapter blocks; default: every linear layer of a Llama block",
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence; default 64")
    p.add_argument("--eval-seqs", type=int, default=24, help="held-out real-text sequences for perplexity; default 24")
    p.add_argument("--qa-train", type=int, default=300, help="generated arithmetic questions to tune on; default 300")
    p.add_argument("--qa-test", type=int, default=60, help="held-out arithmetic questions for accuracy; default 60")
    p.add_argument(
        "--public-limit", type=int, default=0, help="use only the first N public texts (0: all); for quick runs"
    )
    p.add_argument(
        "--select-seqs",
        type=int,
        default=8,
        help="public sequences the gradient-selected builds score their candidates on; default 8",
    )
    p.add_argument(
        "--grad-seqs", type=int, default=8, help="data-owner sequences the gradient cosines sum over; default 8"
    )
    p.add_argument("--resume", action="store_true", help="reuse the finished cells of --json (same protocol settings)")
    return p.parse_args(argv)


def public_text(min_len: int = 40, limit: int = 0) -> list[str]:
    """Docstrings of the standard library, one text per source file, read with ast (nothing is imported); with
    `limit`, the first `limit` files' only."""
    import ast
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs = [
                d
                for d in (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
                if d and len(d) >= min_len
            ]
            if docs:
                out.append("\n\n".join(docs))
                if len(out) == limit:
                    return out
    return out


def private_text() -> list[str]:
    """The data owner's real text: the Python language reference topics shipped with Python (pydoc_data)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def arithmetic(n: int, seed: int) -> list[tuple[str, str]]:
    """A task with a right answer: two-digit addition, as (prompt, completion)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append((f"Question: What is {a} plus {b}?\nAnswer:", f" {a + b}"))
    return out


def write_data(args, tok, split: int | None = None) -> tuple[str, str, list, torch.Tensor]:
    """Writes the public data directory (once) and split `split`'s private one (default --seed); returns them, the
    split's QA test set and its held-out text ids (N, T)."""
    import torch

    split = args.seed if split is None else split
    limit = getattr(args, "public_limit", 0)
    pub = os.path.join(args.work, f"public{limit or ''}")
    priv = os.path.join(args.work, f"split{split}", "private")
    os.makedirs(priv, exist_ok=True)
    if not os.path.exists(pub):  # the same for every split: written once, atomically
        os.makedirs(pub + ".partial", exist_ok=True)
        with open(os.path.join(pub + ".partial", "stdlib_docstrings.jsonl"), "w") as f:
            for t in public_text(limit=limit):
                f.write(json.dumps({"text": t}) + "\n")
        os.replace(pub + ".partial", pub)
    texts = private_text()
    random.Random(split).shuffle(texts)
    # Held-out real text for perplexity: whole topics the tuning never sees.
    ids: list[int] = []
    while len(ids) < args.eval_seqs * args.seq_len and texts:
        ids += tok(texts.pop(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    eval_ids = torch.tensor(ids[: args.eval_seqs * args.seq_len]).view(args.eval_seqs, args.seq_len)
    budget = args.tune_steps * args.batch_size * args.seq_len * 2  # about two epochs' worth of real text
    with open(os.path.join(priv, "topics.jsonl"), "w") as f:
        n = 0
        for t in texts:
            if n > budget:
                break
            f.write(json.dumps({"text": t}) + "\n")
            n += len(t) // 4
    with open(os.path.join(priv, "arithmetic.jsonl"), "w") as f:
        for p_, c in arithmetic(args.qa_train, split + 1):
            f.write(json.dumps({"prompt": p_, "completion": c}) + "\n")
    return pub, priv, arithmetic(args.qa_test, split + 2), eval_ids


def perplexity(sm, ids, batch_size: int) -> float:
    """Perplexity of a StagedModel on (N, T) held-out ids."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x = ids[i : i + batch_size]
            batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            loss, k = sm.loss(batch, -1, 0, train=False)
            total += float(loss) * k
            n += k
    return math.exp(total / n)


def accuracy(sm, qa, tok, batch_size: int = 16) -> float:
    """Exact-match accuracy of greedy decoding: every answer token (and EOS) is the argmax given the ones before."""
    import torch

    right = 0
    for i in range(0, len(qa), batch_size):
        rows = []
        for p_, c in qa[i : i + batch_size]:
            pi = tok(p_, add_special_tokens=False)["input_ids"]
            ci = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((pi, ci))
        t = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), t), tok.eos_token_id)
        am = torch.zeros((len(rows), t), dtype=torch.long)
        for r, (a, b) in enumerate(rows):
            ids[r, : len(a) + len(b)] = torch.tensor(a + b)
            am[r, : len(a) + len(b)] = 1
        with torch.no_grad():
            pred = sm.logits(ids, am, -1, 0, train=False).argmax(-1)  # (B, T)
        for r, (a, b) in enumerate(rows):
            want = torch.tensor(b[:-1])  # the digits; EOS after the number is not required
            got = pred[r, len(a) - 1 : len(a) - 1 + len(want)]
            right += bool(torch.equal(got, want))
    return right / len(qa)


def step_flops(sm, batch: dict) -> int:
    """FLOPs of one client training step (forward, loss, backward into the adapter), by torch's FlopCounterMode:
    matrix products and attention, independent of how busy the machine is."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _ = sm.loss(batch, 0, 0, train=True)
        loss.backward()
    for p in sm.adapter.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Cells:
    """The finished cells of a run by key, written to --json after each one: what --resume continues from."""

    def __init__(self, args: argparse.Namespace):
        self.path = args.json
        self.protocol = {k: getattr(args, k) for k in PROTOCOL_KEYS}
        self.data: dict[str, dict] = {}
        self.computed = 0
        if args.resume and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            differ = {k: (saved.get("protocol", {}).get(k), v) for k, v in self.protocol.items()}
            differ = {k: v for k, v in differ.items() if v[0] != v[1]}
            if differ:
                raise SystemExit(f"--resume: {self.path} was made with other settings (saved, now): {differ}")
            self.data = saved.get("cells", {})

    def get(self, key: str, compute) -> dict:
        """The cell `key`, computed (and saved at once) when it is not finished yet."""
        if key not in self.data:
            t0 = time.perf_counter()
            value = compute()
            value["wall_s"] = time.perf_counter() - t0
            self.data[key] = value
            self.computed += 1
            self.save()
            print(key, {k: v for k, v in value.items() if not isinstance(v, dict | list)}, flush=True)
        return self.data[key]

    def save(self, extra: dict | None = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"protocol": self.protocol, **(extra or {}), "cells": self.data}, f, indent=1)
        os.replace(tmp, self.path)


def build_settings(args: argparse.Namespace, name: str) -> dict:
    """`build_emulator` keyword arguments of a named structure."""
    width = re.fullmatch(r"width(\d+)", name)
    if width:
        return {"drop_ratio": 0.0, "mlp_width": int(width.group(1))}
    if name.startswith("blocks"):  # blocks2.5.8: exactly these middle blocks (cloud emulator build --keep-blocks)
        return {"keep_blocks": [int(b) for b in name[len("blocks") :].split(".")]}
    spec = STRUCTURES[name]
    out = {"drop_ratio": args.drop_ratio if spec.get("drop") else None, "select": spec.get("select", "uniform")}
    out.update({k: spec[k] for k in ("structure", "max_cluster", "slot_scales") if k in spec})
    if out["select"] == "gradient":
        out["budget"], out["select_seqs"] = args.budget, args.select_seqs
    return out


def build_cell(args: argparse.Namespace, name: str, pub: str) -> dict:
    """Builds structure `name`'s package; returns what the table needs of its manifest."""
    import shutil

    from tandem.emulator.build import build_emulator
    from tandem.emulator.distill import DistillConfig

    pkg = os.path.join(args.work, "pkg", name)
    shutil.rmtree(pkg, ignore_errors=True)
    cfg = DistillConfig(
        steps=args.kd_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.kd_lr,
        max_val_batches=4,
        warmup=max(1, args.kd_steps // 10),
        kl_weight=args.kl_weight,
        kd_norm=args.kd_norm,
        val_every=max(1, args.kd_steps // 3),
        progress=False,
    )
    manifest = build_emulator(args.model, args.client_blocks, pkg, pub, cfg, **build_settings(args, name))
    selection = {k: v for k, v in manifest["selection"].items() if k != "cka"}
    return {
        "package": pkg,
        "package_share": manifest["params"]["package_share_of_model"],
        "kept": manifest["kept_middle_blocks"],
        "slots": manifest.get("slots"),
        "mlp_width": manifest["pruning"]["mlp_width"],
        "selection": selection,
        "val_kd_after": manifest["distillation"].get("val_kd_after"),
    }


class Protocol:
    """The models and data the cells share: the full model with a client adapter, per-split data, the probe."""

    def __init__(self, args: argparse.Namespace, cells: Cells):
        from tandem.client.assemble import build_local
        from tandem.stages.loading import default_model_dir, load_tokenizer
        from tandem.stages.lora import LoraConfig

        self.args, self.cells = args, cells
        self.tok = load_tokenizer(args.model or default_model_dir())
        self.lora = LoraConfig(
            rank=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules=tuple(args.lora_targets.split(","))
        )
        self.full = build_local(args.model, args.client_blocks, self.lora, args.seed, middle_lora=False)
        self.placed: dict[tuple[int, ...], object] = {}  # --lora-layers -> the full model with that adapter layout
        self.data = {s: write_data(args, self.tok, s) for s in args.splits}  # split -> (pub, priv, qa, eval ids)
        self.probe = None

    def measure(self, sm, split: int) -> dict:
        """Held-out perplexity and addition accuracy of `sm` on split `split`."""
        _, _, qa, eval_ids = self.data[split]
        return {"ppl": perplexity(sm, eval_ids, self.args.batch_size), "acc": accuracy(sm, qa, self.tok)}

    def zero_shot(self, split: int) -> dict:
        for b in self.full.adapter.b:  # LoRA B = 0: the adapter adds nothing
            b.data.zero_()
        return self.measure(self.full, split)

    def batch(self) -> dict:
        ids = self.data[self.args.splits[0]][3][: self.args.batch_size]
        return {"input_ids": ids, "attention_mask": ids.new_ones(ids.shape), "labels": ids}

    def full_for(self, layers: tuple[int, ...]):
        """The full model with LoRA on `layers` (the client's blocks when empty), built once per layout."""
        from dataclasses import replace

        from tandem.client.assemble import build_local

        if not layers:
            return self.full
        if layers not in self.placed:
            lora = replace(self.lora, layers=layers)
            self.placed[layers] = build_local(self.args.model, self.args.client_blocks, lora, self.args.seed)
        return self.placed[layers]

    def tuned(self, name: str, pkg: str | None, split: int, lr: float, layers: tuple[int, ...] = ()) -> dict:
        """Tunes the adapter (offsite through `pkg`, or on the full model when None) on the blocks `layers` (the
        client's when empty) and measures it plugged in."""
        from dataclasses import replace

        from tandem.client.assemble import build_offsite
        from tandem.client.offsite import load_adapter
        from tandem.client.trainer import TuneConfig, tune

        args, lora = self.args, replace(self.lora, layers=layers)
        out = os.path.join(args.work, "runs", name, f"s{split}", f"lr{lr:g}")
        report = tune(
            TuneConfig(
                data=self.data[split][1],
                out=out,
                mode="offsite" if pkg else "local",
                model=args.model,
                client_blocks=args.client_blocks,
                emulator=pkg,
                middle_lora=bool(layers) and not pkg,
                steps=args.tune_steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                lr=lr,
                lora=lora,
                seed=split,
                checkpoint_every=10**6,
                overwrite=True,
                progress=False,
            )
        )
        full = self.full_for(layers)
        load_adapter(full, os.path.join(out, "adapter"))
        cell = self.measure(full, split)
        cell["step_wall_s_median"] = statistics.median(s["wall_s"] for s in report["steps"][1:] or report["steps"])
        cell["trainable_params"] = report["adapter"]["trainable_params"]
        if pkg:
            emulator = build_offsite(pkg, lora, split)
            load_adapter(emulator, os.path.join(out, "adapter"))
            cell["emulator_ppl"] = perplexity(emulator, self.data[split][3], args.batch_size)
        return cell

    def emulator_zero_shot(self, pkg: str, split: int) -> dict:
        from tandem.client.assemble import build_offsite

        return self.measure(build_offsite(pkg, self.lora, split), split)

    def flops(self, pkg: str | None, layers: tuple[int, ...] = ()) -> dict:
        from dataclasses import replace

        from tandem.client.assemble import build_offsite

        lora = replace(self.lora, layers=layers)
        model = build_offsite(pkg, lora, self.args.seed) if pkg else self.full_for(layers)
        return {"flops": step_flops(model, self.batch())}

    def gradients(self, pkg: str) -> dict:
        """Start-of-tuning gradient cosines of the bottom and top adapter through the package's emulator and through
        the full middle, on the data owner's text of the first split (its first --grad-seqs sequences)."""
        from tandem.client.assemble import build_offsite
        from tandem.emulator.gradient_select import GradientProbe
        from tandem.emulator.text import pack_blocks, read_texts

        if self.probe is None:
            ids = pack_blocks(read_texts(self.data[self.args.splits[0]][1]), self.tok, self.args.seq_len)
            parts = self.full.bottom.parts
            self.probe = GradientProbe(parts, self.full.layout, ids[: self.args.grad_seqs], self.lora, self.args.seed)
        return self.probe.score(build_offsite(pkg, self.lora, self.args.seed).middle.stage)


def best_lr(args: argparse.Namespace, cells: Cells, prefix: str) -> float:
    """The learning rate of --lrs with the lowest mean held-out perplexity over the splits (every mode alike)."""
    return min(
        args.lrs, key=lambda lr: statistics.mean(cells.data[f"{prefix}/s{s}/lr{lr:g}"]["ppl"] for s in args.splits)
    )


def summary(args: argparse.Namespace, cells: Cells, name: str) -> dict:
    """One structure's row: each mode at its own best learning rate, means and sds over the splits."""
    data, splits = cells.data, args.splits
    zs = [data[f"zero_shot/s{s}"]["ppl"] for s in splits]
    full_name = full_key(data[f"{name}/layers"]["layers"])
    lr_full, lr_pi = best_lr(args, cells, full_name), best_lr(args, cells, name)
    full = [data[f"{full_name}/s{s}/lr{lr_full:g}"] for s in splits]
    plug = [data[f"{name}/s{s}/lr{lr_pi:g}"] for s in splits]
    emu = [data[f"{base(name)}/emulator_zero_shot/s{s}"]["ppl"] for s in splits]
    recovery = [(z - p["ppl"]) / (z - f["ppl"]) if z > f["ppl"] else float("nan") for z, p, f in zip(zs, plug, full)]
    acc_pi, acc_ft = statistics.mean(p["acc"] for p in plug), statistics.mean(f["acc"] for f in full)
    built, grads = data[f"{base(name)}/build"], data[f"{base(name)}/gradients"]
    flops, flops_full = data[f"{name}/flops"]["flops"], data[f"{full_name}/flops"]["flops"]
    return {
        "lora_layers": data[f"{name}/layers"]["layers"],
        "lr_plug_in": lr_pi,
        "lr_full": lr_full,
        "zero_shot_ppl": _mean_sd(zs),
        "plug_in_ppl": _mean_sd([p["ppl"] for p in plug]),
        "full_tuning_ppl": _mean_sd([f["ppl"] for f in full]),
        "ot_emulator_ppl": _mean_sd([p["emulator_ppl"] for p in plug]),
        "recovery": _mean_sd(recovery),
        "recovery_per_split": recovery,
        "acc_plug_in": acc_pi,
        "acc_full": acc_ft,
        "acc_ratio": acc_pi / acc_ft if acc_ft > 0 else None,
        "emulator_zero_shot_ppl": _mean_sd(emu),
        "emulator_worse_by": statistics.mean(e / z - 1 for e, z in zip(emu, zs)),
        "package_share": built["package_share"],
        "client_flops": flops,
        "client_flops_over_full": flops / flops_full,
        "gradient_cosine": {side: grads[side]["cosine"] for side in ("bottom", "top")},
        "aims": {
            "recovery >= 90%": _mean_sd(recovery)[0] >= 0.9,
            "addition >= 0.7x": acc_ft > 0 and acc_pi / acc_ft >= 0.7,
            "emulator >= 15% worse": statistics.mean(e / z - 1 for e, z in zip(emu, zs)) >= 0.15,
            "package <= 60%": built["package_share"] <= 0.6,
        },
    }


def table(rows: dict[str, dict]) -> str:
    """The Markdown table of the summaries."""
    head = (
        "| structure | package | emulator zero-shot (worse by) | plug-in ppl (lr) | full tuning ppl (lr) | recovery | "
        "addition plug-in / full | client GFLOP/step (x full) | grad cos bottom / top | aims met |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, r in rows.items():
        pm = "\u00b1"
        lines.append(
            f"| {name} | {r['package_share']:.1%} | {r['emulator_zero_shot_ppl'][0]:.2f} ({r['emulator_worse_by']:+.0%}) "
            f"| {r['plug_in_ppl'][0]:.2f} {pm} {r['plug_in_ppl'][1]:.2f} ({r['lr_plug_in']:g}) "
            f"| {r['full_tuning_ppl'][0]:.2f} {pm} {r['full_tuning_ppl'][1]:.2f} ({r['lr_full']:g}) "
            f"| {r['recovery'][0]:.1%} {pm} {r['recovery'][1]:.1%} "
            f"| {r['acc_plug_in']:.3f} / {r['acc_full']:.3f} "
            f"| {r['client_flops'] / 1e9:.3g} ({r['client_flops_over_full']:.3f}) "
            f"| {r['gradient_cosine']['bottom']:.3f} / {r['gradient_cosine']['top']:.3f} "
            f"| {sum(r['aims'].values())}/4 |"
        )
    return head + "\n".join(lines)


def full_key(layers: list[int]) -> str:
    """The cells' prefix of full tuning with the adapter on `layers` (the client's blocks when empty)."""
    from tandem.stages.lora_layers import format_layers

    return "full" if not layers else f"full@{format_layers(layers)}"


def placement(name: str, pkg: str) -> dict:
    """The --lora-layers of a structure name: empty (the client's blocks), or with +clusters those and the kept ones."""
    from tandem.client.placement import resolve_placement

    return {"layers": list(resolve_placement("client,clusters", "offsite", pkg)) if "+" in name else []}


def run(args: argparse.Namespace, cells: Cells) -> dict:
    """Every cell of the protocol, builds first, then split by split (so an interrupted run has whole splits)."""
    proto = Protocol(args, cells)
    pub = proto.data[args.splits[0]][0]
    bases = dict.fromkeys(base(name) for name in args.structures)
    builds = {b: cells.get(f"{b}/build", lambda b=b: build_cell(args, b, pub)) for b in bases}
    pkgs = {name: builds[base(name)]["package"] for name in args.structures}
    layers = {n: tuple(cells.get(f"{n}/layers", lambda n=n: placement(n, pkgs[n]))["layers"]) for n in pkgs}
    for placed in dict.fromkeys(layers.values()):
        cells.get(f"{full_key(list(placed))}/flops", lambda p=placed: proto.flops(None, p))
    for name, pkg in pkgs.items():
        cells.get(f"{name}/flops", lambda p=pkg, n=name: proto.flops(p, layers[n]))
    for b in bases:
        cells.get(f"{b}/gradients", lambda p=builds[b]["package"]: proto.gradients(p))
    for s in args.splits:
        cells.get(f"zero_shot/s{s}", lambda s=s: proto.zero_shot(s))
        for placed in dict.fromkeys(layers.values()):
            for lr in args.lrs:
                key = f"{full_key(list(placed))}/s{s}/lr{lr:g}"
                cells.get(key, lambda s=s, lr=lr, p=placed: proto.tuned(full_key(list(p)), None, s, lr, p))
        for b in bases:
            pkg = builds[b]["package"]
            cells.get(f"{b}/emulator_zero_shot/s{s}", lambda p=pkg, s=s: proto.emulator_zero_shot(p, s))
        for name, pkg in pkgs.items():
            for lr in args.lrs:
                cells.get(
                    f"{name}/s{s}/lr{lr:g}", lambda n=name, p=pkg, s=s, lr=lr: proto.tuned(n, p, s, lr, layers[n])
                )
    return {name: summary(args, cells, name) for name in args.structures}


def main(argv=None) -> int:
    """Runs the protocol and writes the JSON and the table."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    cells = Cells(args)
    t0 = time.perf_counter()
    rows = run(args, cells)
    first, lr_full = args.structures[0], rows[args.structures[0]]["lr_full"]
    s0 = args.splits[0]
    cells.save(
        {
            "settings": vars(args),
            "summary": rows,
            "cells_computed_this_run": cells.computed,
            "wall_s_this_run": time.perf_counter() - t0,
            # for compare_modes.py: the first structure's and full tuning's step times at their best lr
            "tune_step_wall_s_median": {
                "offsite": cells.data[f"{first}/s{s0}/lr{rows[first]['lr_plug_in']:g}"]["step_wall_s_median"],
                "full": cells.data[f"{full_key(rows[first]['lora_layers'])}/s{s0}/lr{lr_full:g}"]["step_wall_s_median"],
            },
            "adapter_trainable_params": cells.data[f"{full_key(rows[first]['lora_layers'])}/s{s0}/lr{lr_full:g}"][
                "trainable_params"
            ],
        }
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
