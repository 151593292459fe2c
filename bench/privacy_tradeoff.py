"""Benchmark: privacy vs utility on SmolLM2 for client bottom blocks K and cut-noise levels (table + PNG)."""

from __future__ import annotations

import argparse
import json
import os
import time

from tandem.testing.bench_cli import bench_parser, offline_hub, out_path

offline_hub()
ATTACKS = ("logit_lens", "nearest_embedding", "learned_inverter", "search")


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__, model=True, threads=2, work="scratch directory (data, runs)", results=True)
    p.add_argument("--ks", default="1,2,4,8", help="client bottom blocks K to try, comma-separated; default 1,2,4,8")
    p.add_argument(
        "--noise", default="0,0.01,0.03", help="noise multipliers to try (0 = no defense); default 0,0.01,0.03"
    )
    p.add_argument("--steps", type=int, default=6, help="tuning steps of every run; default 6")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step; default 2")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per sequence; default 48")
    p.add_argument("--records", type=int, default=160, help="sample-data records to generate; default 160")
    p.add_argument("--tokens", type=int, default=96, help="received tokens each audit attacks; default 96")
    p.add_argument("--search-tokens", type=int, default=48, help="of those, tokens the search attack tries; default 48")
    p.add_argument(
        "--public-tokens", type=int, default=2048, help="public-text tokens the inverter is fitted on; default 2048"
    )
    p.add_argument("--resume", action="store_true", help="reuse the rows already in --json with the same K and noise")
    p.add_argument("--png", default=out_path(__file__, "privacy_tradeoff.png"), help="where to write the chart")
    return p.parse_args(argv)


def run_one(args, data: str, k: int, noise: float) -> dict:
    """Tunes in local mode (an exact stand-in for split mode at the same cut) and audits what the cloud would receive."""
    from tandem.client.privacy.audit import audit_run
    from tandem.client.trainer import TuneConfig, tune
    from tandem.stages.lora import LoraConfig

    out = os.path.join(args.work, f"k{k}-noise{noise:g}")
    cfg = TuneConfig(
        data=data,
        out=out,
        mode="local",
        model=args.model,
        client_blocks=f"{k}:2",
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=2e-3,
        lora=LoraConfig(rank=8),
        seed=0,
        val_fraction=0.05,
        checkpoint_every=10**6,
        noise_multiplier=noise,
        audit="record",
        progress=False,
    )
    t0 = time.perf_counter()
    report = tune(cfg)
    tuned_s = time.perf_counter() - t0
    p = audit_run(
        out,
        cfg.to_dict(),
        tokens=args.tokens,
        search_tokens=args.search_tokens,
        public_tokens=args.public_tokens,
        tuned=False,
    )
    return {
        "K": k,
        "noise_multiplier": noise,
        "recovery": {a: p["attacks"]["known"][a]["token_recovery"] for a in ATTACKS},
        "rouge_l": {a: p["attacks"]["known"][a]["rouge_l"] for a in ATTACKS},
        "strongest": p["strongest"],
        "label_recovery": p["labels"]["gradient_attack"]["label_recovery"],
        "epsilon_per_release": p["defenses"]["cut_noise"].get("epsilon_per_release"),
        "clip_norm": p["defenses"]["cut_noise"].get("clip_norm"),
        "val_before": report["validation"]["before"]["loss"],
        "val_after": report["validation"]["after"]["loss"],
        "tokens": p["sample"]["tokens"],
        "search_tokens": p["sample"]["search_tokens"],
        "tune_s": tuned_s,
        "audit_s": time.perf_counter() - t0 - tuned_s,
    }


def table(rows: list[dict]) -> str:
    """A Markdown table of the results."""
    base = {r["K"]: r["val_after"] for r in rows if r["noise_multiplier"] == 0}
    head = (
        "| K | noise | logit lens | nearest emb. | learned inv. | search | strongest ROUGE-L | labels (grad) "
        "| eps/release | val loss after | vs undefended K |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rec = r["recovery"]
        eps = r["epsilon_per_release"]
        rel = r["val_after"] / base[r["K"]] - 1 if r["K"] in base else float("nan")
        lab = r["label_recovery"]
        lines.append(
            f"| {r['K']} | {r['noise_multiplier']:g} | "
            + " | ".join(f"{rec[a]:.0%}" for a in ATTACKS)
            + f" | {r['strongest']['rouge_l']:.2f} | {'-' if lab is None else f'{lab:.0%}'} | "
            + f"{'-' if eps is None else f'{eps:.3g}'} | {r['val_after']:.3f} | {rel:+.1%} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], path: str) -> str:
    """Strongest-attack recovery and validation loss against the noise, one line per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k in sorted({r["K"] for r in rows}):
        rs = sorted((r for r in rows if r["K"] == k), key=lambda r: r["noise_multiplier"])
        x = [r["noise_multiplier"] for r in rs]
        a.plot(x, [r["strongest"]["token_recovery"] for r in rs], marker="o", label=f"K={k}")
        b.plot(x, [r["val_after"] for r in rs], marker="o", label=f"K={k}")
    a.axhline(0.3, color="gray", ls="--", lw=1)
    a.set(
        xlabel="noise multiplier (sigma / C)",
        ylabel="tokens recovered by the strongest attack",
        title="exposure",
        ylim=(0, 1.05),
    )
    b.set(xlabel="noise multiplier (sigma / C)", ylabel="validation loss after tuning", title="utility")
    a.legend()
    b.legend()
    fig.suptitle("tandem: privacy vs utility at the bottom cut (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from tqdm.auto import tqdm

    from tandem.client.sample import write_sample

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    data = write_sample(os.path.join(args.work, "data"), n=args.records, seed=0)
    grid = [(int(k), float(s)) for k in args.ks.split(",") for s in args.noise.split(",")]
    done = []
    if args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            done = json.load(f)["rows"]
    rows = []
    for k, s in tqdm(grid, desc="privacy trade-off", unit="run"):
        old = [r for r in done if r["K"] == k and r["noise_multiplier"] == s]
        rows.append(old[0] if old else run_one(args, data, k, s))
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(table(rows))
    print(f"chart: {chart(rows, args.png)}  results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
