"""The files a split session downloads (stages and tokenizer) are the ones the signed handshake names.

A TLS-terminating hop holds the server's TLS key, so it can rewrite the FetchClientStages stream;
only the stages' hash used to be signed (OpenSession), so it could hand the client a tokenizer of
its own (its choice of token ids for every text), and that tokenizer stayed in the cache for later
direct runs. The handshake now signs a digest of every file's name and SHA-256.
"""

from __future__ import annotations

import json
import os

import pytest

from tandem.client.downloads import CACHE_MANIFEST
from tandem.client.errors import ClientError
from tandem.testing.proxies import HostileProxy, chunk, whole_files
from tandem.testing.servers import start_server
from tandem.testing.split_runs import connect_via


@pytest.fixture(scope="module")
def cloud(tiny_models, tmp_path_factory):
    server = start_server(tiny_models["llama"], tmp_path_factory.mktemp("signed-downloads"))
    hop = HostileProxy(server)  # the server's TLS key and a client identity: a load balancer
    yield server, hop
    hop.close()
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "client"


def _swapped_vocab(data: bytes) -> bytes:
    """The same tokenizer with the ids of 'a' and 'e' exchanged: it loads, and means other text."""
    doc = json.loads(data)
    vocab = doc["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    return json.dumps(doc).encode()


def _swap_tokenizer(cs):
    files = whole_files(cs)
    files["tokenizer.json"] = _swapped_vocab(files["tokenizer.json"])
    return [chunk(n, b) for n, b in files.items()]


def test_a_hop_cannot_substitute_the_tokenizer(cloud, cache):
    server, hop = cloud
    honest = connect_via(server.addr, server).tokenizer.convert_tokens_to_ids("a")
    for d in os.listdir(cache):  # download again, through the hop
        os.rename(cache / d, cache.parent / f"away-{d}")
    hop.rewrite = _swap_tokenizer
    try:
        with pytest.raises(ClientError, match="files the server's signed handshake names") as ei:
            connect_via(hop.addr, server)
    finally:
        hop.rewrite = None
    assert "\n" not in str(ei.value)
    assert os.listdir(cache) == [], "the substituted tokenizer was not cached"
    assert connect_via(hop.addr, server).tokenizer.convert_tokens_to_ids("a") == honest


def test_a_cached_tokenizer_from_another_server_is_not_used(cloud, cache):
    """A cache entry is keyed by the stages' hash; a tokenizer recorded beside them must be the signed one too."""
    server, _ = cloud
    sm = connect_via(server.addr, server)
    honest = sm.tokenizer.convert_tokens_to_ids("a")
    d = cache / sm.stages_sha256
    # What a hostile cloud serving the same (public) stages with its own tokenizer leaves behind: a consistent record.
    swapped = _swapped_vocab((d / "tokenizer.json").read_bytes())
    (d / "tokenizer.json").write_bytes(swapped)
    record = json.loads((d / CACHE_MANIFEST).read_text())
    record["tokenizer.json"] = __import__("hashlib").sha256(swapped).hexdigest()
    (d / CACHE_MANIFEST).write_text(json.dumps(record))
    again = connect_via(server.addr, server)
    assert again.tokenizer.convert_tokens_to_ids("a") == honest
    assert (d / "tokenizer.json").read_bytes() != swapped, "downloaded again over the foreign entry"


def test_a_planted_fifo_in_the_cache_is_not_read(cloud, cache):
    """A cache entry whose listed file is a FIFO (planted by whoever can write the cache; a link to /dev/zero is
    refused the same way: only regular files, never followed links) is downloaded again, not waited on forever."""
    import threading

    server, _ = cloud
    sm = connect_via(server.addr, server)
    d = cache / sm.stages_sha256
    os.remove(d / "tokenizer_config.json")
    os.mkfifo(d / "tokenizer_config.json")
    done = []
    th = threading.Thread(target=lambda: done.append(connect_via(server.addr, server)), daemon=True)
    th.start()
    th.join(30)
    hung = th.is_alive()
    if hung:  # unblock the reader stuck on the FIFO before failing
        with open(d / "tokenizer_config.json", "wb"):
            pass
        th.join(30)
    assert not hung, "the client waited on a planted FIFO"
    assert done and (d / "tokenizer_config.json").is_file()
