"""Adapter pushes from a hostile client: names, adapter_config.json, tensors, registry quotas, identities on every RPC."""

from __future__ import annotations

import json
import os
import re
import subprocess

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tandem.client.assemble import build_local
from tandem.client.errors import ServerError
from tandem.client.offsite import push_adapter
from tandem.cloud.tls import issue_bundle
from tandem.protos import offsite_pb2 as opb
from tandem.protos import offsite_pb2_grpc as opb_grpc
from tandem.protos import serving_pb2 as spb
from tandem.protos import serving_pb2_grpc as spb_grpc
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.protos.bundle import read_bundle
from tandem.stages.adapter_files import sha256
from tandem.stages.lora import LoraConfig, PeftMeta, save_peft
from tandem.testing.servers import BIN, start_server

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A valid tandem adapter for the tiny Llama (every block, every default target): {file: bytes}."""
    sm = build_local(tiny_models["llama"], "2:2", LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for b in sm.adapter.b:
            b.normal_(0, 0.01)
    out = str(tmp_path_factory.mktemp("adapter"))
    save_peft(sm.adapter, out, PeftMeta(sm.model_id))
    return {n: _read(os.path.join(out, n)) for n in (CONFIG, WEIGHTS)}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    s = start_server(
        tiny_models["llama"],
        tmp_path_factory.mktemp("srv"),
        "--adapter-registry",
        str(tmp_path_factory.mktemp("srv") / "registry"),
    )
    yield s
    s.stop()


def _channel(server, bundle=None):
    key, cert, ca = read_bundle(bundle or server.identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(server.addr, creds)


def _push(server, files: dict[str, bytes], name: str, bundle=None):
    """A raw PushAdapter, as any client may send it (no client-side checks)."""
    with _channel(server, bundle) as ch:
        req = opb.PushAdapterRequest(
            name=name, files=[opb.AdapterFile(name=n, data=b, sha256=sha256(b)) for n, b in files.items()]
        )
        return opb_grpc.OffsiteTuningStub(ch).PushAdapter(req, timeout=60)


def _refused(server, files, name, bundle=None) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as ei:
        _push(server, files, name, bundle)
    e = ei.value
    reason = dict(e.trailing_metadata() or ()).get("tandem-reason", "")
    return e.code(), e.details(), reason


def _names(server, bundle=None) -> set[str]:
    with _channel(server, bundle) as ch:
        return {
            a.name for a in opb_grpc.OffsiteTuningStub(ch).ListAdapters(opb.ListAdaptersRequest(), timeout=30).adapters
        }


def _with_config(adapter, **changes) -> dict[str, bytes]:
    cfg = json.loads(adapter[CONFIG])
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return {**adapter, CONFIG: json.dumps(cfg).encode()}


def _with_weights(adapter, edit) -> dict[str, bytes]:
    w = dict(st_load(adapter[WEIGHTS]))
    edit(w)
    return {**adapter, WEIGHTS: st_save(w)}


_DROP = object()


def _raw_alpha(adapter, text: bytes) -> dict[str, bytes]:
    """lora_alpha written as a bare token Python's json accepts (NaN, Infinity), not valid JSON."""
    out = re.sub(rb'"lora_alpha": [0-9.]+', b'"lora_alpha": ' + text, adapter[CONFIG])
    assert out != adapter[CONFIG]
    return {**adapter, CONFIG: out}


_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

