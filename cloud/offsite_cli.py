"""`cloud emulator build`: the operator's Offsite-Tuning command (distill an emulator, write the package)."""

from __future__ import annotations

import argparse
import json
import sys

from . import flags


def distill_config(args: argparse.Namespace):
    from tandem.emulator.distill import DistillConfig

    return DistillConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        kd_weight=args.kd_weight,
        lm_weight=args.lm_weight,
        kl_weight=args.kl_weight,
        layer_weight=args.layer_weight,
        jacobian_weight=args.jacobian_weight,
        jacobian_eps=args.jacobian_eps,
        init=args.init,
        init_batches=args.init_batches,
        kd_norm=args.kd_norm,
        cache_teacher=not args.no_teacher_cache,
        val_fraction=args.val_fraction,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
    )


def run_build(args: argparse.Namespace) -> int:
    """Builds the package and prints its summary as one JSON line; 2 (one line on stderr) when it cannot."""
    from tandem.emulator.build import build_emulator
    from tandem.emulator.errors import EmulatorError
    from tandem.stages.errors import StageError

    flags.apply_threads(args)
    try:
        manifest = build_emulator(
            args.model,
            args.client_blocks,
            args.out,
            args.distill_data,
            distill_config(args),
            drop_ratio=args.drop_ratio,
            keep=args.keep,
            keep_blocks=args.keep_blocks,
            select=args.select,
            select_seqs=args.select_seqs,
            mlp_width=args.mlp_width,
            structure=args.structure,
            clusters=args.clusters,
            cka_seqs=args.cka_seqs,
            budget=args.budget,
            max_cluster=args.max_cluster,
            slot_scales=args.slot_scales,
            keep_sink=args.keep_sink_block,
        )
    except (EmulatorError, StageError, ValueError, OSError) as e:
        print(f"cloud emulator build: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "cloud emulator build: interrupted; rerun with --resume to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(package_summary(args.out, manifest)))
    return 0


def package_summary(out: str, manifest: dict) -> dict:
    """What `emulator build` prints: the package, the blocks it kept, the distillation's effect, its size."""
    distillation, params = manifest["distillation"], manifest["params"]
    return {
        "package": out,
        "kept_middle_blocks": manifest["kept_middle_blocks"],
        "selection": manifest["selection"]["method"],
        "mlp_width": manifest["pruning"]["mlp_width"],
        "slots": len(manifest.get("slots", manifest["kept_middle_blocks"])),
        "val_kd_before": distillation.get("val_kd_before"),
        "val_kd_after": distillation.get("val_kd_after"),
        "package_params": params["package"],
        "package_share_of_model": round(params["package_share_of_model"], 4),
    }


def add_emulator_parser(sub) -> None:
    """Adds `emulator build` to the `cloud` command line."""
    parser = sub.add_parser("emulator", help="Offsite-Tuning emulators")
    emulator_sub = parser.add_subparsers(dest="emulator_cmd", required=True)
    build = emulator_sub.add_parser(
        "build",
        help="drop middle blocks (uniformly or loss-guided), distill the rest on public text, write a package",
        description="Build an Offsite-Tuning emulator package: the client stages, the tokenizer and a "
        "distilled, lossy stand-in for the middle blocks (never the dropped blocks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_selection_flags(build)
    _add_sink_flags(build)
    _add_distillation_flags(build)
    _add_loss_flags(build)
    _add_start_flags(build)
    _add_run_flags(build)
    build.set_defaults(func=run_build)


def _add_selection_flags(parser: argparse.ArgumentParser) -> None:
    """The model, its cut, and which middle blocks the emulator keeps."""
    parser.add_argument(
        "--model", default=None, help="Hugging Face causal-LM directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--client-blocks",
        default="2:2",
        metavar="K:M",
        help="adapter blocks the data owner tunes, below (K) and above (M) the emulator",
    )
    how = parser.add_mutually_exclusive_group()  # one of them, except with --select gradient (which may choose it)
    how.add_argument(
        "--drop-ratio", type=float, default=None, help="share of the middle blocks to drop (0.5 keeps about half)"
    )
    how.add_argument(
        "--keep", type=int, default=None, help="number of middle blocks to keep (first and last always kept)"
    )
    how.add_argument(
        "--keep-blocks",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        metavar="I,J,...",
        help="exactly these middle blocks (full-model indices), e.g. a uniform choice with the block that "
        "makes the model's attention sink swapped in (SmolLM2: 11; see the README)",
    )
    _add_share_flags(parser, how)
    parser.add_argument(
        "--select",
        choices=("uniform", "greedy", "gradient"),
        default="uniform",
        help="how --drop-ratio/--keep's blocks are chosen: 'uniform' spaces them evenly (the paper's rule); "
        "'greedy' drops, one at a time, the block whose removal raises the model's next-token loss on "
        "the public text least (first and last middle block kept; a closer emulator, but not a better "
        "plug-in on SmolLM2: see the README; about 10 min on 2 cores for SmolLM2 at --seq-len 64); "
        "'gradient' scores candidate structures under --budget (block counts and MLP widths; with --structure "
        "share also cluster counts and which block represents a cluster) by the cosine between the adapters' "
        "start-of-tuning gradients through the candidate and through the full middle on --select-seqs public "
        "sequences, bottom and top adapter apart, keeps the best (mean of the two) and records every candidate's "
        "scores in the manifest; --drop-ratio/--keep/--clusters and --mlp-width, when given, fix that dimension",
    )
    _add_gradient_flags(parser)
    parser.add_argument(
        "--select-seqs",
        type=int,
        default=32,
        help="public sequences (of --seq-len tokens) the greedy and gradient selections, and --mlp-width's neuron "
        "ranking, measure on",
    )
    parser.add_argument(
        "--mlp-width",
        type=int,
        default=None,
        metavar="N",
        help="also width-prune: each kept block keeps only the N MLP neurons that add the most to the "
        "residual stream on the public text, so the emulator can keep more blocks in the same "
        "parameter budget; with --structure share it prunes each unique block once (default: full-width blocks)",
    )


def _add_sink_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-sink-block",
        action="store_true",
        help="with the uniform drop: when the model has an attention sink (measured on --distill-data) and the "
        "drop loses the block that makes it, keep that block instead of the nearest kept one; the manifest's "
        "selection records the swap",
    )


