"""The emulator package, and the adapter registry's replies, are signed by the serving process's sealing key.

A TLS-terminating hop (a load balancer) holds the server's TLS key: TLS alone let it hand the client a
package of its own choosing that verifies against its own manifest. The serving process signs the
package's files (every name and SHA-256) over the client's fresh nonce with the key that signs split
mode's handshake; the client checks it against the CA it trusts, and a refusal writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import tandem.client.offsite as offsite_mod
from tandem.client.errors import ClientError, ServerError
from tandem.client.offsite import fetch_emulator
from tandem.client.signed_replies import check_reply, fresh_nonce
from tandem.client.transport import Transport, TransportConfig
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.package import MANIFEST, load_package
from tandem.protos import offsite_pb2, offsite_pb2_grpc
from tandem.protos.handshake import package_transcript, sign
from tandem.testing.keyswap import minted_sealing_cert
from tandem.testing.proxies import HostileProxy
from tandem.testing.servers import start_server


@pytest.fixture(scope="module")
def cloud(tiny_models, tmp_path_factory):
    """A real server with a package, a hop holding its TLS key, and another valid package the hop prefers."""
    tmp = tmp_path_factory.mktemp("signed-package")
    pkg = str(tmp / "pkg")
    build_emulator(tiny_models["llama"], "2:2", pkg, None, DistillConfig(steps=0), keep=1)
    server = start_server(tiny_models["llama"], tmp, "--emulator", pkg, "--adapter-registry", str(tmp / "reg"))
    hop = HostileProxy(server)
    yield server, hop, pkg, _forged(pkg, str(tmp / "forged"))
    hop.close()
    server.stop()


def _forged(pkg: str, out: str) -> str:
    """The package with other emulator weights and a manifest to match: it verifies on its own."""
    shutil.copytree(pkg, out)
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    name = next(n for n in manifest["files"] if n.startswith("emulator") and n.endswith(".safetensors"))
    weights = load_file(os.path.join(out, name))
    key = sorted(weights)[0]
    weights[key] = weights[key] + 0.5
    save_file(weights, os.path.join(out, name))
    data = open(os.path.join(out, name), "rb").read()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    json.dump(manifest, open(os.path.join(out, MANIFEST), "w"))
    load_package(out)  # self-consistent
    return out


def _package_chunks(pkg: str, certificate: bytes = b"", signature: bytes = b"") -> list:
    """The package as FetchEmulator streams it (one chunk per file, manifest last), signed as given."""
    names = load_package(pkg).files()
    out = []
    for name in names:
        data = open(os.path.join(pkg, name), "rb").read()
        out.append(
            offsite_pb2.PackageChunk(
                name=name, data=data, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        )
    out[-1].seal_certificate, out[-1].seal_signature = certificate, signature
    return out


def _seal_of(chunks) -> tuple[bytes, bytes]:
    last = offsite_pb2.PackageChunk.FromString(chunks[-1].SerializeToString())
    assert last.name == MANIFEST and last.seal_signature
    return last.seal_certificate, last.seal_signature


def _tcfg(server, addr) -> TransportConfig:
    return TransportConfig(server=addr, ca=server.ca, identity=server.identity, retries=0)


def _files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _refused(cloud, tmp_path, rewrite, expected: str) -> None:
    server, hop, _, _ = cloud
    hop.rewrite = rewrite
    (tmp_path / "pkgs").mkdir()
    try:
        with pytest.raises(ClientError, match=expected) as ei:
            fetch_emulator(_tcfg(server, hop.addr), str(tmp_path / "pkgs" / "fetched"))
    finally:
        hop.rewrite = None
    assert "\n" not in str(ei.value) and str(ei.value).startswith("emulator package refused")
    assert _files_under(tmp_path / "pkgs") == [] and os.listdir(tmp_path / "pkgs") == []


def test_the_honest_package_is_signed_and_accepted(cloud, tmp_path):
    server, hop, pkg, _ = cloud
    for addr in (server.addr, hop.addr):  # direct, and through the hop passing it on untouched
        got = fetch_emulator(_tcfg(server, addr), str(tmp_path / addr.replace(":", "-")))
        assert got["signature"] == "authenticated"
        assert load_package(str(tmp_path / addr.replace(":", "-"))).manifest == load_package(pkg).manifest


def test_a_hop_with_the_tls_key_cannot_substitute_the_package(cloud, tmp_path):
    _, _, _, forged = cloud
    _refused(
        cloud,
        tmp_path,
        lambda cs: _package_chunks(forged, *_seal_of(cs)),  # the genuine signature, on other files
        "emulator package signature does not verify: the emulator package was changed on the way",
    )


def test_a_stripped_signature_is_refused(cloud, tmp_path):
    _, _, _, forged = cloud
    _refused(cloud, tmp_path, lambda cs: _package_chunks(forged), "no sealing certificate or no emulator package")


def _sealing_cert_minted_with_the_tls_key(server) -> tuple:
    """What a hop can mint: a certificate with the sealing purpose, issued (signed) by the server's TLS key."""
    with (
        open(os.path.join(server.tls_dir, "server.key"), "rb") as key,
        open(os.path.join(server.tls_dir, "server.pem"), "rb") as cert,
    ):
        return minted_sealing_cert(key.read(), cert.read())


def test_a_package_signed_with_what_the_hop_can_mint_is_refused(cloud, tmp_path):
    """The hop signs its package with a sealing certificate it issued with the server's TLS key."""
    server, _, _, forged = cloud
    key, cert = _sealing_cert_minted_with_the_tls_key(server)

    def resign(cs):
        chunks = _package_chunks(forged)
        digests = {c.name: c.sha256 for c in chunks}
        chunks[-1].seal_certificate, chunks[-1].seal_signature = cert, sign(key, package_transcript(b"", digests))
        return chunks

    _refused(cloud, tmp_path, resign, "not signed by the CA this client trusts")