# (case, adapter files from the valid one, a phrase the one-line error must contain)
BAD_CONFIGS = [
    ("alpha-string", lambda a: _with_config(a, lora_alpha="abc"), "lora_alpha must be a finite number"),
    ("alpha-nan", lambda a: _raw_alpha(a, b"NaN"), "NaN"),
    ("alpha-inf", lambda a: _raw_alpha(a, b"-Infinity"), "Infinity"),
    ("alpha-zero", lambda a: _with_config(a, lora_alpha=0), "lora_alpha must be"),
    ("alpha-bool", lambda a: _with_config(a, lora_alpha=True), "lora_alpha must be"),
    ("r-zero", lambda a: _with_config(a, r=0), "r must be an integer"),
    ("r-negative", lambda a: _with_config(a, r=-4), "r must be an integer"),
    ("r-huge", lambda a: _with_config(a, r=10**12), "r must be an integer"),
    ("r-float", lambda a: _with_config(a, r=4.0), "r must be an integer"),
    ("r-mismatch", lambda a: _with_config(a, r=2), "has shape"),
    ("dora", lambda a: _with_config(a, use_dora=True), "use_dora is not supported"),
    ("fan-in-fan-out", lambda a: _with_config(a, fan_in_fan_out=True), "fan_in_fan_out"),
    ("modules-to-save", lambda a: _with_config(a, modules_to_save=["lm_head"]), "modules_to_save is not supported"),
    ("rank-pattern", lambda a: _with_config(a, rank_pattern={"q_proj": 8}), "rank_pattern is not supported"),
    ("layer-replication", lambda a: _with_config(a, layer_replication=[[0, 2]]), "layer_replication is not supported"),
    ("bias", lambda a: _with_config(a, bias="all"), "bias 'all' is not served"),
    ("unknown-option", lambda a: _with_config(a, my_option=1), "unsupported options ['my_option']"),
    ("pissa-init", lambda a: _with_config(a, init_lora_weights="pissa"), "init_lora_weights"),
    ("dropout", lambda a: _with_config(a, lora_dropout=1.5), "lora_dropout"),
    ("target-unknown", lambda a: _with_config(a, target_modules=["q_proj", "nope"]), "['nope'] name layers"),
    ("target-not-listed", lambda a: _with_config(a, target_modules=["k_proj"]), "does not target"),
    ("layers-not-listed", lambda a: _with_config(a, layers_to_transform=[5]), "does not target"),
    (
        "layers-out-of-range",
        lambda a: _with_config(a, layers_to_transform=[99]),
        "layers_to_transform must list blocks",
    ),
    ("config-list", lambda a: {**a, CONFIG: b"[1, 2]"}, "must be a JSON object"),
    ("config-huge", lambda a: _with_config(a, task_type="x" * 100_000), "a LoRA config is at most"),
    ("config-deep", lambda a: {**a, CONFIG: b"[" * 30_000 + b"]" * 30_000}, "not valid JSON"),
    (
        "int-weights",
        lambda a: _with_weights(a, lambda w: w.update({_A: torch.ones(4, 32, dtype=torch.int32)})),
        "floating point",
    ),
    ("half-pair", lambda a: _with_weights(a, lambda w: w.pop(_B)), "only lora_A"),
    ("no-tensors", lambda a: {**a, WEIGHTS: st_save({})}, "holds no tensors"),
]


