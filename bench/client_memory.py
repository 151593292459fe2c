"""Client memory: the peak RSS of `client tune` loading its stages as before (bytes + unpacked copy + random model)
and as now (the verified bytes viewed as tensors by a meta-device shell), side by side against one `cloud serve`.

Run: .venv/bin/python bench/client_memory.py [--shape llama-3.2-1b] [--steps 2]

Uses the random-weight directory bench/scale.py writes (bench/out/scale/models/SHAPE, written if absent) and its
data. The cloud serves in bfloat16 on the CPU; each client runs `client tune --dtype bfloat16 --device cpu` to
completion and its peak RSS is ru_maxrss from wait4. "before" is the same client with the old loading patched back
in (stages/loading.py's build_client_model: from_config with random initialisation, then load_state_dict's copy;
client/downloads.py's reader returning immutable bytes, which unpack copies). Both read the verified cache (the
first run downloads it). Writes bench/out/client_memory.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tandem.testing.bench_cli import bench_parser, offline_hub

offline_hub()

from tandem.testing.servers import BIN, start_server  # noqa: E402
from tandem.testing.shapes import SHAPES, write_random_model  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
MIB = 2**20
SCALE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "scale")


def old_loading() -> None:
    """Patches the loading this change replaced back in (for the "before" client)."""
    import stat

    from tandem.client import downloads
    from tandem.stages import loading

    def read_bytes(path: str):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            return f.read(info.st_size + 1) if stat.S_ISREG(info.st_mode) else None

    def build_randomly_initialised(config, layout, state, placement=loading.CPU_FLOAT32):
        from transformers import AutoModelForCausalLM

        cfg = loading.shell_config(config, layout)
        model = AutoModelForCausalLM.from_config(cfg, dtype=placement.dtype)
        model.load_state_dict(state, strict=False)
        if getattr(cfg, "tie_word_embeddings", False):
            model.tie_weights()
        model.to(placement.device)
        model.eval()
        model.requires_grad_(False)
        return model

    downloads._read_regular = read_bytes
    loading.build_client_model = build_randomly_initialised


def run_client(args, variant: str, out: str, server, data: str) -> dict:
    """One `client tune` to completion; its peak RSS and wall time."""
    tune = ["tune", "--data", data, "--out", out, "--steps", str(args.steps), "--batch-size", "1"]
    tune += ["--seq-len", str(args.seq_len), "--dtype", "bfloat16", "--device", "cpu", "--threads", str(args.threads)]
    tune += ["--checkpoint-every", str(10**6), "--val-max-sequences", "2", "--audit", "no", "--no-progress"]
    tune += ["--overwrite", *server.cli_args()]
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import client_memory as m; "
    )
    code += ("m.old_loading(); " if variant == "before" else "") + "from tandem.client.cli import main; "
    code += f"sys.exit(main({tune!r}))"
    started = time.perf_counter()
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=ENV)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"client tune ({variant}) failed; see {out}.log")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - started}


def main(argv=None) -> int:
    p = bench_parser(__file__, __doc__, results=True, threads=0)
    p.add_argument("--shape", default="llama-3.2-1b", help=f"the model shape, of {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of each client; default 2")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence; default 128")
    args = p.parse_args(argv)
    from tandem.stages.loading import default_model_dir

    model_dir = write_random_model(SHAPES[args.shape], os.path.join(SCALE, "models", args.shape), default_model_dir())
    data = os.path.join(SCALE, "data")
    if not os.path.isdir(data):
        subprocess.run([os.path.join(BIN, "client"), "sample-data", "--out", data, "--n", "200"], check=True, env=ENV)
    run_dir = os.path.join(SCALE, "runs", f"client-memory-{args.shape}")
    os.makedirs(run_dir, exist_ok=True)
    flags = ["--dtype", "bfloat16", "--device", "cpu", "--client-blocks", "2:2", "--threads", str(args.threads)]
    server = start_server(model_dir, Path(run_dir), *flags, timeout=1800)
    try:
        runs = {v: run_client(args, v, os.path.join(run_dir, v), server, data) for v in ("before", "after")}
    finally:
        server.stop()
    result = {
        "shape": args.shape,
        "runs": runs,
        "after/before": runs["after"]["peak_rss_mib"] / runs["before"]["peak_rss_mib"],
    }
    print(json.dumps(result, indent=2))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
