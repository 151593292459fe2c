"""Benchmark: the Offsite-Tuning paper's table on SmolLM2 (zero-shot, emulator, OT emulator, OT plug-in, full tuning)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, threads=2, seed=0, work="scratch directory", results=True)
    p.add_argument("--client-blocks", default="2:2", help="adapter blocks K:M; default 2:2 (the paper's)")
    p.add_argument(
        "--keep-blocks",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        metavar="I,J,...",
        help="keep exactly these middle blocks instead of --drop-ratio's uniform choice (e.g. "
        "2,5,8,11,13,16,19,21,24,27: the uniform 10 with SmolLM2's sink-making block 11 for 10)",
    )
    p.add_argument(
        "--mlp-width",
        type=int,
        default=None,
        help="width-prune the emulator blocks to this many MLP neurons (cloud emulator build --mlp-width); default: full width",
    )
    p.add_argument(
        "--select",
        choices=("uniform", "greedy"),
        default="uniform",
        help="how --drop-ratio's blocks are chosen (cloud emulator build --select); default uniform (the paper's)",
    )
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=0.62,
        help="share of middle blocks the emulator drops; default 0.62 (keeps 10 of 26: package <= 60%% of the model)",
    )
    p.add_argument("--kd-steps", type=int, default=400, help="distillation steps; default 400 (about 8 min on 2 cores)")
    p.add_argument("--kd-lr", type=float, default=1e-3, help="distillation learning rate; default 1e-3")
    p.add_argument("--lm-weight", type=float, default=0.0, help="LM-loss weight during distillation; default 0")
    p.add_argument(
        "--kl-weight",
        type=float,
        default=1.0,
        help="weight of KL(teacher || emulator) of next-token distributions through the top blocks; default 1",
    )
    p.add_argument(
        "--layer-weight", type=float, default=0.0, help="per-layer matching weight during distillation; default 0"
    )
    p.add_argument(
        "--jacobian-weight",
        type=float,
        default=0.0,
        help="weight of the finite-difference Jacobian match during distillation (cloud emulator build "
        "--jacobian-weight); default 0",
    )
    p.add_argument(
        "--jacobian-eps", type=float, default=0.05, help="its input moves, relative to each token's RMS; default 0.05"
    )
    p.add_argument(
        "--kd-norm",
        choices=("global", "token"),
        default="token",
        help="KD normalisation: one teacher RMS per batch (global) or per token (token); default token",
    )
    p.add_argument(
        "--init",
        choices=("copy", "rescale"),
        default="copy",
        help="emulator init: kept blocks as they are, or residual updates rescaled to fit the teacher; default copy "
        "(rescale starts lower but ended worse after 60 KD steps)",
    )
    p.add_argument(
        "--package",
        default=None,
        help="reuse this emulator package (from an earlier run) instead of distilling one; the KD settings "
        "above are then ignored, and the package's manifest says how it was made",
    )
    p.add_argument("--tune-steps", type=int, default=40, help="tuning steps of each tuned setting; default 40")
    p.add_argument("--lr", type=float, default=1e-3, help="tuning learning rate; default 1e-3")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on the adapter blocks; default 8")
    p.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="modules adapted in the adapter blocks; default: every linear layer",
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step; default 4")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence; default 64")
    p.add_argument("--eval-seqs", type=int, default=24, help="held-out real-text sequences for perplexity; default 24")
    p.add_argument("--qa-train", type=int, default=300, help="generated arithmetic questions to tune on; default 300")
    p.add_argument("--qa-test", type=int, default=60, help="held-out arithmetic questions for accuracy; default 60")
    p.add_argument(
        "--cost-reps",
        type=int,
        default=10,
        help="training steps per model, alternating, for the side-by-side step-time ratio; default 10",
    )
    return p.parse_args(argv)


def public_text(min_len: int = 40) -> list[str]:
    """Docstrings of the standard library, one text per source file, read with ast (nothing is imported)."""
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


def write_data(args, tok) -> tuple[str, str, list, torch.Tensor]:
    """Writes the public and private data directories; returns them, the QA test set and held-out text ids."""
    import torch

    work = args.work
    pub, priv = os.path.join(work, "public"), os.path.join(work, "private")
    os.makedirs(pub, exist_ok=True)
    os.makedirs(priv, exist_ok=True)
    with open(os.path.join(pub, "stdlib_docstrings.jsonl"), "w") as f:
        for t in public_text():
            f.write(json.dumps({"text": t}) + "\n")
    texts = private_text()
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    # Held-out real text for perplexity: whole topics the tuning never sees.
    held, ids = [], []
    while len(ids) < args.eval_seqs * args.seq_len and texts:
        t = texts.pop()
        held.append(t)
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
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
        for p_, c in arithmetic(args.qa_train, args.seed + 1):
            f.write(json.dumps({"prompt": p_, "completion": c}) + "\n")
    return pub, priv, arithmetic(args.qa_test, args.seed + 2), eval_ids


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


def step_costs(models: dict, batch: dict, reps: int) -> dict:
    """Per-step client compute of each model, side by side: FLOPs of one training step and the median wall time.

    A training step is the forward, the loss and the backward into the adapter. FLOPs are counted by torch's
    FlopCounterMode (matrix products and attention), so they do not depend on how busy the machine is; the wall
    times alternate between the models so that drift in the machine's load hits both alike.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def step(sm):
        loss, _ = sm.loss(batch, 0, 0, train=True)
        loss.backward()
        for p in sm.adapter.parameters():
            p.grad = None

    flops = {}
    for k, sm in models.items():
        with FlopCounterMode(display=False) as fc:
            step(sm)
        flops[k] = fc.get_total_flops()
    walls = {k: [] for k in models}
    for _ in range(reps):
        for k, sm in models.items():
            t0 = time.perf_counter()
            step(sm)
            walls[k].append(time.perf_counter() - t0)
    return {"flops": flops, "wall_s_median": {k: statistics.median(v) for k, v in walls.items()}, "reps": reps}


