"""`client tune`'s flags: the parser, one group of flags per concern (mode, connection, optimization, ...)."""

from __future__ import annotations

import argparse

from . import flags
from .data import MAX_VAL_SEQUENCES
from .privacy.flags import add_privacy_flags
from .transport import DEFAULT_CA, DEFAULT_IDENTITY
from .tune_cli import CODECS, run_tune


def add_tune_parser(sub) -> None:
    """Adds `tune` to the `client` command line."""
    parser = sub.add_parser(
        "tune",
        help="train adapters on local data",
        description="Train LoRA adapters. In split mode (default) the cloud runs the frozen middle blocks; "
        "your text, labels and loss stay here, only activations and gradients travel.",
    )
    _add_mode_flags(parser)
    _add_connection_flags(parser)
    _add_error_feedback_flags(parser)
    _add_local_mode_flags(parser)
    _add_optimization_flags(parser)
    _add_kill_revive_flags(parser)
    _add_validation_flags(parser)
    _add_checkpoint_flags(parser)
    add_privacy_flags(parser)
    _add_placement_flags(parser)
    flags.add_compute_flags(parser)
    parser.set_defaults(func=run_tune)


def _add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """Where the client's own stages compute (local mode: the whole model; offsite: the emulator too)."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where the client's stages compute: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
        "cuda:N; default auto",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        metavar="auto|float32|bfloat16|float16",
        help="compute dtype of the client's frozen weights: auto (the served model's dtype on a GPU, float32 on a "
        "CPU), float32, bfloat16 or float16. The LoRA and the optimizer stay float32; the cloud's dtype is its own "
        "(`cloud serve --dtype`) and the wire codec (--codec) is independent of both; default auto",
    )


def _add_mode_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="directory of text: .txt, .text and .md files (any case) are plain text, one record per file; "
        ".jsonl files hold one {'text'} or {'prompt','completion'} object a line. Other files and "
        "subfolders are skipped (and listed in a warning). Any size: long lines are read in pieces",
    )
    parser.add_argument(
        "--out",
        default="tandem-run",
        help="run directory: report.json, report.png, adapter/, checkpoint.pt; default ./tandem-run",
    )
    parser.add_argument(
        "--mode",
        choices=("split", "local", "offsite"),
        default="split",
        help="split: middle blocks in the cloud (default); local: whole model in this process (needs --model, for the model owner's verification); "
        "offsite: no server at all, an emulator package (--emulator) stands in for the middle",
    )
    parser.add_argument(
        "--emulator",
        default=None,
        metavar="PKG",
        help="offsite mode: emulator package from `client fetch-emulator` or handed over by the operator",
    )
    parser.add_argument(
        "--no-middle-lora",
        action="store_true",
        help="split/local: adapt only the client's blocks, as offsite mode does (the same adapter in the full model)",
    )
    parser.add_argument(
        "--cloud-optimizer",
        action="store_true",
        help="split mode: the cloud applies AdamW to the remote LoRA itself (the same update, bit for bit), so "
        "neither the remote LoRA nor its gradients cross the network each step (for r=8 on SmolLM2: 3.2 MB "
        "less per step). The client fetches them at every checkpoint; if the cloud loses the session, the "
        "run goes back to the last checkpoint. The cloud sees nothing it did not see before",
    )


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_server_flag(parser)
    parser.add_argument(
        "--identity",
        default=DEFAULT_IDENTITY,
        help=f"your identity bundle from the operator (`cloud certs issue NAME`); default {DEFAULT_IDENTITY} when it exists",
    )
    parser.add_argument(
        "--ca",
        default=None,
        help=f"CA certificate (PEM) that signed the server's certificate; default: the CA in the identity bundle, else {DEFAULT_CA}",
    )
    parser.add_argument(
        "--codec",
        default="float32",
        choices=CODECS,
        help="wire codec of activations; float32 is exact, the others trade accuracy for bytes; default float32",
    )
    parser.add_argument(
        "--gradient-codec",
        default="",
        choices=("",) + CODECS,
        help="wire codec of the gradients at the cut; default: same as --codec",
    )
    parser.add_argument(
        "--lora-codec",
        default="float32",
        choices=CODECS,
        help="wire codec of the remote-LoRA weights and their gradients; float32 (default) keeps the cloud's copy exact",
    )
    parser.add_argument(
        "--no-seal", action="store_true", help="do not seal tensors end to end (TLS still applies); default: sealed"
    )
    parser.add_argument(
        "--retries",
        type=flags.nonneg_int,
        default=8,
        help="retries of a call while the server is unreachable or busy (exponential backoff, about 90 s in all); default 8",
    )
    flags.add_insecure_flag(parser)
    parser.add_argument(
        "--timeout",
        type=flags.positive_float,
        default=300.0,
        help="deadline of one call to the server, seconds; default 300",
    )


def _add_error_feedback_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--error-feedback",
        action="store_true",
        help="int8/int4 codecs: each sender carries its gradient stream's quantization error into that stream's "
        "next training step (this client: the gradient at the top cut; the cloud: the gradient at the bottom cut), so "
        "the error of the summed updates does not accumulate; activations carry nothing (their content changes every "
        "step: a carried error would be another batch's, measured worse). Both sides also rotate every int8/int4 "
        "tensor (random-sign Hadamard) before quantizing, so outlier channels no longer zero their blocks (SmolLM2, "
        "int4: 18.8%% -> 1.5%% forward loss). State per session, restarted with each session (a cloud restart equals "
        "a reopen). Evaluation uses the codec, rotated (or float32: --exact-eval). Refused unless the gradients "
        "travel in int8/int4; the remote LoRA (--lora-codec) gets none; default off",
    )


def _add_local_mode_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local mode: Hugging Face causal-LM directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--client-blocks",
        default="2:2",
        type=flags.block_split,
        metavar="K:M",
        help="local mode: where the stages are cut; default 2:2 (split mode uses the server's)",
    )


def _add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=flags.nonneg_int, default=0, help="optimizer steps; 0 (default) means run --epochs"
    )
    parser.add_argument(
        "--epochs",
        type=flags.positive_float,
        default=1.0,
        help="passes over the training split when --steps is 0; default 1",
    )
    parser.add_argument("--batch-size", type=flags.positive_int, default=4, help="sequences per step; default 4")
    parser.add_argument("--seq-len", type=flags.seq_len, default=128, help="tokens per packed sequence; default 128")
    parser.add_argument("--lr", type=flags.positive_float, default=1e-3, help="AdamW learning rate; default 1e-3")
    parser.add_argument("--lora-rank", type=flags.positive_int, default=8, help="LoRA rank r; default 8")
    parser.add_argument(
        "--lora-alpha", type=flags.positive_float, default=16.0, help="LoRA alpha (scale alpha/r); default 16"
    )
    parser.add_argument("--lora-dropout", type=flags.dropout, default=0.0, help="dropout on the LoRA input; default 0")
    parser.add_argument(
        "--lora-targets",
        default="",
        help="comma-separated module names to adapt; default: peft's default for the architecture (q_proj,v_proj / c_attn)",
    )
    parser.add_argument(
        "--lora-layers",
        type=flags.lora_layers,
        default="",
        metavar="BLOCKS",
        help="the blocks that carry LoRA, as full-model indices (peft's layers_to_transform): e.g. 28,29 or 26-29; "
        "default: every block (offsite: every client block). With only top blocks listed nothing below the top "
        "cut trains, and a split step makes one round trip: no gradient crosses the network. Offsite mode may also "
        "list blocks the emulator keeps (LoRA on its slot for that block, plugged into that block of the full model) "
        "and the words client (the client's blocks) and clusters (each block the emulator keeps, at its own "
        "position: CRaSh's placement), e.g. client,clusters",
    )


def _add_kill_revive_flags(parser: argparse.ArgumentParser) -> None:
    from .kill_revive import MEASURES, KillReviveConfig

    default = KillReviveConfig()
    parser.add_argument(
        "--kill-revive",
        action="store_true",
        help="DLoRA's Kill-and-Revive (split and local mode, not with --cloud-optimizer): a middle LoRA module whose "
        "updates have become insignificant is frozen (its weights stop going up, its gradients stop coming down) "
        "and comes back on a schedule or when it matters again. Off by default",
    )
    parser.add_argument(
        "--kill-threshold",
        type=flags.positive_float,
        default=default.threshold,
        help="--kill-revive: kill a module whose significance (mean |moving average of its gradient|) is below "
        f"this times the mean over all modules; default {default.threshold}",
    )
    parser.add_argument(
        "--kill-warmup",
        type=flags.positive_int,
        default=default.warmup,
        help=f"--kill-revive: steps before the first kill; default {default.warmup}",
    )
    parser.add_argument(
        "--kill-probe",
        type=flags.positive_int,
        default=default.probe,
        help=f"--kill-revive: steps a revived module stays live before it may be killed again; default {default.probe}",
    )
    parser.add_argument(
        "--revive-after",
        type=flags.positive_int,
        default=default.revive_after,
        help=f"--kill-revive: steps a killed module stays killed at most; default {default.revive_after}",
    )
    parser.add_argument(
        "--kill-measure",
        choices=MEASURES,
        default=default.measure,
        help="--kill-revive: a module's significance: gradient (mean |moving average of its gradient|) or snr (that "
        f"over the root of the moving average of its squared gradient: how steady its direction is, whatever its "
        f"scale); default {default.measure}",
    )


def _add_validation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed",
        type=flags.nonneg_int,
        default=0,
        help="seed for the split, batch order, LoRA init and dropout; default 0",
    )
    parser.add_argument(
        "--val-fraction",
        type=flags.open_fraction,
        default=0.1,
        help="share of sequences held out for validation; default 0.1",
    )
    parser.add_argument(
        "--val-max-sequences",
        type=flags.positive_int,
        default=MAX_VAL_SEQUENCES,
        help=f"at most this many validation sequences (the rest of the share trains), so a large corpus "
        f"evaluates in minutes; default {MAX_VAL_SEQUENCES}",
    )
    parser.add_argument(
        "--exact-eval",
        action="store_true",
        help="the validation forwards travel in float32 (exact) whatever --codec, so the validation loss measures the "
        "tuned adapter, not the codec's noise in the evaluation itself (int4 alone adds several percent on SmolLM2); "
        "costs float32 bytes on the validation batches only, and the cloud sees those activations exactly; "
        "default off: evaluation uses --codec (without error feedback)",
    )


def _add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-every", type=flags.positive_int, default=10, help="steps between checkpoints; default 10"
    )
    parser.add_argument(
        "--tune-client-blocks",
        action="store_true",
        help="also train the client's K+M blocks in full (Offsite-Tuning's adapter layers); saved as adapter/client_blocks.safetensors",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt (adapter, optimizer, data position)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its adapter, checkpoint and report); without it a finished or "
        "unfinished run there is refused",
    )
