"""`client`: the data owner's command line (tune, report)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import flags
from .data import MAX_VAL_SEQUENCES
from .errors import ClientError
from .offsite_cli import add_offsite_parsers
from .transport import DEFAULT_CA, DEFAULT_IDENTITY


def _lora(args):
    from tandem.stages.lora import LoraConfig

    targets = tuple(t for t in (args.lora_targets or "").split(",") if t)
    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)


def _tune(args) -> int:
    import torch

    from . import report as rep
    from .trainer import TuneConfig, tune
    from .transport import TransportConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = TuneConfig(
            data=args.data,
            out=args.out,
            mode=args.mode,
            model=args.model,
            client_blocks=args.client_blocks,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            lora=_lora(args),
            seed=args.seed,
            val_fraction=args.val_fraction,
            val_max_sequences=args.val_max_sequences,
            checkpoint_every=args.checkpoint_every,
            tune_client_blocks=args.tune_client_blocks,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            noise_multiplier=args.noise_multiplier,
            clip_norm=args.clip_norm,
            audit=args.audit,
            audit_tokens=args.audit_tokens,
            emulator=args.emulator,
            middle_lora=args.mode != "offsite" and not args.no_middle_lora,
            cloud_optimizer=args.cloud_optimizer,
        )
    except ValueError as e:  # combinations of flags (each flag alone was checked as it was parsed)
        raise ClientError(str(e)) from None
    tcfg = TransportConfig(
        server=args.server,
        insecure=args.insecure,
        ca=args.ca,
        identity=args.identity,
        timeout_s=args.timeout,
        retries=args.retries,
        seal=not args.no_seal,
        codec=args.codec,
        gradient_codec=args.gradient_codec,
        lora_codec=args.lora_codec,
    )
    report = tune(cfg, tcfg)
    rep.render(report)
    if report["privacy"].get("measured"):
        from .audit import render_privacy

        render_privacy(report["privacy"])
    png = rep.plot(report, os.path.join(args.out, "report.png"))
    print(f"report: {os.path.join(args.out, 'report.json')}  plot: {png}  adapter: {os.path.join(args.out, 'adapter')}")
    return 0


def _audit(args) -> int:
    import json

    import torch

    from . import report as rep
    from .audit import audit_run, render_privacy

    if args.threads:
        torch.set_num_threads(args.threads)
    r = rep.load(args.run_dir)
    r["privacy"] = audit_run(
        args.run_dir,
        r["config"],
        tokens=args.tokens,
        search_tokens=args.search_tokens,
        candidates=args.candidates,
        progress=not args.no_progress,
    )
    with open(os.path.join(args.run_dir, "report.json"), "w") as f:
        json.dump(r, f, indent=2)
    render_privacy(r["privacy"])
    return 0


def _report(args) -> int:
    from . import report as rep

    r = rep.load(args.run_dir)
    rep.render(r)
    png = rep.plot(r, os.path.join(args.run_dir, "report.png"))
    print(f"plot: {png}")
    return 0


def _sample(args) -> int:
    from .rundir import check_writable
    from .sample import write_sample

    check_writable(args.out)
    print(f"wrote sample data to {write_sample(args.out, n=args.n, seed=args.seed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="client",
        description="tandem client: fine-tune a cloud-hosted LLM on private text that never leaves this machine.",
    )
    p.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (DEBUG, INFO, WARNING, ERROR); default WARNING",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser(
        "tune",
        help="train adapters on local data",
        description="Train LoRA adapters. In split mode (default) the cloud runs the frozen middle blocks; "
        "your text, labels and loss stay here, only activations and gradients travel.",
    )
    t.add_argument(
        "--data",
        required=True,
        help="directory of text: .txt, .text and .md files (any case) are plain text, one record per file; "
        ".jsonl files hold one {'text'} or {'prompt','completion'} object a line. Other files and "
        "subfolders are skipped (and listed in a warning). Any size: long lines are read in pieces",
    )
    t.add_argument(
        "--out",
        default="tandem-run",
        help="run directory: report.json, report.png, adapter/, checkpoint.pt; default ./tandem-run",
    )
    t.add_argument(
        "--mode",
        choices=("split", "local", "offsite"),
        default="split",
        help="split: middle blocks in the cloud (default); local: whole model in this process (needs --model, for the model owner's verification); "
        "offsite: no server at all, an emulator package (--emulator) stands in for the middle",
    )
    t.add_argument(
        "--emulator",
        default=None,
        metavar="PKG",
        help="offsite mode: emulator package from `client fetch-emulator` or handed over by the operator",
    )
    t.add_argument(
        "--no-middle-lora",
        action="store_true",
        help="split/local: adapt only the client's blocks, as offsite mode does (the same adapter in the full model)",
    )
    t.add_argument(
        "--cloud-optimizer",
        action="store_true",
        help="split mode: the cloud applies AdamW to the remote LoRA itself (the same update, bit for bit), so "
        "neither the remote LoRA nor its gradients cross the network each step (for r=8 on SmolLM2: 3.2 MB "
        "less per step). The client fetches them at every checkpoint; if the cloud loses the session, the "
        "run goes back to the last checkpoint. The cloud sees nothing it did not see before",
    )
    t.add_argument(
        "--server",
        default="127.0.0.1:50051",
        type=flags.server_address,
        help="HOST:PORT of `cloud serve`; default 127.0.0.1:50051",
    )
    t.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"your identity bundle from the operator (`cloud certs issue NAME`); default {DEFAULT_IDENTITY} when it exists",
    )
    t.add_argument(
        "--ca",
        default=None,
        help=f"CA certificate (PEM) that signed the server's certificate; default: the CA in the identity bundle, else {DEFAULT_CA}",
    )
    t.add_argument(
        "--codec",
        default="float32",
        choices=("float32", "float16", "bfloat16", "int8", "int4"),
        help="wire codec of activations; float32 is exact, the others trade accuracy for bytes; default float32",
    )
    t.add_argument(
        "--gradient-codec",
        default="",
        choices=("", "float32", "float16", "bfloat16", "int8", "int4"),
        help="wire codec of the gradients at the cut; default: same as --codec",
    )
    t.add_argument(
        "--lora-codec",
        default="float32",
        choices=("float32", "float16", "bfloat16", "int8", "int4"),
        help="wire codec of the remote-LoRA weights and their gradients; float32 (default) keeps the cloud's copy exact",
    )
    t.add_argument(
        "--no-seal", action="store_true", help="do not seal tensors end to end (TLS still applies); default: sealed"
    )
    t.add_argument(
        "--retries",
        type=flags.nonneg_int,
        default=8,
        help="retries of a call while the server is unreachable or busy (exponential backoff, about 90 s in all); default 8",
    )
    t.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no TLS (only against a server started with --insecure); warns",
    )
    t.add_argument(
        "--timeout",
        type=flags.positive_float,
        default=300.0,
        help="deadline of one call to the server, seconds; default 300",
    )
    t.add_argument(
        "--model",
        default=None,
        help="local mode: Hugging Face causal-LM directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    t.add_argument(
        "--client-blocks",
        default="2:2",
        type=flags.block_split,
        metavar="K:M",
        help="local mode: where the stages are cut; default 2:2 (split mode uses the server's)",
    )
    t.add_argument("--steps", type=flags.nonneg_int, default=0, help="optimizer steps; 0 (default) means run --epochs")
    t.add_argument(
        "--epochs",
        type=flags.positive_float,
        default=1.0,
        help="passes over the training split when --steps is 0; default 1",
    )
    t.add_argument("--batch-size", type=flags.positive_int, default=4, help="sequences per step; default 4")
    t.add_argument("--seq-len", type=flags.seq_len, default=128, help="tokens per packed sequence; default 128")
    t.add_argument("--lr", type=flags.positive_float, default=1e-3, help="AdamW learning rate; default 1e-3")
    t.add_argument("--lora-rank", type=flags.positive_int, default=8, help="LoRA rank r; default 8")
    t.add_argument(
        "--lora-alpha", type=flags.positive_float, default=16.0, help="LoRA alpha (scale alpha/r); default 16"
    )
    t.add_argument("--lora-dropout", type=flags.dropout, default=0.0, help="dropout on the LoRA input; default 0")
    t.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated module names to adapt; default: peft's default for the architecture (q_proj,v_proj / c_attn)",
    )
    t.add_argument(
        "--seed",
        type=flags.nonneg_int,
        default=0,
        help="seed for the split, batch order, LoRA init and dropout; default 0",
    )
    t.add_argument(
        "--val-fraction",
        type=flags.open_fraction,
        default=0.1,
        help="share of sequences held out for validation; default 0.1",
    )
    t.add_argument(
        "--val-max-sequences",
        type=flags.positive_int,
        default=MAX_VAL_SEQUENCES,
        help=f"at most this many validation sequences (the rest of the share trains), so a large corpus "
        f"evaluates in minutes; default {MAX_VAL_SEQUENCES}",
    )
    t.add_argument(
        "--checkpoint-every", type=flags.positive_int, default=10, help="steps between checkpoints; default 10"
    )
    t.add_argument(
        "--tune-client-blocks",
        action="store_true",
        help="also train the client's K+M blocks in full (Offsite-Tuning's adapter layers); saved as adapter/client_blocks.safetensors",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt (adapter, optimizer, data position)"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its adapter, checkpoint and report); without it a finished or "
        "unfinished run there is refused",
    )
    t.add_argument(
        "--noise-multiplier",
        type=flags.nonneg_float,
        default=0.0,
        metavar="S",
        help="privacy defense: Gaussian noise on every token's state at the bottom cut, sigma = S x clip norm "
        "(train and eval); the report states the (epsilon, delta) it implies; default 0 (none)",
    )
    t.add_argument(
        "--clip-norm",
        type=flags.nonneg_float,
        default=0.0,
        metavar="C",
        help="clip every token's state at the cut to L2 norm C before the noise; default 0 = with noise on, the "
        "median norm at the cut on public text (position 0 gets its own)",
    )
    t.add_argument(
        "--audit",
        choices=("auto", "yes", "no", "record"),
        default="auto",
        help="privacy audit: record what the cloud receives (RUN_DIR/cloud_view) and attack it after tuning; "
        "auto = in split mode; record = record only (run `client audit` later); default auto",
    )
    t.add_argument(
        "--audit-tokens", type=flags.positive_int, default=256, help="received tokens the audit attacks; default 256"
    )
    t.add_argument("--threads", type=flags.nonneg_int, default=0, help="torch compute threads (0 = torch's default)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_tune, server_given=False)

    a = sub.add_parser(
        "audit",
        help="attack what the cloud received in a run (its privacy audit), and update its report",
        description="Attacks the requests recorded in RUN_DIR/cloud_view with the cloud's knowledge (the "
        "client-stage weights it shipped, public text) and measures token recovery and "
        "ROUGE-L against your text. Runs here; sends nothing.",
    )
    a.add_argument("run_dir", help="the --out directory of a `client tune` run (split mode, or --audit yes)")
    a.add_argument("--tokens", type=flags.positive_int, default=256, help="received tokens to attack; default 256")
    a.add_argument(
        "--search-tokens",
        type=flags.nonneg_int,
        default=128,
        help="of those, tokens the (slowest) search attack tries; default 128",
    )
    a.add_argument(
        "--candidates",
        type=flags.positive_int,
        default=8,
        help="candidate tokens per position for the search; default 8",
    )
    a.add_argument("--threads", type=flags.nonneg_int, default=0, help="torch compute threads (0 = torch's default)")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(func=_audit)

    r = sub.add_parser("report", help="print a run's report and write report.png")
    r.add_argument("run_dir", help="the --out directory of a `client tune` run")
    r.set_defaults(func=_report)

    s = sub.add_parser("sample-data", help="write a small generated corpus to try tandem on")
    s.add_argument("--out", default="sample-data", help="directory to write; default ./sample-data")
    s.add_argument("--n", type=flags.positive_int, default=400, help="number of generated records; default 400")
    s.add_argument("--seed", type=flags.nonneg_int, default=0, help="generator seed; default 0")
    s.set_defaults(func=_sample)
    add_offsite_parsers(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from tandem.stages.errors import StageError

    umask = os.umask(0o077)  # what the client writes (runs, adapters, checkpoints, recorded traffic, caches) is private
    try:
        return args.func(args)
    except (ClientError, StageError) as e:
        print(f"client {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"client {args.cmd}: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130
    finally:
        os.umask(umask)  # main() may run inside another program (tests do)


if __name__ == "__main__":
    sys.exit(main())
