"""Offsite-Tuning on the data owner's side: tune against an emulator, fetch it, push the adapter, evaluate the plug-in."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
from safetensors.torch import load as st_load

from tandem.emulator.errors import PackageError
from tandem.emulator.model import EmulatorStage
from tandem.emulator.package import MANIFEST, load_package
from tandem.protos import offsite_pb2 as opb
from tandem.protos import offsite_pb2_grpc as opb_grpc
from tandem.stages.adapter_files import ADAPTER_CONFIG, CLIENT_BLOCKS, adapter_digest, read_adapter_dir, sha256
from tandem.stages.arch import arch_for
from tandem.stages.loading import client_parts
from tandem.stages.lora import LoRAAdapter, LoraConfig, block_of, inject_slots, load_peft_tensors
from tandem.stages.modules import BottomStage, TopStage

from .data import MAX_VAL_SEQUENCES, load_split
from .downloads import MAX_DOWNLOAD_BYTES, emulator_files, receive
from .errors import ClientError
from .staged import LocalMiddle, StagedModel, _check_tokenizer, _gen, _order, _split_names, connect_split
from .transport import Meter, Transport, TransportConfig

log = logging.getLogger(__name__)


def build_offsite(pkg_dir: str, lora: LoraConfig, seed: int) -> StagedModel:
    """The data owner's model in offsite mode: client stages from the package, the emulator as the middle.

    Only the client's blocks carry LoRA slots; the emulator blocks are frozen and never adapted, so the
    adapter plugs into the full model unchanged. No server is contacted.
    """
    from tandem.stages.loading import load_tokenizer

    try:
        pkg = load_package(pkg_dir)
    except PackageError as e:
        raise ClientError(f"--emulator: {e}") from None
    config = pkg.config()
    layout = pkg.layout
    parts = client_parts(config, layout, pkg.client_state())
    tokenizer = load_tokenizer(pkg.path)  # the loader of every mode
    _check_tokenizer(tokenizer, config)
    targets = lora.target_modules or parts.arch.lora_targets
    specs = _order(inject_slots(parts.blocks, parts.arch, layout.client_blocks, targets))
    adapter = LoRAAdapter(specs, lora, generator=_gen(seed))
    names = _split_names(specs, layout)
    k = layout.bottom
    middle = LocalMiddle(EmulatorStage(parts, pkg.emulator_blocks(config), sink=pkg.sink()), adapter, [])
    return StagedModel(
        BottomStage(parts, list(range(k))),
        middle,
        TopStage(parts, list(range(k, k + layout.top))),
        adapter,
        names,
        layout,
        pkg.manifest["model_id"],
        config,
        tokenizer,
        "offsite",
    )


def adapter_lora_config(adapter_dir: str) -> LoraConfig:
    """The LoraConfig an adapter directory was trained with (dropout off: for evaluation)."""
    try:
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ClientError(
            f"--adapter: cannot read {ADAPTER_CONFIG} in {adapter_dir!r} ({e}); pass a run's adapter/ directory"
        ) from None
    lora = LoraConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=0.0,
        target_modules=tuple(cfg.get("target_modules") or ()),
    )
    return lora


def load_adapter(sm: StagedModel, adapter_dir: str) -> dict:
    """Loads a tuned adapter into a StagedModel: its LoRA tensors and, if present, fully tuned client blocks.

    Raises:
        ClientError: the adapter names a slot or weight this model does not have, or a shape differs.
    """
    _, tensors = load_peft_tensors(adapter_dir)
    index = {s.name: i for i, s in enumerate(sm.adapter.specs)}
    with torch.no_grad():
        for key, t in tensors.items():
            name, ab = key.rsplit(".lora_", 1)
            if name not in index:
                raise ClientError(
                    f"the adapter has LoRA on {name!r}, which this model has no slot for; "
                    "tune and evaluate with the same --lora-targets and layout"
                )
            p = (sm.adapter.a if ab.startswith("A") else sm.adapter.b)[index[name]]
            if p.shape != t.shape:
                raise ClientError(f"the adapter's {key} is {list(t.shape)}, the model needs {list(p.shape)}")
            p.copy_(t)
        n_blocks = 0
        path = os.path.join(adapter_dir, CLIENT_BLOCKS)
        if os.path.exists(path):
            with open(path, "rb") as f:
                state = st_load(f.read())
            prefix = arch_for(sm.config).block_prefix
            for gid, block in sm.client_blocks():
                own = block.state_dict()
                sub = {}
                for k in own:
                    full = f"{prefix}.{gid}.{k.replace('.base_layer.', '.')}"
                    if full not in state:
                        raise ClientError(f"{CLIENT_BLOCKS} lacks {full}; it was not made for this layout")
                    sub[k] = state[full]
                block.load_state_dict(sub)
                n_blocks += 1
    return {"lora_tensors": len(tensors), "client_blocks_loaded": n_blocks}


class OffsiteTransport(Transport):
    """The split transport (TLS, identity, retries, accounting) with the OffsiteTuning stub."""

    def __init__(self, cfg: TransportConfig, meter: Meter | None = None):
        super().__init__(cfg, meter)
        self.stub = opb_grpc.OffsiteTuningStub(self.channel)


def fetch_emulator(tcfg: TransportConfig, out: str, max_bytes: int = MAX_DOWNLOAD_BYTES) -> dict:
    """Downloads the server's emulator package into `out` and verifies it; returns a summary with bytes.

    Only the files a package holds are accepted, each against its SHA-256 and within `max_bytes` in all;
    `out` is replaced only when the whole package verifies (see tandem.client.downloads).
    """
    t = OffsiteTransport(tcfg)
    t0 = time.perf_counter()
    seen: dict = {}

    def verify(staging: str, digests: dict[str, str]) -> None:
        if MANIFEST not in digests:
            raise ClientError("the server's package has no manifest; ask the operator to rebuild it")
        try:
            pkg = load_package(staging)  # every file against the manifest's SHA-256
            listed = set(pkg.manifest["files"]) | {MANIFEST}
            seen.update(
                model_id=str(pkg.manifest["model_id"]), kept=[int(i) for i in pkg.manifest["kept_middle_blocks"]]
            )
        except (PackageError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ClientError(f"the downloaded package does not verify: {e}") from None
        if listed != set(digests):
            raise ClientError(
                f"the server sent files {sorted(set(digests) - listed)} its manifest does not list; "
                "refusing the package"
            )

    try:
        digests = receive(
            t.stream("FetchEmulator", opb.FetchEmulatorRequest(), kind="FetchEmulator"),
            out,
            emulator_files(max_bytes),
            verify,
        )
    finally:
        t.close()
    tot = t.meter.totals()["one_time"].get("FetchEmulator", {})
    return {
        "package": out,
        "files": len(digests),
        "bytes_sent": tot.get("sent", 0),
        "bytes_received": tot.get("received", 0),
        "framing_estimate_bytes": t.meter.framing,
        "wall_s": time.perf_counter() - t0,
        "model_id": seen["model_id"],
        "kept_middle_blocks": seen["kept"],
    }


def push_adapter(tcfg: TransportConfig, adapter_dir: str, name: str = "", public: bool = False) -> dict:
    """Uploads only the adapter files; the cloud validates them against its model and registers them.

    The adapter belongs to this client's identity: other identities can neither list it nor generate
    with it, unless `public`.
    """
    try:
        blobs = read_adapter_dir(adapter_dir)
    except FileNotFoundError as e:
        raise ClientError(f"--adapter: {e}") from None
    req = opb.PushAdapterRequest(
        name=name,
        files=[opb.AdapterFile(name=n, data=b, sha256=sha256(b)) for n, b in sorted(blobs.items())],
        public=public,
    )
    t = OffsiteTransport(tcfg)
    try:
        resp = t.call("PushAdapter", req, kind="PushAdapter", one_time=True, retry=True)
    finally:
        t.close()
    a = resp.adapter
    if a.sha256 != adapter_digest(blobs):
        raise ClientError("the cloud registered a different digest than this adapter's; push again")
    tot = t.meter.totals()["one_time"]["PushAdapter"]
    return {
        "name": a.name,
        "sha256": a.sha256,
        "params": a.params,
        "blocks": list(a.blocks),
        "model_id": a.model_id,
        "owner": a.owner,
        "public": a.public,
        "already_registered": resp.already_registered,
        "bytes_sent": tot["sent"],
        "bytes_received": tot["received"],
    }


def eval_plugin(
    tcfg: TransportConfig,
    adapter_dir: str,
    data_dir: str,
    out: str,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    val_fraction: float = 0.1,
    name: str = "",
    val_max: int = MAX_VAL_SEQUENCES,
) -> dict:
    """Measures the adapter plugged into the full model, through the split path, on the validation split.

    The text stays here: the cloud sees only the activations of the split path, as in `client tune`. The
    same split as `client tune` (same --seed, --seq-len, --val-fraction) is used. Writes OUT/eval.json.
    """
    from .trainer import evaluate, write_json

    lora = adapter_lora_config(adapter_dir)
    try:
        blobs = read_adapter_dir(adapter_dir)
    except FileNotFoundError as e:
        raise ClientError(f"--adapter: {e}") from None
    digest = adapter_digest(blobs)
    meter = Meter(tls=not tcfg.insecure)
    registered = None
    if name:
        ot = OffsiteTransport(tcfg, meter)
        try:
            listed = {
                a.name: a
                for a in ot.call("ListAdapters", opb.ListAdaptersRequest(), kind="ListAdapters", one_time=True).adapters
            }
        finally:
            ot.close()
        if name not in listed:
            raise ClientError(
                f"no adapter {name!r} is registered on the server for your identity; `client push --name {name}` first"
            )
        if listed[name].sha256 != digest:
            raise ClientError(f"the adapter registered as {name!r} is not the one in {adapter_dir!r} (digest differs)")
        registered = name
    t = Transport(tcfg, meter)
    t0 = time.perf_counter()
    try:
        _, tensors = load_peft_tensors(adapter_dir)
        sm = connect_split(t, lora, seed, remote_lora=False)
        if any(block_of(k) not in sm.layout.client_blocks for k in tensors):
            sm.close()
            sm = connect_split(t, lora, seed, remote_lora=True)
        try:
            data = load_split(data_dir, sm.tokenizer, seq_len, batch_size, seed, val_fraction, val_max)
            zero_shot = evaluate(sm, data, seed)
            loaded = load_adapter(sm, adapter_dir)
            plugged = evaluate(sm, data, seed)
        finally:
            sm.close()
    finally:
        t.close()
    tot = meter.totals()
    report = {
        "mode": "plug-in eval",
        "model_id": sm.model_id,
        "server": tcfg.server,
        "adapter": adapter_dir,
        "adapter_sha256": digest,
        "registered_as": registered,
        "loaded": loaded,
        "layout": {"num_layers": sm.layout.num_layers, "bottom": sm.layout.bottom, "top": sm.layout.top},
        "settings": {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "seed": seed,
            "val_fraction": val_fraction,
            "val_max_sequences": val_max,
        },
        "validation": {
            "zero_shot": zero_shot,
            "plugged_in": plugged,
            "sequences": len(data.val),
            "ppl_change": plugged["ppl"] / zero_shot["ppl"] - 1.0 if not math.isnan(zero_shot["ppl"]) else None,
        },
        "bytes": {
            "per_kind": tot["per_kind"],
            "one_time": tot["one_time"],
            "framing_estimate_bytes": tot["framing_estimate_bytes"],
        },
        "wall_s": time.perf_counter() - t0,
        "privacy": "the validation text stayed on this machine; the cloud saw the split path's activations only",
    }
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval.json"), report)
    return report