def main(argv=None) -> int:
    """Runs the protocol and writes the JSON and a table."""
    args = parse_args(argv)
    import torch

    from tandem.client.assemble import build_local, build_offsite
    from tandem.client.offsite import load_adapter
    from tandem.client.trainer import TuneConfig, tune
    from tandem.emulator.build import build_emulator
    from tandem.emulator.distill import DistillConfig
    from tandem.emulator.package import load_package
    from tandem.stages.loading import default_model_dir, load_tokenizer
    from tandem.stages.lora import LoraConfig

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    tok = load_tokenizer(args.model or default_model_dir())
    pub, priv, qa_test, eval_ids = write_data(args, tok)
    lora = LoraConfig(
        rank=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules=tuple(args.lora_targets.split(","))
    )
    pkg = args.package or os.path.join(args.work, "pkg")
    t0 = time.perf_counter()
    manifest = (
        load_package(pkg).manifest
        if args.package
        else build_emulator(
            args.model,
            args.client_blocks,
            pkg,
            pub,
            DistillConfig(
                steps=args.kd_steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                lr=args.kd_lr,
                max_val_batches=4,
                warmup=max(1, args.kd_steps // 10),
                lm_weight=args.lm_weight,
                kl_weight=args.kl_weight,
                layer_weight=args.layer_weight,
                jacobian_weight=args.jacobian_weight,
                jacobian_eps=args.jacobian_eps,
                kd_norm=args.kd_norm,
                init=args.init,
                val_every=max(1, args.kd_steps // 3),
                progress=True,
            ),
            drop_ratio=None if args.keep_blocks else args.drop_ratio,
            keep_blocks=args.keep_blocks,
            select=args.select,
            mlp_width=args.mlp_width,
        )
    )
    kd_s = time.perf_counter() - t0
    runs = {}
    for name, mode in (("offsite", "offsite"), ("full", "local")):
        out = os.path.join(args.work, name)
        cfg = TuneConfig(
            data=priv,
            out=out,
            mode=mode,
            model=args.model,
            client_blocks=args.client_blocks,
            emulator=pkg if mode == "offsite" else None,
            middle_lora=False,
            steps=args.tune_steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            lora=lora,
            seed=args.seed,
            checkpoint_every=10**6,
            progress=True,
        )
        runs[name] = tune(cfg)
    full = build_local(args.model, args.client_blocks, lora, args.seed, middle_lora=False)
    emu = build_offsite(pkg, lora, args.seed)
    rows = {}

    def measure(key, sm):
        rows[key] = {"ppl": perplexity(sm, eval_ids, args.batch_size), "acc": accuracy(sm, qa_test, tok)}
        print(key, rows[key], flush=True)

    costs = step_costs(
        {"offsite": emu, "full": full},
        {
            "input_ids": eval_ids[: args.batch_size],
            "attention_mask": torch.ones_like(eval_ids[: args.batch_size]),
            "labels": eval_ids[: args.batch_size],
        },
        args.cost_reps,
    )
    print("per-step client compute", costs, flush=True)
    measure("full_zero_shot", full)
    measure("emulator_zero_shot", emu)
    load_adapter(emu, os.path.join(args.work, "offsite", "adapter"))
    measure("ot_emulator", emu)
    load_adapter(full, os.path.join(args.work, "offsite", "adapter"))
    measure("ot_plug_in", full)
    load_adapter(full, os.path.join(args.work, "full", "adapter"))
    measure("full_tuning", full)

    step = {k: statistics.median(s["wall_s"] for s in r["steps"][1:]) for k, r in runs.items()}
    gain_ft = rows["full_zero_shot"]["ppl"] - rows["full_tuning"]["ppl"]
    gain_pi = rows["full_zero_shot"]["ppl"] - rows["ot_plug_in"]["ppl"]
    p = manifest["params"]
    res = {
        "settings": vars(args),
        "model_id": manifest["model_id"],
        "kept_middle_blocks": manifest["kept_middle_blocks"],
        "selection": manifest.get("selection", {"method": "uniform"}),
        "distillation": {
            k: manifest["distillation"].get(k)
            for k in ("val_kd_before", "val_kd_after", "val", "rescale_factors", "teacher_cache_s", "config")
        }
        | {"wall_s": None if args.package else kd_s, "package": pkg},
        "table": rows,
        "aims": {
            "emulator_zero_shot_ppl_worse_by": rows["emulator_zero_shot"]["ppl"] / rows["full_zero_shot"]["ppl"] - 1,
            "plug_in_recovers_share_of_ft_gain": gain_pi / gain_ft if gain_ft > 0 else None,
            "package_share_of_model_params": p["package_share_of_model"],
            "offsite_step_flops_over_full_step_flops": costs["flops"]["offsite"] / costs["flops"]["full"],
            "offsite_step_wall_over_full_step_wall": costs["wall_s_median"]["offsite"] / costs["wall_s_median"]["full"],
        },
        "step_costs": costs,
        "tune_step_wall_s_median": step,
        "package": {"params": p, "bytes": manifest["bytes"]["total"]},
        "adapter_trainable_params": runs["offsite"]["adapter"]["trainable_params"],
        "tune_validation": {k: r["validation"] for k, r in runs.items()},
        "offsite_train_bytes": runs["offsite"]["totals"]["bytes_sent"] + runs["offsite"]["totals"]["bytes_received"],
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n{'setting':<22}{'ppl (pydoc topics)':>20}{'2-digit add acc':>18}")
    for k, v in rows.items():
        print(f"{k:<22}{v['ppl']:>20.2f}{v['acc']:>18.3f}")
    print(json.dumps(res["aims"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
