"""Offsite-Tuning on the data owner's side: fetch the emulator, push the adapter, evaluate it plugged in."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace

import torch
from safetensors.torch import load as st_load

from tandem.emulator.errors import PackageError
from tandem.emulator.package import MANIFEST, load_package
from tandem.protos import offsite_pb2 as offsite_pb
from tandem.protos import offsite_pb2_grpc as offsite_pb_grpc
from tandem.protos.handshake import package_transcript
from tandem.stages.adapter_files import ADAPTER_CONFIG, CLIENT_BLOCKS, adapter_digest, read_adapter_dir, sha256
from tandem.stages.arch import arch_for
from tandem.stages.lora import LoraConfig, block_of, load_peft_tensors

from .allowed_files import MAX_DOWNLOAD_BYTES, emulator_files
from .assemble import connect_split
from .data import MAX_VAL_SEQUENCES, load_split
from .downloads import receive
from .errors import ClientError
from .evaluation import evaluate
from .meter import Meter
from .model import StagedModel
from .rundir import write_json
from .signed_replies import PackageSeal, check_reply, check_signed, fresh_nonce
from .transport import Transport, TransportConfig

log = logging.getLogger(__name__)


def adapter_lora_config(adapter_dir: str) -> LoraConfig:
    """The LoraConfig an adapter directory was trained with (dropout off: for evaluation).

    Raises:
        ClientError: (one line, naming the file and the field) adapter_config.json is not the object peft writes.
    """
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8
        raise ClientError(f"--adapter: cannot read {path} ({e}); pass a run's adapter/ directory") from None
    if not isinstance(cfg, dict):
        raise ClientError(f"--adapter: {path} holds a JSON {type(cfg).__name__}, not an object of LoRA settings")
    rank, targets = cfg.get("r"), cfg.get("target_modules") or []
    alpha = cfg.get("lora_alpha", rank)  # as the cloud reads it (cloud/adapter_config.py), and its bounds
    for field, value, ok, what in (
        ("r", rank, isinstance(rank, int) and 1 <= rank <= 4096, "an integer in 1..4096 (the LoRA rank)"),
        ("lora_alpha", alpha, isinstance(alpha, (int, float)) and 0 < alpha <= 1e6, "a number in (0, 1e6]"),
        (
            "target_modules",
            targets,
            isinstance(targets, list) and all(isinstance(n, str) for n in targets),
            "a list of names",
        ),
    ):
        if not ok or isinstance(value, bool):
            raise ClientError(f"--adapter: {path}: {field!r} must be {what}, not {value!r:.60}")
    return LoraConfig(
        rank=rank,
        alpha=float(alpha),
        dropout=0.0,
        target_modules=tuple(targets),
        layers=_layers_to_transform(cfg, adapter_dir),
    )


def _layers_to_transform(cfg: dict, adapter_dir: str) -> tuple[int, ...]:
    """The adapter's layers_to_transform (peft: a list, one index, or null for every block) as --lora-layers."""
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers or []
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ClientError(f"--adapter: layers_to_transform in {adapter_dir!r} is not a list of blocks: {layers!r}")
    if len(set(layers)) != len(layers):
        raise ClientError(f"--adapter: layers_to_transform in {adapter_dir!r} lists a block twice: {layers!r}")
    return tuple(sorted(layers))


def load_adapter(model: StagedModel, adapter_dir: str) -> dict:
    """Loads a tuned adapter into a StagedModel: its LoRA tensors and, if present, fully tuned client blocks.

    Raises:
        ClientError: the adapter names a slot or weight this model does not have, or a shape differs.
    """
    _, tensors = load_peft_tensors(adapter_dir)
    index = {spec.name: i for i, spec in enumerate(model.adapter.specs)}
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, ab = key.rsplit(".lora_", 1)
            if name not in index:
                raise ClientError(
                    f"the adapter has LoRA on {name!r}, which this model has no slot for; "
                    "tune and evaluate with the same --lora-targets and layout"
                )
            p = (model.adapter.a if ab.startswith("A") else model.adapter.b)[index[name]]
            if p.shape != tensor.shape:
                raise ClientError(f"the adapter's {key} is {list(tensor.shape)}, the model needs {list(p.shape)}")
            p.copy_(tensor)
        n_blocks = 0
        path = os.path.join(adapter_dir, CLIENT_BLOCKS)
        if os.path.exists(path):
            with open(path, "rb") as f:
                state = st_load(f.read())
            prefix = arch_for(model.config).block_prefix
            for block_id, block in model.client_blocks():
                own = block.state_dict()
                sub = {}
                for k in own:
                    full = f"{prefix}.{block_id}.{k.replace('.base_layer.', '.')}"
                    if full not in state:
                        raise ClientError(f"{CLIENT_BLOCKS} lacks {full}; it was not made for this layout")
                    sub[k] = state[full]
                block.load_state_dict(sub)
                n_blocks += 1
    return {"lora_tensors": len(tensors), "client_blocks_loaded": n_blocks}


