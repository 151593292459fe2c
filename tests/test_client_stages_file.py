"""The cloud serves the client's stages from a private unlinked file, not from a packed copy in memory.

A packed copy was a second copy of weights the loaded model already holds (965 MiB for a Llama-3.2-1B
shape: the whole excess of the cloud's RSS over weights plus session state). The server now writes
them once to a file only its user can read, unlinks it at once (nothing is left on disk, however the
process ends) and streams downloads from it: the bytes and hash are those of a fresh pack.
"""

from __future__ import annotations

import hashlib
import os
import stat

import grpc
import pytest
import torch

from tandem.cloud.client_stages import STAGES, ClientFiles
from tandem.protos import split_pb2 as pb
from tandem.protos import split_pb2_grpc as pb_grpc
from tandem.stages.arch import parts_of
from tandem.stages.loading import client_state, load_model, pack_state, tokenizer_files
from tandem.stages.modules import StageLayout
from tandem.testing.servers import start_server


def raw_stub(server):
    """A plain gRPC stub on `server` with its 'local' identity (mutual TLS)."""
    from tandem.protos.bundle import read_bundle

    key, cert, ca = read_bundle(server.identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(server.addr, creds)
    return channel, pb_grpc.SplitTuningStub(channel)


def _stages_descriptors(pid: int) -> list[str]:
    """/proc paths of the descriptors of process `pid` open on a client stages file."""
    found = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{n}"
        try:
            if STAGES in os.readlink(path):
                found.append(path)
        except FileNotFoundError:  # closed meanwhile
            pass
    return found


def test_the_server_streams_the_stages_from_a_private_unlinked_file(tiny_models, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the server's temporary files go here
    server = start_server(tiny_models["llama"], tmp_path, "--client-blocks", "2:2")
    try:
        (descriptor,) = _stages_descriptors(server.proc.pid)
        assert os.readlink(descriptor).endswith("(deleted)")  # unlinked: a crash leaves nothing behind
        assert not [d for d in os.listdir(temp) if d.startswith("tandem-stages-")]
        info = os.stat(descriptor)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        with open(descriptor, "rb") as f:
            on_disk = f.read()
        loaded = load_model(tiny_models["llama"])
        fresh = pack_state(client_state(parts_of(loaded.model), StageLayout.parse("2:2", loaded.config)))
        assert on_disk == fresh

        channel, stub = raw_stub(server)
        opened = stub.OpenSession(pb.OpenSessionRequest(lora=pb.LoraSpec(rank=4, alpha=8), codec="float32"), timeout=30)
        assert opened.client_stages_bytes == len(fresh)
        assert opened.client_stages_sha256 == hashlib.sha256(fresh).hexdigest()
        files, first = {}, {}
        for chunk in stub.FetchClientStages(pb.FetchClientStagesRequest(session_id=opened.session_id), timeout=60):
            assert chunk.offset == len(files.get(chunk.name, b""))
            first.setdefault(chunk.name, chunk)
            files[chunk.name] = files.get(chunk.name, b"") + chunk.data
        channel.close()
        assert files == {STAGES: fresh, **tokenizer_files(tiny_models["llama"])}
        for name, blob in files.items():  # the hash on each file's first chunk, its size on every one
            assert first[name].sha256 == hashlib.sha256(blob).hexdigest() and first[name].total_bytes == len(blob)
    finally:
        server.stop()
    assert not os.listdir(temp)


@pytest.fixture
def served(tmp_path):
    state = {"b": torch.arange(3000, dtype=torch.float32), "a": torch.ones(7, 5, dtype=torch.bfloat16)}
    files = ClientFiles(state, {"tokenizer.json": b"{}", "empty.txt": b""}, directory=str(tmp_path))
    yield files, pack_state(state)
    files.close()


def test_chunks_are_a_fresh_pack_in_order_and_nothing_is_left_on_disk(served, tmp_path):
    files, fresh = served
    assert not os.listdir(tmp_path)
    assert files.stages_bytes == len(fresh) and files.stages_sha256 == hashlib.sha256(fresh).hexdigest()
    pieces = list(files.chunks(1000))
    assert [p.name for p in pieces][-2:] == ["tokenizer.json", "empty.txt"]
    assert b"".join(p.data for p in pieces if p.name == STAGES) == fresh
    assert all(len(p.data) <= 1000 and p.total_bytes == len(fresh) for p in pieces if p.name == STAGES)
    assert [p.sha256 != "" for p in pieces] == [p.offset == 0 for p in pieces]
    assert pieces[-1].data == b"" and pieces[-1].sha256 == hashlib.sha256(b"").hexdigest()


def test_reads_never_go_beyond_a_file(served):
    files, fresh = served
    assert files.read(STAGES, len(fresh) - 3, 1 << 20) == fresh[-3:]
    assert files.read(STAGES, len(fresh), 10) == b""
    for offset, length in ((len(fresh) + 1, 1), (-1, 5), (0, -1)):
        with pytest.raises(ValueError, match="cannot read"):
            files.read(STAGES, offset, length)
    with pytest.raises(KeyError):
        files.read("../../etc/passwd", 0, 10)


def test_a_file_changed_under_the_server_fails_the_download(served):
    files, fresh = served
    (descriptor,) = _stages_descriptors(os.getpid())
    with open(descriptor, "r+b") as f:  # only this user can: the file is 0600 and unlinked
        f.truncate(len(fresh) // 2)
    with pytest.raises(RuntimeError, match="changed on disk"):
        list(files.chunks(1 << 20))


def test_after_close_nothing_is_read(served):
    files, _ = served
    files.close()
    files.close()
    assert not _stages_descriptors(os.getpid())
    with pytest.raises(RuntimeError, match="no longer served"):
        files.read(STAGES, 0, 10)
    assert files.read("tokenizer.json", 0, 10) == b"{}"


def test_a_shard_serves_nothing():
    files = ClientFiles(None, {})
    assert files.sizes == {} and list(files.chunks(10)) == []
    assert files.stages_bytes == 0 and files.stages_sha256 == hashlib.sha256(b"").hexdigest()
    files.close()


def test_an_unwritable_place_is_one_clear_error(tmp_path):
    with pytest.raises(OSError, match=r"cannot write the client stages \(0 MiB\) to a private file under .*set TMPDIR"):
        ClientFiles({"a": torch.ones(3)}, {}, directory=str(tmp_path / "missing"))