def _add_gradient_flags(parser: argparse.ArgumentParser) -> None:
    """The package budget of --select gradient."""
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="F",
        help="with --select gradient: the largest share of the model's unique parameters the package (client "
        "stages and the emulator's unique blocks) may hold (default 0.6)",
    )


def _add_share_flags(parser: argparse.ArgumentParser, how) -> None:
    """The shared emulator (--structure share): its cluster count joins --drop-ratio/--keep's group `how`."""
    how.add_argument(
        "--clusters",
        type=int,
        default=None,
        metavar="C",
        help="with --structure share: how many clusters (unique blocks) the middle is grouped into; "
        "--keep/--drop-ratio give the same count (the same parameter budget as that layer drop)",
    )
    parser.add_argument(
        "--structure",
        choices=("drop", "share"),
        default="drop",
        help="'drop': the kept middle blocks run once each (Offsite-Tuning); 'share' (CRaSh): the middle's "
        "adjacent blocks are grouped into clusters by the linear CKA of their outputs on the public text, each "
        "cluster keeps its middle block and runs it in every slot of the cluster, so the emulator keeps the "
        "model's depth with the weights of only --clusters blocks (stored once; needs --distill-data)",
    )
    parser.add_argument(
        "--cka-seqs",
        type=int,
        default=256,
        help="public sequences (of --seq-len tokens) the CKA of --structure share is measured on (and "
        "--slot-scales fit fitted on)",
    )
    parser.add_argument(
        "--max-cluster",
        type=int,
        default=None,
        metavar="K",
        help="with --structure share: no cluster holds more than K middle blocks, so no block fills more than K "
        "slots (--clusters x K must reach the middle's size); with --select gradient every candidate keeps the "
        "cap; default: no cap",
    )
    parser.add_argument(
        "--slot-scales",
        choices=("none", "fit", "learn"),
        default="none",
        help="with --structure share: 'fit' gives every slot a scalar on its block's residual update "
        "(h + a * (block(h) - h)), fitted in order on the --cka-seqs public sequences by least squares to the "
        "full model's state after the block the slot stands for (no training; distillation keeps them fixed); "
        "'learn' starts from the fitted scales and trains them with the blocks during distillation (needs "
        "--steps > 0); stored in the manifest as slot_scales",
    )


def _add_distillation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distill-data",
        default=None,
        metavar="DIR",
        help="public text for distillation: .txt files and .jsonl rows ({'text'} or {'prompt','completion'})",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="distillation steps (0: plain layer drop, no distillation)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="text blocks per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text block")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (warm-up, then cosine decay)")
    parser.add_argument("--warmup", type=int, default=10, help="learning-rate warm-up steps")


def _add_loss_flags(parser: argparse.ArgumentParser) -> None:
    """The terms of the distillation loss and their weights."""
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD loss ((t-s)/rms(t))^2")
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=0.0,
        help="weight of the next-token loss through the real top blocks (0: off)",
    )
    parser.add_argument(
        "--kd-norm",
        choices=("token", "global"),
        default="token",
        help="KD normalisation: 'token' divides each token's squared error by that token's own squared norm; "
        "'global' by one teacher RMS over the batch (the paper's), which on SmolLM2 lets the first "
        "token's huge hidden state carry ~96%% of the loss; default token",
    )
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="weight of KL(teacher || emulator) on next-token distributions through the real top blocks and head (0: off; costs ~1.7x per step)",
    )
    parser.add_argument(
        "--layer-weight",
        type=float,
        default=0.0,
        help="weight of matching every kept block to the teacher at its original depth (0: off)",
    )
    parser.add_argument(
        "--jacobian-weight",
        type=float,
        default=0.0,
        help="weight of matching how the middle's output moves when its input moves (finite differences "
        "along random per-token directions): the data owner's bottom adapter learns through the "
        "emulator's Jacobian (0: off; costs a teacher pass over the whole middle per step)",
    )
    parser.add_argument(
        "--jacobian-eps", type=float, default=0.05, help="size of those input moves, relative to each token's RMS"
    )


def _add_start_flags(parser: argparse.ArgumentParser) -> None:
    """How the emulator starts and whether the teacher's outputs are kept."""
    parser.add_argument(
        "--init",
        choices=("copy", "rescale"),
        default="copy",
        help="emulator start: the kept blocks as they are, or with each block's residual update rescaled by a factor "
        "fitted on public text (folded into the output projections); default copy",
    )
    parser.add_argument(
        "--init-batches", type=int, default=2, help="public batches used to fit the --init rescale factors; default 2"
    )
    parser.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="recompute the full middle's outputs every step instead of once (less memory, slower)",
    )


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Validation, checkpoints, compute and the package directory."""
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the text held out to validate the KD loss"
    )
    parser.add_argument("--val-every", type=int, default=50, help="steps between validations")
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints (OUT/distill_checkpoint.pt)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the text split and batch order")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/distill_checkpoint.pt (refused, in one line, when its structure, steps, rate or loss weights differ)",
    )
    flags.add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, metavar="PKG", help="package directory to write")
