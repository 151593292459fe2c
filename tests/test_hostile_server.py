"""Downloads from a hostile cloud: names, sizes, hashes and endless streams never escape or exhaust the client."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

import tandem.client.offsite as offsite_mod
from tandem.client.allowed_files import MAX_DOWNLOAD_BYTES, TOKENIZER_ALLOWANCE
from tandem.client.downloads import CACHE_MANIFEST
from tandem.client.errors import ClientError
from tandem.client.offsite import fetch_emulator
from tandem.client.transport import TransportConfig
from tandem.emulator.build import build_emulator
from tandem.emulator.distill import DistillConfig
from tandem.emulator.package import load_package
from tandem.testing.proxies import HostileProxy, chunk, signed_by_the_cloud, whole_files
from tandem.testing.servers import start_server
from tandem.testing.split_runs import connect_via

STAGES = "client_stages.safetensors"


@pytest.fixture(scope="module")
def cloud(tiny_models, tmp_path_factory):
    """One real server (with an emulator package) behind one hostile proxy; each test sets its rewrite."""
    tmp = tmp_path_factory.mktemp("hostile")
    pkg = str(tmp / "pkg")
    build_emulator(tiny_models["llama"], "2:2", pkg, None, DistillConfig(steps=0), keep=1)
    server = start_server(tiny_models["llama"], tmp, "--emulator", pkg, "--adapter-registry", str(tmp / "reg"))
    proxy = HostileProxy(server)
    yield server, proxy, pkg
    proxy.close()
    server.stop()


@pytest.fixture
def box(cloud, tmp_path, monkeypatch):
    """This test's whole file tree: the client's cache lives two levels down, beside a sentinel file."""
    _, proxy, _ = cloud
    proxy.rewrite, proxy.on_open, proxy.yielded = None, None, 0
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "a" / "cache"))
    (tmp_path / "sentinel").write_text("untouched")
    return tmp_path


def tcfg(cloud, **kw) -> TransportConfig:
    server, proxy, _ = cloud
    return TransportConfig(server=proxy.addr, ca=server.ca, identity=server.identity, retries=0, **kw)


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def connect(cloud, **kw):
    server, proxy, _ = cloud
    return connect_via(proxy.addr, server, **kw)


def _replace(name: str, data: bytes):
    def rw(cs):
        files = whole_files(cs)
        files[name] = data
        return [chunk(n, b) for n, b in files.items()]

    return rw


def _add(name: str, data: bytes = b"print('owned')\n", first: bool = True):
    def rw(cs):
        return [chunk(name, data), *cs] if first else [*cs, chunk(name, data)]

    return rw


def _rename_first(name: str):
    def rw(cs):
        cs[0].name = name
        return cs

    return rw


def _set_first(**fields):
    def rw(cs):
        for k, v in fields.items():
            setattr(cs[0], k, v)
        return cs

    return rw


def _endless(cs):
    """The stages file with its true size declared, then more of it, forever."""
    c = cs[0]
    yield c
    at = len(c.data)
    while True:
        yield chunk(c.name, b"\0" * 4096, offset=at, total=c.total_bytes, sha="")
        at += 4096


def _split_in_two(cs, swap=False, empty_again=False):
    c = cs[0]
    half = len(c.data) // 2
    a = chunk(c.name, c.data[:half], total=c.total_bytes, sha=c.sha256)
    b = chunk(c.name, c.data[half:], offset=half, total=c.total_bytes, sha="")
    if empty_again:
        return [a, *[chunk(c.name, b"", offset=half, total=c.total_bytes, sha="")] * 1000, b, *cs[1:]]
    if swap:  # the later half first, carrying the hash a first chunk carries
        b.sha256 = c.sha256
        return [b, a, *cs[1:]]
    return [a, b, *cs[1:]]


def _interleave(cs):
    c = cs[0]
    half = len(c.data) // 2
    return [
        chunk(c.name, c.data[:half], total=c.total_bytes, sha=c.sha256),
        cs[1],
        chunk(c.name, c.data[half:], offset=half, total=c.total_bytes, sha=""),
        *cs[2:],
    ]


AUTO_MAP = json.dumps(
    {"tokenizer_class": "TokenizersBackend", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
).encode()

# (id, rewrite of the FetchClientStages stream, the error the client must give)
STAGE_CASES = [
    ("traversal", _add("../../../../escape"), "plain name"),
    ("absolute", None, "plain name"),  # filled in with this test's own path
    ("subdir", _add("a/b"), "plain name"),
    ("dotdot", _add(".."), "plain name"),
    ("dot", _add("."), "plain name"),
    ("empty-name", _add(""), "plain name"),
    ("nul", _add("tokenizer.json\0.py"), "plain name"),
    ("backslash", _add("..\\..\\escape"), "plain name"),
    ("complete-marker", _add("complete", b""), "never contain"),
    ("our-manifest", _add(CACHE_MANIFEST, b"{}"), "plain name"),
    ("python-file", _add("tokenization_evil.py"), "never contain"),
    ("renamed-stages", _rename_first("evil.py"), "never contain"),
    ("auto-map", _replace("tokenizer_config.json", AUTO_MAP), "auto_map.*run the server's code"),
    (
        "file-pointer",
        _replace("tokenizer_config.json", json.dumps({"vocab_file": "/etc/passwd"}).encode()),
        "names a file vocab_file",
    ),
    ("wrong-sha", _set_first(sha256="0" * 64), "SHA-256 mismatch"),
    ("missing-sha", _set_first(sha256=""), "without a valid SHA-256"),
    ("malformed-sha", _set_first(sha256="../" * 30), "without a valid SHA-256"),
    ("oversized-total", _set_first(total_bytes=2**50), "at most .* allowed"),
    ("negative-total", _set_first(total_bytes=-1), "at most .* allowed"),
    ("tokenizer-too-big", _set_first(name="tokenizer.json", total_bytes=TOKENIZER_ALLOWANCE + 1), "at most .* allowed"),
    ("endless", _endless, "more of client_stages.safetensors than"),
    ("out-of-order", lambda cs: _split_in_two(cs, swap=True), "out of order"),
    ("empty-chunks", lambda cs: _split_in_two(cs, empty_again=True), "empty chunk"),
    ("interleaved", _interleave, "before finishing"),
    ("truncated", lambda cs: _split_in_two(cs)[:1], "ended inside"),
    ("twice", lambda cs: [*cs, cs[-1]], "twice"),
    ("many-files", lambda cs: [*cs, *[chunk(f"f{i}.json", b"{}") for i in range(100)]], "never contain"),
    ("other-stages", _replace(STAGES, b"not the announced stages"), "do not match the hash the server announced"),
    ("no-tokenizer", lambda cs: [c for c in cs if c.name == STAGES], "no tokenizer"),
    ("deep-json", _replace("tokenizer_config.json", b"[" * 100_000), "not JSON"),
    ("huge-int-json", _replace("tokenizer_config.json", b'{"model_max_length": ' + b"9" * 5000 + b"}"), "not JSON"),
]


def _assert_untouched(box) -> None:
    assert files_under(box) == ["sentinel"], "a refused download left files behind"


@pytest.mark.parametrize("case,rewrite,error", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_hostile_stage_download_is_refused_and_writes_nothing(cloud, box, case, rewrite, error):
    if case == "absolute":
        rewrite = _add(str(box / "abs-escape"))
    cloud[1].rewrite = rewrite
    t0 = time.monotonic()
    with pytest.raises(ClientError, match=error) as e:
        connect(cloud)
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 60
    _assert_untouched(box)


def test_endless_stream_is_cut_off_at_the_declared_size(cloud, box):
    _, proxy, _ = cloud
    proxy.rewrite = _endless
    with pytest.raises(ClientError, match="more of client_stages.safetensors than"):
        connect(cloud)
    time.sleep(1.0)
    sent = proxy.yielded
    time.sleep(1.0)
    assert proxy.yielded == sent < 10_000, "the client stopped the stream, not the server"
    _assert_untouched(box)


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("client_stages_sha256", "../../../../escape", "not a SHA-256"),
        ("client_stages_bytes", 2**50, "announced client stages of"),
        ("client_stages_bytes", 0, "announced client stages of"),
        ("model_config_json", "[" * 100_000, "model configuration"),
        ("model_config_json", '{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}", "model configuration"),
        ("model_config_json", "[1]", "model configuration"),
        ("model_config_json", '{"model_type": "no-such-model"}', "model configuration"),
    ],
)
def test_hostile_session_announcement_is_refused(cloud, box, field, value, error):
    cloud[1].on_open = lambda resp: setattr(resp, field, value)
    with pytest.raises(ClientError, match=error):
        connect(cloud, seal=False)  # sealing would bind the announcement; this checks the download's own guard
    _assert_untouched(box)


def test_honest_download_is_private_and_cached(cloud, box):
    _, proxy, _ = cloud
    proxy.rewrite = lambda cs: cs
    old = os.umask(0o022)  # a library caller's usual umask: the cache is private anyway
    try:
        sm = connect(cloud)
    finally:
        os.umask(old)
    assert proxy.yielded > 0
    for d in (box / "a", box / "a" / "cache", box / "a" / "cache" / "client"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    cache = box / "a" / "cache" / "client" / sm.stages_sha256
    names = set(os.listdir(cache))
    assert names == {STAGES, "tokenizer.json", "tokenizer_config.json", CACHE_MANIFEST}
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert {stat.S_IMODE(os.stat(cache / n).st_mode) for n in names} == {0o600}
    assert set(json.loads((cache / CACHE_MANIFEST).read_text())) == names - {CACHE_MANIFEST}
    assert [n for n in os.listdir(cache.parent) if n != sm.stages_sha256] == [], "no staging directory left"
    proxy.yielded = 0
    connect(cloud)
    assert proxy.yielded == 0, "a verified cache is used without downloading"


def test_altered_cache_is_not_trusted(cloud, box):
    """A cached file that no longer matches its recorded hash, or a file the record does not list, is never read."""
    _, proxy, _ = cloud
    proxy.rewrite = lambda cs: cs
    sm = connect(cloud)
    cache = box / "a" / "cache" / "client" / sm.stages_sha256
    honest = (cache / "tokenizer_config.json").read_bytes()
    (cache / "tokenizer_config.json").write_bytes(AUTO_MAP)
    (cache / "tokenization_evil.py").write_text("raise SystemExit('owned')\n")
    proxy.yielded = 0
    connect(cloud)
    assert proxy.yielded > 0, "the altered cache was downloaded again"
    assert (cache / "tokenizer_config.json").read_bytes() == honest
    assert not (cache / "tokenization_evil.py").exists()
    # A cache from before the hash record (an empty `complete` marker) is downloaded again too.
    os.remove(cache / CACHE_MANIFEST)
    (cache / "complete").write_bytes(b"")
    proxy.yielded = 0
    connect(cloud)
    assert proxy.yielded > 0 and not (cache / "complete").exists()


def _emu_add(name: str, data: bytes = b"print('owned')\n"):
    return lambda cs: [chunk(name, data), *cs]


def _emu_replace(name: str, fn):
    def rw(cs):
        files = whole_files(cs)
        files[name] = fn(files[name])
        return [chunk(n, b) for n, b in files.items()]

    return rw


def _resigned(tls_dir: str, rewrite):
    return lambda cs: signed_by_the_cloud(tls_dir, NONCE, rewrite(cs))


def _with_auto_map(config: bytes) -> bytes:
    d = json.loads(config)
    d["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilTokenizer", None]}
    return json.dumps(d).encode()


def _emu_endless(cs):
    yield from cs[:-1]
    c = cs[-1]
    yield c
    at = len(c.data)
    while True:  # more of the manifest than it declared, forever
        yield chunk(c.name, b" " * 4096, offset=at, total=c.total_bytes, sha="")
        at += 4096


EMULATOR_CASES = [
    ("traversal", _emu_add("../../../escape"), "plain name"),
    ("absolute", None, "plain name"),
    ("python-file", _emu_add("modeling_evil.py"), "never contain"),
    ("auto-map", _emu_replace("config.json", _with_auto_map), "auto_map"),
    ("wrong-sha", _set_first(sha256="f" * 64), "SHA-256 mismatch"),
    ("missing-sha", _set_first(sha256=""), "without a valid SHA-256"),
    ("oversized-total", _set_first(total_bytes=2**45), "at most .* allowed"),
    ("endless", _emu_endless, "more of manifest.json than"),
    ("out-of-order", lambda cs: _split_in_two(cs, swap=True), "out of order"),
    ("unlisted-file", lambda cs: [chunk("sink.safetensors", b"x"), *cs], "signature does not verify"),
    ("no-manifest", lambda cs: cs[:-1], "no manifest"),
    (
        "altered-file",
        _emu_replace("config.json", lambda b: b.replace(b"}", b' , "x": 1}', 1)),
        "no emulator package signature",
    ),
    # the same two from the cloud itself, which signs them: the client's own checks refuse them
    ("cloud-unlisted-file", lambda cs: [chunk("sink.safetensors", b"x"), *cs], "its manifest does not list"),
    ("cloud-altered-file", _emu_replace("config.json", lambda b: b.replace(b"}", b' , "x": 1}', 1)), "SHA-256"),
]
NONCE = b"n" * 32  # the client's nonce when the cloud itself re-signs


@pytest.mark.parametrize("case,rewrite,error", EMULATOR_CASES, ids=[c[0] for c in EMULATOR_CASES])
def test_hostile_emulator_download_is_refused_and_writes_nothing(cloud, box, case, rewrite, error, monkeypatch):
    if case == "absolute":
        rewrite = _emu_add(str(box / "abs-escape"))
    if case.startswith("cloud-"):
        monkeypatch.setattr(offsite_mod, "fresh_nonce", lambda: NONCE)
        rewrite = _resigned(cloud[0].tls_dir, rewrite)
    cloud[1].rewrite = rewrite
    with pytest.raises(ClientError, match=error) as e:
        fetch_emulator(tcfg(cloud), str(box / "a" / "pkgs" / "fetched"))
    assert "\n" not in str(e.value)
    _assert_untouched(box)


def test_refused_emulator_download_keeps_the_previous_package(cloud, box):
    _, proxy, pkg = cloud
    out = str(box / "a" / "fetched")
    proxy.rewrite = lambda cs: cs
    got = fetch_emulator(tcfg(cloud), out)
    assert got["files"] == len(load_package(pkg).manifest["files"]) + 1
    assert load_package(out).manifest == load_package(pkg).manifest
    before = files_under(box)
    proxy.rewrite = _emu_add("../escape")
    with pytest.raises(ClientError, match="plain name"):
        fetch_emulator(tcfg(cloud), out)
    assert files_under(box) == before
    assert load_package(out).manifest == load_package(pkg).manifest


def test_emulator_size_limit_is_the_callers(cloud, box):
    cloud[1].rewrite = lambda cs: cs
    with pytest.raises(ClientError, match="1000"):
        fetch_emulator(tcfg(cloud), str(box / "a" / "fetched"), max_bytes=1000)
    _assert_untouched(box)
    assert MAX_DOWNLOAD_BYTES >= 2**30