@pytest.mark.parametrize("case,make,phrase", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_push_refuses_configs_that_would_fail_or_mislead_at_generate(case, make, phrase, adapter, server):
    code, details, reason = _refused(server, make(adapter), f"bad-{case}")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "adapter-rejected", details
    assert phrase in details and "\n" not in details and "Traceback" not in details, details
    assert f"bad-{case}" not in _names(server)  # nothing registered, nothing on disk
    assert "Traceback" not in server.log()


def test_tandem_and_peft_written_configs_are_accepted(adapter, server, tmp_path):
    from peft import LoraConfig as PeftLoraConfig

    assert not _push(server, adapter, "tandem-made").already_registered
    # The same tensors with a config written by peft itself (every option it saves, at its defaults).
    cfg = json.loads(adapter[CONFIG])
    PeftLoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        target_modules=cfg["target_modules"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=cfg["base_model_name_or_path"],
    ).save_pretrained(str(tmp_path))
    peft_made = {**adapter, CONFIG: (tmp_path / CONFIG).read_bytes()}
    assert _push(server, peft_made, "peft-made").adapter.name == "peft-made"
    assert {"tandem-made", "peft-made"} <= _names(server)


def test_adapter_names_are_checked_whole(adapter, server):
    code, details, _ = _refused(server, adapter, "mine\n")  # `re.match(...$)` let a trailing newline through
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter name" in details
    for bad in ("../x", ".push-x", "x" * 65, "b\u00f3b", "a/b"):
        assert _refused(server, adapter, bad)[0] == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert not [n for n in _names(server) if not n.isascii() or "\n" in n or n.startswith(".")]


def test_one_push_cannot_clobber_another_identitys_adapter(adapter, tiny_models, server_factory, tmp_path):
    """The staging directory of a push of 'x' was 'x.partial', a valid name another identity could own."""
    registry = tmp_path / "registry"
    server = server_factory(tiny_models["llama"], "--adapter-registry", str(registry))
    bob = issue_bundle(server.tls_dir, "bob")
    _push(server, adapter, "x.partial", bob)
    _push(server, _with_weights(adapter, lambda w: w.update({_B: w[_B] * 2})), "x")
    assert (registry / "x.partial" / WEIGHTS).read_bytes() == adapter[WEIGHTS]
    assert "x.partial" in _names(server, bob)
    assert not [d for d in os.listdir(registry) if d.startswith(".")]  # no staging left behind


def test_registry_quota_per_identity(adapter, tiny_models, server_factory, tmp_path):
    size = len(adapter[CONFIG]) + len(adapter[WEIGHTS])
    server = server_factory(
        tiny_models["llama"],
        "--adapter-registry",
        str(tmp_path / "registry"),
        "--registry-quota-mb",
        str(2.5 * size / 2**20),
        "--registry-max-adapters",
        "3",
    )
    variant = [_with_weights(adapter, lambda w, i=i: w.update({_B: w[_B] + i})) for i in range(4)]
    _push(server, variant[0], "one")
    _push(server, variant[1], "two")
    code, details, reason = _refused(server, variant[2], "three")  # 3 x size > 2.5 x size
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "registry-quota", details
    assert "registry quota" in details and "--registry-quota-mb" in details
    assert "three" not in _names(server) and not os.path.exists(tmp_path / "registry" / "three")
    assert _push(server, variant[0], "one").already_registered  # what is registered stays usable
    # The client does not retry it, and says why.
    with pytest.raises(ServerError) as ei:
        cfg_dir = tmp_path / "three"
        cfg_dir.mkdir()
        for n, b in variant[2].items():
            (cfg_dir / n).write_bytes(b)
        push_adapter(server.transport_cfg(backoff_s=5.0), str(cfg_dir), "three")
    assert ei.value.reason == "registry-quota" and "share of the adapter registry is full" in str(ei.value)
    # Another identity has its own share; the count limit holds too.
    bob = issue_bundle(server.tls_dir, "bob")
    _push(server, variant[2], "bob-1", bob)
    _push(server, variant[3], "bob-2", bob)
    server2 = server_factory(
        tiny_models["llama"], "--adapter-registry", str(tmp_path / "registry2"), "--registry-max-adapters", "2"
    )
    _push(server2, variant[0], "a")
    _push(server2, variant[1], "b")
    code, details, reason = _refused(server2, variant[2], "c")
    assert (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and reason == "registry-quota"
        and "--registry-max-adapters 2" in details
    )


def test_push_bytes_count_against_the_byte_quota(adapter, tiny_models, server_factory, tmp_path):
    size = len(adapter[CONFIG]) + len(adapter[WEIGHTS])
    rate = size / 8  # the burst (4 s) holds half an adapter
    server = server_factory(
        tiny_models["llama"], "--adapter-registry", str(tmp_path / "registry"), "--quota-mbps", str(rate / 2**20)
    )
    code, details, reason = _refused(server, adapter, "big")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "over-quota-burst", details
    assert "--quota-mbps" in details and "MiB" in details


@pytest.fixture(scope="module")
def emulator_pkg(tiny_models, sample_data, tmp_path_factory):
    from tandem.emulator.build import build_emulator
    from tandem.emulator.distill import DistillConfig

    out = str(tmp_path_factory.mktemp("pkg") / "llama")
    build_emulator(
        tiny_models["llama"],
        "2:2",
        out,
        sample_data,
        DistillConfig(steps=1, batch_size=2, seq_len=16, warmup=0, val_every=1, progress=False),
        keep=1,
    )
    return out


def _all_rpcs():
    """(stub class, method name, request) for every RPC the server offers (health aside), from the protos."""
    out = []
    for mod, stub, svc in (
        (pb, pb_grpc.SplitTuningStub, "SplitTuning"),
        (opb, opb_grpc.OffsiteTuningStub, "OffsiteTuning"),
        (spb, spb_grpc.AdapterServingStub, "AdapterServing"),
    ):
        for m in mod.DESCRIPTOR.services_by_name[svc].methods:
            req = getattr(mod, m.input_type.name, None) or getattr(pb, m.input_type.name)
            out.append((stub, m.name, req(), m.server_streaming))
    return out


def test_a_revoked_certificate_is_refused_by_every_rpc(emulator_pkg, tiny_models, server_factory, tmp_path):
    server = server_factory(
        tiny_models["llama"], "--emulator", emulator_pkg, "--adapter-registry", str(tmp_path / "reg")
    )
    alice = issue_bundle(server.tls_dir, "alice")
    with _channel(server, alice) as ch:  # before: the emulator downloads
        chunks = list(opb_grpc.OffsiteTuningStub(ch).FetchEmulator(opb.FetchEmulatorRequest(), timeout=60))
        assert chunks and chunks[-1].name == "manifest.json"
    subprocess.run(
        [os.path.join(BIN, "cloud"), "certs", "revoke", "alice", "--dir", server.tls_dir],
        check=True,
        capture_output=True,
    )
    rpcs = _all_rpcs()
    assert {"FetchEmulator", "PushAdapter", "ListAdapters", "Generate", "FetchClientStages", "Forward"} <= {
        r[1] for r in rpcs
    }
    with _channel(server, alice) as ch:
        for stub, method, req, streaming in rpcs:
            call = getattr(stub(ch), method)
            with pytest.raises(grpc.RpcError) as ei:
                out = call(req, timeout=30)
                if streaming:
                    list(out)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in ei.value.details(), method
    with _channel(server) as ch:  # others are unaffected
        assert list(opb_grpc.OffsiteTuningStub(ch).FetchEmulator(opb.FetchEmulatorRequest(), timeout=60))


def test_emulator_download_is_paced_by_the_byte_quota(emulator_pkg, tiny_models, server_factory, tmp_path):
    import time

    sizes = [os.path.getsize(os.path.join(emulator_pkg, f)) for f in os.listdir(emulator_pkg)]
    size = sum(sizes)
    # Pacing lets the last chunk overdraw the bucket, so the download lasts at least (size - burst - largest chunk) / rate:
    # 2 s at this rate (burst: 4 s worth).
    rate = (size - min(max(sizes), 2**20)) / 6
    server = server_factory(
        tiny_models["llama"],
        "--emulator",
        emulator_pkg,
        "--adapter-registry",
        str(tmp_path / "reg"),
        "--quota-mbps",
        str(rate / 2**20),
    )
    with _channel(server) as ch:
        stub = opb_grpc.OffsiteTuningStub(ch)
        t0 = time.monotonic()
        got = sum(len(c.data) for c in stub.FetchEmulator(opb.FetchEmulatorRequest(), timeout=60))
        took = time.monotonic() - t0
        assert got >= size * 0.99 and took >= 1.8, took


def test_generate_replies_count_against_the_byte_quota(tiny_models, server_factory, tmp_path):
    server = server_factory(
        tiny_models["llama"], "--adapter-registry", str(tmp_path / "reg"), "--quota-mbps", str(100 / 2**20)
    )  # 100 B/s, burst 400 B
    with _channel(server) as ch:
        req = spb.GenerateRequest(prompts=["a b c", "d e f", "g h", "i j"], max_new_tokens=100)
        assert req.ByteSize() < 400
        resp = spb_grpc.AdapterServingStub(ch).Generate(req, timeout=120)
        assert resp.ByteSize() > 400  # more than the whole burst: the identity is now in debt
        with pytest.raises(grpc.RpcError) as ei:
            opb_grpc.OffsiteTuningStub(ch).ListAdapters(opb.ListAdaptersRequest(), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "over its quota" in ei.value.details()


def test_an_undecodable_body_is_an_invalid_argument_on_every_rpc(emulator_pkg, tiny_models, server_factory, tmp_path):
    """Bytes that are not the RPC's message get INVALID_ARGUMENT with a reason and one log line, never a traceback."""
    server = server_factory(
        tiny_models["llama"], "--emulator", emulator_pkg, "--adapter-registry", str(tmp_path / "reg")
    )
    paths = [
        (f"/{svc.full_name}/{m.name}", m.server_streaming)
        for mod in (pb, opb, spb)
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    ]
    paths += [("/grpc.health.v1.Health/Check", False), ("/grpc.health.v1.Health/Watch", True)]
    assert len(paths) >= 14, paths
    garbage = b"\xff\xff\xff\xff\x0f\x0a\x80"  # a varint that never ends: no message type parses it
    lines = len(server.log().splitlines())
    with _channel(server) as ch:
        for path, streaming in paths:
            call = (ch.unary_stream if streaming else ch.unary_unary)(path)  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as ei:
                out = call(garbage, timeout=30)
                if streaming:
                    list(out)
            e = ei.value
            reasons = [v for k, v in (e.trailing_metadata() or ()) if k == "tandem-reason"]
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and reasons == ["invalid"], (
                path,
                e.code(),
                e.details(),
            )
            assert "not a valid" in e.details(), (path, e.details())
    log = server.log()
    assert "Traceback" not in log and len(log.splitlines()) - lines <= len(paths), log[-3000:]


def test_registered_adapters_are_private_to_the_server(adapter, tiny_models, server_factory, tmp_path):
    """A data owner's pushed adapter is the server user's alone (0700 folders, 0600 files), whatever the umask."""
    import stat

    registry = tmp_path / "registry"
    old = os.umask(0o022)
    try:
        server = server_factory(tiny_models["llama"], "--adapter-registry", str(registry))
    finally:
        os.umask(old)
    _push(server, adapter, "mine")
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in [registry, *registry.rglob("*")]}
    assert len(modes) >= 4, modes  # the registry, the adapter's folder, its files and registration.json
    for p, m in modes.items():
        assert m == (0o700 if p.is_dir() else 0o600), (p, oct(m))