def fetch_emulator(transport_cfg: TransportConfig, out: str, max_bytes: int = MAX_DOWNLOAD_BYTES) -> dict:
    """Downloads the server's emulator package into `out` and verifies it; returns a summary with bytes.

    Only the files a package holds are accepted, each against its SHA-256 and within `max_bytes` in all;
    `out` is replaced only when the whole package verifies (see tandem.client.downloads), and is the package the
    serving process signed for this request (client/signed_replies.py).
    """
    transport = Transport(transport_cfg, stub=offsite_pb_grpc.OffsiteTuningStub)
    t0 = time.perf_counter()
    seen: dict = {}
    request, seal = offsite_pb.FetchEmulatorRequest(nonce=fresh_nonce()), PackageSeal(MANIFEST)

    def verify(staging: str, digests: dict[str, str]) -> None:
        if MANIFEST not in digests:
            raise ClientError("the server's package has no manifest; ask the operator to rebuild it")
        transcript = package_transcript(request.nonce, digests)  # first: nothing parses a hop's files
        seen["signature"] = check_signed(transport, "emulator package", seal.certificate, seal.signature, transcript)
        try:
            manifest = load_package(staging).manifest  # every file against the manifest's SHA-256
            listed = set(manifest["files"]) | {MANIFEST}
            seen.update(model_id=str(manifest["model_id"]), kept=[int(i) for i in manifest["kept_middle_blocks"]])
        except (PackageError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise ClientError(f"the downloaded package does not verify: {e}") from None
        if listed != set(digests):
            raise ClientError(
                f"the server sent files {sorted(set(digests) - listed)} its manifest does not list; "
                "refusing the package"
            )

    try:
        chunks = seal.watch(transport.stream("FetchEmulator", request))
        digests = receive(chunks, out, emulator_files(max_bytes), verify)
    finally:
        transport.close()
    totals = transport.meter.totals()["one_time"].get("FetchEmulator", {})
    return {
        "package": out,
        "files": len(digests),
        "bytes_sent": totals.get("sent", 0),
        "bytes_received": totals.get("received", 0),
        "framing_estimate_bytes": transport.meter.framing,
        "wall_s": time.perf_counter() - t0,
        "model_id": seen["model_id"],
        "kept_middle_blocks": seen["kept"],
        "signature": seen["signature"],  # "authenticated", or "unauthenticated" without a CA (--insecure)
    }


def _read_adapter(adapter_dir: str) -> dict[str, bytes]:
    """The adapter directory's files (name -> bytes); a one-line ClientError when it lacks one."""
    try:
        return read_adapter_dir(adapter_dir)
    except FileNotFoundError as e:
        raise ClientError(f"--adapter: {e}") from None


def push_adapter(transport_cfg: TransportConfig, adapter_dir: str, name: str = "", public: bool = False) -> dict:
    """Uploads only the adapter files; the cloud validates them against its model and registers them.

    The adapter belongs to this client's identity: other identities can neither list it nor generate
    with it, unless `public`.
    """
    from .privacy.private_bottom import PRIVATE_BOTTOM_FILE

    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), PRIVATE_BOTTOM_FILE)):
        raise ClientError(
            f"--adapter: {adapter_dir} was tuned with a private bottom ({PRIVATE_BOTTOM_FILE} beside it), which "
            "stays with you; on the cloud's model it would run on the shipped bottom blocks instead"
        )
    blobs = _read_adapter(adapter_dir)
    req = offsite_pb.PushAdapterRequest(
        name=name,
        files=[offsite_pb.AdapterFile(name=n, data=b, sha256=sha256(b)) for n, b in sorted(blobs.items())],
        public=public,
        nonce=fresh_nonce(),
    )
    transport = Transport(transport_cfg, stub=offsite_pb_grpc.OffsiteTuningStub)
    try:
        resp = transport.call("PushAdapter", req, kind="PushAdapter", one_time=True, retry=True)
    finally:
        transport.close()
    signature = check_reply(transport, "PushAdapter", req, resp)
    adapter = resp.adapter
    if adapter.sha256 != adapter_digest(blobs):
        raise ClientError("the cloud registered a different digest than this adapter's; push again")
    if adapter.public != public or (name and adapter.name != name):  # the signature covers the request: a guard
        raise ClientError(f"the cloud registered {adapter.name!r} (public={adapter.public}), not what was asked")
    totals = transport.meter.totals()["one_time"]["PushAdapter"]
    return {
        "name": adapter.name,
        "sha256": adapter.sha256,
        "params": adapter.params,
        "blocks": list(adapter.blocks),
        "model_id": adapter.model_id,
        "owner": adapter.owner,
        "public": adapter.public,
        "already_registered": resp.already_registered,
        "signature": signature,
        "bytes_sent": totals["sent"],
        "bytes_received": totals["received"],
    }