def test_a_replayed_signed_package_is_refused(cloud, tmp_path):
    """The signature covers the client's nonce: the genuine, signed stream of an earlier fetch opens nothing."""
    server, hop, _, _ = cloud
    recorded: list = []
    hop.rewrite = lambda cs: recorded.extend(cs) or cs
    fetch_emulator(_tcfg(server, hop.addr), str(tmp_path / "first"))
    _refused(cloud, tmp_path, lambda cs: recorded, "emulator package signature does not verify")


def test_only_the_signature_stops_the_substitution(cloud, tmp_path, monkeypatch):
    """Control: the forged package passes every other check; skipping the signature check accepts it."""
    server, hop, pkg, forged = cloud
    monkeypatch.setattr(offsite_mod, "check_signed", lambda *a: "skipped")
    hop.rewrite = lambda cs: _package_chunks(forged, *_seal_of(cs))
    try:
        fetch_emulator(_tcfg(server, hop.addr), str(tmp_path / "fetched"))
    finally:
        hop.rewrite = None
    assert load_package(str(tmp_path / "fetched")).manifest == load_package(forged).manifest
    assert load_package(forged).manifest != load_package(pkg).manifest


def _list(transport: Transport, nonce: bytes):
    return transport.call("ListAdapters", offsite_pb2.ListAdaptersRequest(nonce=nonce), kind="ListAdapters")


def test_registry_replies_are_signed_over_the_nonce(cloud):
    server, _, _, _ = cloud
    transport = Transport(_tcfg(server, server.addr), stub=offsite_pb2_grpc.OffsiteTuningStub)
    try:
        nonce = fresh_nonce()
        reply = _list(transport, nonce)
        request = offsite_pb2.ListAdaptersRequest(nonce=nonce)
        assert check_reply(transport, "ListAdapters", request, reply) == "authenticated"
        with pytest.raises(ClientError, match="ListAdapters reply signature does not verify"):
            check_reply(
                transport, "ListAdapters", offsite_pb2.ListAdaptersRequest(nonce=fresh_nonce()), reply
            )  # replayed
        forged = offsite_pb2.ListAdaptersResponse()
        forged.CopyFrom(reply)
        forged.adapters.add(name="mine", sha256="0" * 64)  # what a hop would add to pass `--name mine`
        with pytest.raises(ClientError, match="ListAdapters reply signature does not verify"):
            check_reply(transport, "ListAdapters", request, forged)
        forged.ClearField("seal_signature")
        with pytest.raises(ClientError, match="no ListAdapters reply signature"):
            check_reply(transport, "ListAdapters", request, forged)
        with pytest.raises(ServerError, match="at most 64"):
            _list(transport, b"n" * 65)
    finally:
        transport.close()


def test_a_package_file_changed_on_disk_after_start_fails_the_download(cloud, tmp_path):
    """The server streams from disk with the sizes and digests it measured at start, never an unsigned change."""
    server, _, pkg, _ = cloud
    path = os.path.join(pkg, "config.json")
    original = open(path, "rb").read()
    try:
        open(path, "wb").write(b" " + original[1:])  # same size, other bytes
        with pytest.raises(ClientError, match="SHA-256"):
            fetch_emulator(_tcfg(server, server.addr), str(tmp_path / "fetched"))
        assert os.listdir(tmp_path) == []
    finally:
        open(path, "wb").write(original)


def test_without_a_ca_the_package_is_taken_unauthenticated(cloud, server_factory, tmp_path, tiny_models, caplog):
    """--insecure: no TLS, no CA to check a signature with; the package is taken, and the run says so."""
    _, _, pkg, _ = cloud
    server = server_factory(tiny_models["llama"], "--emulator", pkg, insecure=True)
    with caplog.at_level("WARNING"):
        got = fetch_emulator(server.transport_cfg(insecure=True), str(tmp_path / "fetched"))
    assert got["signature"] == "unauthenticated" and "UNAUTHENTICATED" in caplog.text
    assert load_package(str(tmp_path / "fetched")).manifest == load_package(pkg).manifest


def test_a_hop_that_rewrites_a_push_is_caught(cloud, tiny_models, tmp_path, monkeypatch):
    """The hop makes a private push public under its own name: the server signs what it received, which is not
    what the client sent, so the client refuses the reply (and a reply signed over the rewritten request, were
    the check skipped, is still caught by the client's comparison with what it asked for)."""
    from tandem.client.assemble import build_local
    from tandem.client.offsite import push_adapter
    from tandem.stages.lora import LoraConfig, PeftMeta, save_peft

    server, hop, _, _ = cloud
    staged = build_local(tiny_models["llama"], "2:2", LoraConfig(rank=4, alpha=8), seed=0)
    adapter = str(tmp_path / "run" / "adapter")
    save_peft(staged.adapter, adapter, PeftMeta(staged.model_id))

    def flip(method, raw):
        if not method.endswith("/PushAdapter"):
            return raw
        request = offsite_pb2.PushAdapterRequest.FromString(raw)
        request.public, request.name = True, f"hop-chosen-{len(request.nonce)}"
        return request.SerializeToString()

    hop.on_request = flip
    try:
        with pytest.raises(ClientError, match="PushAdapter reply signature does not verify"):
            push_adapter(_tcfg(server, hop.addr), adapter, name="private-one", public=False)
        monkeypatch.setattr(offsite_mod, "check_reply", lambda *a: "skipped")
        with pytest.raises(ClientError, match=r"registered 'hop-chosen-32' \(public=True\), not what was asked"):
            push_adapter(_tcfg(server, hop.addr), adapter, name="private-two", public=False)
    finally:
        hop.on_request = None
