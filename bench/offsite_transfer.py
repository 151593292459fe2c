"""Benchmark companion to offsite_table.py: which half of the Offsite-Tuning adapter fails to transfer, and why.

Reads an offsite_table.py work directory (one structure's offsite run and full tuning's, at one learning rate and
split, its data and the structure's package) and measures on the same held-out text:
- half swaps: the offsite adapter's LoRA on the bottom or top adapter blocks only, or combined with full
  tuning's other half, plugged into the full model (perplexity and share of full tuning's gain);
- gradient alignment at the start of tuning: cosine and norm ratio between the adapter gradients the data
  owner gets through the emulator and the ones the full model gives, for the bottom and the top blocks.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/offsite_transfer.py --work bench/out/offsite_table --structure uniform
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

ADAPTER = "adapter_model.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__file__, __doc__, threads=2)
    p.add_argument(
        "--work", required=True, help="an offsite_table.py --work directory (with runs/, pkg/ and splitSEED/private)"
    )
    p.add_argument(
        "--structure", default="uniform", help="the table's structure whose offsite run is read; default uniform"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="the learning rate of the runs read; default 1e-3")
    p.add_argument(
        "--offsite-run", default=None, help="the offsite tune directory; default WORK/runs/STRUCTURE/sSEED/lrLR"
    )
    p.add_argument("--full-run", default=None, help="the full-tuning tune directory; default WORK/runs/full/sSEED/lrLR")
    p.add_argument("--package", default=None, help="the emulator package that run used; default WORK/pkg/STRUCTURE")
    p.add_argument(
        "--grad-batches", type=int, default=4, help="private batches the start-of-tuning gradients sum over; default 4"
    )
    p.add_argument("--seed", type=int, default=0, help="the table's seed (its data split and eval text); default 0")
    p.add_argument("--json", default=None, help="where to write the results; default WORK/transfer.json")
    return p.parse_args(argv)


def _block(name: str) -> int:
    """Full-model block index of a LoRA tensor or slot name ('...layers.28.self_attn.q_proj...')."""
    parts = name.split(".")
    return next(int(parts[i + 1]) for i, x in enumerate(parts[:-1]) if x in ("layers", "h") and parts[i + 1].isdigit())


def mixed_adapter(runs: tuple[str, str], out: str, pick) -> str:
    """An adapter directory whose tensors come, per block, from the offsite ('o') or full ('f') run, or are
    switched off ('-': LoRA B zeroed)."""
    import torch
    from safetensors.torch import load_file, save_file

    off = load_file(os.path.join(runs[0], "adapter", ADAPTER))
    full = load_file(os.path.join(runs[1], "adapter", ADAPTER))
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(runs[0], "adapter", "adapter_config.json"), out)
    mixed = {}
    for k, v in off.items():
        src = pick(_block(k))
        mixed[k] = v if src == "o" else full[k] if src == "f" else (torch.zeros_like(v) if "lora_B" in k else v)
    save_file(mixed, os.path.join(out, ADAPTER))
    return out


def start_gradients(sm, data, batches: int) -> dict:
    """Adapter gradients (name -> tensor) summed over the first `batches` training batches, at initialisation."""
    sm.adapter.zero_grad(set_to_none=True)
    for b in range(batches):
        loss, _ = sm.loss(data.batch_at(b), b, 0, train=True)
        loss.backward()
    out = {}
    for spec, a, b in zip(sm.adapter.specs, sm.adapter.a, sm.adapter.b):
        for tag, p in (("A", a), ("B", b)):
            if p.grad is not None and p.grad.abs().sum() > 0:  # LoRA A starts with a zero gradient (B = 0)
                out[f"{spec.name}.{tag}"] = p.grad.detach().clone()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import offsite_table as ot
    import torch
    import torch.nn.functional as F

    from tandem.client.assemble import build_local, build_offsite
    from tandem.client.data import load_split
    from tandem.client.offsite import load_adapter
    from tandem.emulator.package import load_package
    from tandem.stages.loading import default_model_dir, load_tokenizer
    from tandem.stages.lora import LoraConfig

    torch.set_num_threads(args.threads)
    runs = (
        args.offsite_run or os.path.join(args.work, "runs", args.structure, f"s{args.seed}", f"lr{args.lr:g}"),
        args.full_run or os.path.join(args.work, "runs", "full", f"s{args.seed}", f"lr{args.lr:g}"),
    )
    with open(os.path.join(runs[0], "adapter", "adapter_config.json")) as f:
        acfg = json.load(f)
    table = ot.parse_args(["--work", os.path.join(args.work, "transfer"), "--seed", str(args.seed)])
    tok = load_tokenizer(default_model_dir())
    _, _, _, eval_ids = ot.write_data(table, tok)  # the same held-out text as the table (it depends on the seed only)
    lora = LoraConfig(rank=acfg["r"], alpha=float(acfg["lora_alpha"]), target_modules=tuple(acfg["target_modules"]))
    pkg = args.package or os.path.join(args.work, "pkg", args.structure)
    layout = load_package(pkg).layout
    bottom, top = set(layout.bottom_blocks), set(layout.top_blocks)
    full = build_local(None, f"{layout.bottom}:{layout.top}", lora, args.seed, middle_lora=False)

    def ppl(adapter_dir: str | None) -> float:
        if adapter_dir is not None:
            load_adapter(full, adapter_dir)
        return ot.perplexity(full, eval_ids, 4)

    zs = ppl(None)
    swaps = {
        "offsite adapter": lambda b: "o",
        "full-tuning adapter": lambda b: "f",
        "offsite top + full-tuning bottom": lambda b: "f" if b in bottom else "o",
        "offsite bottom + full-tuning top": lambda b: "o" if b in bottom else "f",
        "offsite top only": lambda b: "o" if b in top else "-",
        "full-tuning top only": lambda b: "f" if b in top else "-",
        "offsite bottom only": lambda b: "o" if b in bottom else "-",
        "full-tuning bottom only": lambda b: "f" if b in bottom else "-",
    }
    rows = {}
    for i, (name, pick) in enumerate(swaps.items()):
        rows[name] = {"ppl": ppl(mixed_adapter(runs, os.path.join(args.work, "transfer", f"mix{i}"), pick))}
    gain = zs - rows["full-tuning adapter"]["ppl"]
    for r in rows.values():
        r["share_of_full_tuning_gain"] = (zs - r["ppl"]) / gain

    # Gradient alignment: both models start from the same adapter (seed), on the same private batches.
    fresh = build_local(None, f"{layout.bottom}:{layout.top}", lora, args.seed, middle_lora=False)
    private = os.path.join(args.work, f"split{args.seed}", "private")
    data = load_split(private, fresh.tokenizer, 64, 4, args.seed, 0.1)
    g_full = start_gradients(fresh, data, args.grad_batches)
    g_emu = start_gradients(build_offsite(pkg, lora, args.seed), data, args.grad_batches)
    align = {}
    for part, blocks in (("bottom", bottom), ("top", top)):
        keys = [k for k in g_full if k in g_emu and _block(k) in blocks]
        a = torch.cat([g_full[k].flatten() for k in keys])
        b = torch.cat([g_emu[k].flatten() for k in keys])
        align[part] = {
            "cosine": float(F.cosine_similarity(a, b, 0)),
            "norm_ratio": float(b.norm() / a.norm()),
            "tensors": len(keys),
        }
    res = {"work": args.work, "package": pkg, "zero_shot_ppl": zs, "swaps": rows, "start_gradient_alignment": align}
    path = args.json or os.path.join(args.work, "transfer.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"{'adapter in the full model':<36}{'ppl':>8}{'share of gain':>15}")
    for name, r in rows.items():
        print(f"{name:<36}{r['ppl']:>8.2f}{r['share_of_full_tuning_gain']:>14.1%}")
    for part, a in align.items():
        print(
            f"start-of-tuning gradient, {part} blocks: cosine {a['cosine']:.3f}, emulator/full norm {a['norm_ratio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