def _check_registered(transport_cfg: TransportConfig, meter: Meter, name: str, adapter_dir: str, digest: str) -> None:
    """Refuses an adapter `name` the server does not list for this identity, or lists with another digest."""
    transport = Transport(transport_cfg, meter, stub=offsite_pb_grpc.OffsiteTuningStub)
    request = offsite_pb.ListAdaptersRequest(nonce=fresh_nonce())
    try:
        resp = transport.call("ListAdapters", request, kind="ListAdapters", one_time=True)
    finally:
        transport.close()
    check_reply(transport, "ListAdapters", request, resp)
    listed = {adapter.name: adapter for adapter in resp.adapters}
    if name not in listed:
        raise ClientError(
            f"no adapter {name!r} is registered on the server for your identity; `client push --name {name}` first"
        )
    if listed[name].sha256 != digest:
        raise ClientError(f"the adapter registered as {name!r} is not the one in {adapter_dir!r} (digest differs)")


def _connect_for(transport: Transport, lora: LoraConfig, seed: int, adapter_dir: str) -> StagedModel:
    """The split model the adapter fits: with remote LoRA only when the adapter has slots in the middle."""
    _, tensors = load_peft_tensors(adapter_dir)
    model = connect_split(transport, replace(lora, layers=()), seed, remote_lora=False)  # every client block
    client = model.layout.client_blocks
    if any(block_of(k) not in client for k in tensors) or any(block not in client for block in lora.layers):
        model.close()
        model = connect_split(transport, lora, seed, remote_lora=True)
    return model


def _validation(zero_shot: dict, plugged: dict, sequences: int) -> dict:
    """The report's validation section: the model without and with the adapter, and the change in perplexity."""
    change = plugged["ppl"] / zero_shot["ppl"] - 1.0 if not math.isnan(zero_shot["ppl"]) else None
    return {"zero_shot": zero_shot, "plugged_in": plugged, "sequences": sequences, "ppl_change": change}


def eval_plugin(
    transport_cfg: TransportConfig,
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
    lora = adapter_lora_config(adapter_dir)
    blobs = _read_adapter(adapter_dir)
    digest = adapter_digest(blobs)
    meter = Meter(tls=not transport_cfg.insecure)
    if name:
        _check_registered(transport_cfg, meter, name, adapter_dir, digest)
    transport = Transport(transport_cfg, meter)
    t0 = time.perf_counter()
    try:
        model = _connect_for(transport, lora, seed, adapter_dir)
        try:
            data = load_split(data_dir, model.tokenizer, seq_len, batch_size, seed, val_fraction, val_max)
            zero_shot = evaluate(model, data, seed)
            loaded = load_adapter(model, adapter_dir)
            plugged = evaluate(model, data, seed)
        finally:
            model.close()
    finally:
        transport.close()
    report = {
        "mode": "plug-in eval",
        "model_id": model.model_id,
        "server": transport_cfg.server,
        "adapter": adapter_dir,
        "adapter_sha256": digest,
        "registered_as": name or None,
        "loaded": loaded,
        "layout": {"num_layers": model.layout.num_layers, "bottom": model.layout.bottom, "top": model.layout.top},
        "settings": {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "seed": seed,
            "val_fraction": val_fraction,
            "val_max_sequences": val_max,
        },
        "validation": _validation(zero_shot, plugged, len(data.val)),
        "bytes": meter.totals(),  # per_kind, one_time, framing_estimate_bytes
        "wall_s": time.perf_counter() - t0,
        "privacy": "the validation text stayed on this machine; the cloud saw the split path's activations only",
    }
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "eval.json"), report)
    return report
