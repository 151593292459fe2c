"""Benchmark: private generation (`client generate --private`) against the server path and local generation.

One `cloud serve` on loopback TLS, one adapter (random LoRA A and non-zero B on q,v of every block, as `client tune`
saves one), the same prompts, greedy, side by side in one run:
  private  split mode: bottom and top LoRA stay here, the cloud decodes the middle over its KV cache (sealed);
  server   `client push` the adapter, then `client generate --adapter NAME` on the cloud (the cloud holds it all);
  local    the adapter merged into the whole model, decoded in this process (the server path's decoding).
Reports tokens/s (decoding only; the private session's open and client-stage download are one-time costs, shown
apart), bytes per generated token on the wire, and whether the tokens agree. The server computes on one torch thread
(tandem.testing.servers); this process uses --threads (default 1, the same), so that no path gets more cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import torch

from tandem.testing.bench_cli import bench_parser, offline_hub


def parse_args(argv=None):
    p = bench_parser(__file__, __doc__, model=True, work="scratch directory (TLS, adapter)", results=True, threads=1)
    p.add_argument("--prompts", type=int, default=4, help="prompts decoded as one batch; default 4")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt; default 32")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; default 8")
    return p.parse_args(argv)


PROMPTS = [
    "The capital of France is",
    "Split learning keeps the labels on the client because",
    "A low-rank adapter changes a model by",
    "Write one sentence about the sea:",
    "The three primary colours are",
    "Python lists differ from tuples in that",
    "The quickest way to boil water is",
    "Gradient descent works by",
]


def make_adapter(model_dir: str, out: str, rank: int) -> str:
    """A peft adapter on every block's default targets, random A (peft's init) and B ~ N(0, 0.02)."""
    from tandem.stages.arch import arch_for, parts_of
    from tandem.stages.loading import load_model
    from tandem.stages.lora import LoRAAdapter, LoraConfig, PeftMeta, inject_slots, save_peft

    loaded = load_model(model_dir)
    parts = parts_of(loaded.model)
    blocks = list(range(len(parts.blocks)))
    specs = inject_slots(torch.nn.ModuleList(parts.blocks), parts.arch, blocks, parts.arch.lora_targets)
    g = torch.Generator().manual_seed(0)
    adapter = LoRAAdapter(specs, LoraConfig(rank=rank, alpha=2.0 * rank), generator=g)
    with torch.no_grad():
        for b in adapter.b:
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    save_peft(adapter, out, PeftMeta(loaded.model_id, fan_in_fan_out=arch_for(loaded.config).fan_in_fan_out))
    return out


def local_merged(model_dir: str, adapter_dir: str, prompts: list[str], new: int) -> dict:
    """Local generation with the adapter merged into the whole model (W + alpha / r B A), timed."""
    from tandem.cloud.decode import DecodeJob, decode
    from tandem.stages.loading import load_model, load_tokenizer
    from tandem.stages.lora import load_peft_tensors

    loaded = load_model(model_dir)
    model, modules = loaded.model, dict(loaded.model.named_modules())
    cfg, tensors = load_peft_tensors(adapter_dir)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                path = key.removesuffix(".lora_A.weight")
                modules[path].weight += cfg["lora_alpha"] / cfg["r"] * (tensors[f"{path}.lora_B.weight"] @ a)
    tokenizer = load_tokenizer(model_dir)
    eos = {int(tokenizer.eos_token_id)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    decode(model, [DecodeJob(None, ids[:1], 1)], pad, eos)  # warm-up: first-call costs are not decoding
    start = time.perf_counter()
    out = decode(model, [DecodeJob(None, ids, new)], pad, eos)[0]
    seconds = time.perf_counter() - start
    tokens = [toks for toks, _ in out]
    return {"tokens": tokens, "seconds": seconds, "generated": sum(map(len, tokens)), "bytes": 0}


def main(argv=None) -> int:
    offline_hub()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tandem.client.offsite import push_adapter
    from tandem.client.private_generation import generate_private
    from tandem.client.serving import generate
    from tandem.stages.loading import default_model_dir
    from tandem.testing.servers import start_server

    model_dir = args.model or default_model_dir()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(model_dir, str(work / "adapter"), args.rank)
    prompts = (PROMPTS * 4)[: args.prompts]
    server = start_server(model_dir, work, "--adapter-registry", str(work / "registry"), timeout=600)
    try:
        rows = {}
        wall = time.perf_counter()
        private = generate_private(server.transport_cfg(), prompts, adapter, args.new_tokens)
        open_s = time.perf_counter() - wall - private["seconds"]
        rows["private"] = {
            "tokens": [c["token_ids"] for c in private["completions"]],
            "seconds": private["seconds"],
            "generated": sum(len(c["token_ids"]) for c in private["completions"]),
            "bytes": private["bytes_sent"] + private["bytes_received"],
            "one_time_s": open_s,
            "lora_bytes": private["lora_bytes"],
        }
        push_adapter(server.transport_cfg(), adapter, name="bench")
        start = time.perf_counter()
        served = generate(server.transport_cfg(), prompts, "bench", max_new_tokens=args.new_tokens)
        rows["server"] = {
            "tokens": [c["token_ids"] for c in served["completions"]],
            "seconds": time.perf_counter() - start,
            "generated": sum(len(c["token_ids"]) for c in served["completions"]),
            "bytes": served["bytes_sent"] + served["bytes_received"],
        }
    finally:
        server.stop()
    rows["local"] = local_merged(model_dir, adapter, prompts, args.new_tokens)
    report(rows, args)
    return 0


def report(rows: dict, args) -> None:
    """Prints the table and writes the JSON."""
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, rank {args.rank} on q,v of every block")
    print(f"{'path':8} {'tokens/s':>9} {'bytes/token':>12} {'same tokens as local':>22}")
    for name, row in rows.items():
        row["tokens_per_s"] = row["generated"] / row["seconds"]
        row["bytes_per_token"] = row["bytes"] / max(row["generated"], 1)
        row["same_as_local"] = row["tokens"] == rows["local"]["tokens"]
        print(f"{name:8} {row['tokens_per_s']:9.1f} {row['bytes_per_token']:12,.0f} {str(row['same_as_local']):>22}")
    private = rows["private"]
    print(
        f"private: session open + client-stage download {private['one_time_s']:.1f} s (one time); the middle's LoRA "
        f"{private['lora_bytes']:,} bytes once, in the first Forward: "
        f"{(private['bytes'] - private['lora_bytes']) / private['generated']:,.0f} bytes/token without it"
    )
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
