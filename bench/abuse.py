"""Abuse benchmark: a real `cloud serve` (mutual TLS, loopback only) under a fuzzer, vanishing clients and a crowd.

Run: .venv/bin/python bench/abuse.py [--quick] [--scenarios fuzz,vanish,crowd] [--fuzz-n 10000] ...

One server process (a tiny random Llama made here, --hidden wide) serves all three scenarios in turn; every
byte goes to 127.0.0.1. Each scenario is bounded in count and in time (--scenario-timeout).

fuzz    --fuzz-n malformed messages spread over every RPC the server offers (SplitTuning: GetInfo, OpenSession,
        FetchClientStages, Forward, Backward, CloseSession, GetRemoteState, PutRemoteState; OffsiteTuning:
        FetchEmulator, PushAdapter, ListAdapters; AdapterServing: Generate): random bytes, random field values,
        oversized and overflowing shapes, NaN and infinities, unknown codecs and dtypes, unknown and foreign
        session ids, huge strings, and malformed requests inside sessions the fuzzer opened itself. Meanwhile
        a legitimate client trains (sealed, its own identity). Reported: crashes and hangs (0), UNKNOWN
        statuses (0), the status-code histogram, the largest |legitimate loss - undisturbed loss| (the
        undisturbed reference runs first, on the same server), and the server's RSS at start (after the
        reference run and one legitimate Generate), at its peak and after the fuzzer's sessions expired
        (--session-ttl). The fuzzer runs in two rounds of N/2 with the TTL waited out after each: RSS that
        grows again in the second round would be a leak (rss_stable), RSS above the start is rss_back.
vanish  --vanish-clients clients each open a session, send a training Forward and vanish mid-step (the channel
        dropped while the Forward is in flight, dropped after it, or the client process SIGKILLed), in
        --vanish-waves waves; RSS at start, after each wave and after the TTL.
crowd   --crowd-clients clients train concurrently next to one whose batch (--big-batch x --big-seq tokens)
        is above the server's --batch-max-tokens but within its --max-tokens-per-step; all must finish.

Writes bench/out/abuse.json (or --out) and prints a table. Exits 1 when a pass/fail field failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

from tandem.testing.bench_cli import bench_parser, offline_hub, out_path

offline_hub()

FUZZ_IDENTITY, VANISH_IDENTITY = "fuzzer", "vanisher"
INT64 = (-(2**63), 2**63 - 1)
SPLIT, OFFSITE, SERVING = "tandem.v1.SplitTuning", "tandem.v1.OffsiteTuning", "tandem.v1.AdapterServing"
RPCS = (
    [
        (SPLIT, m)
        for m in (
            "GetInfo",
            "OpenSession",
            "FetchClientStages",
            "Forward",
            "Backward",
            "CloseSession",
            "GetRemoteState",
            "PutRemoteState",
        )
    ]
    + [(OFFSITE, m) for m in ("FetchEmulator", "PushAdapter", "ListAdapters")]
    + [(SERVING, "Generate")]
)
STREAMING = {"FetchClientStages", "FetchEmulator"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
RSS_MARGIN = 0.10  # RSS after the TTL must be within this fraction of the start


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = bench_parser(__file__, __doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small counts for CI (under a minute on 2 cores): overrides the size flags below unless given",
    )
    p.add_argument(
        "--scenarios", default="fuzz,vanish,crowd", help="comma-separated subset of fuzz,vanish,crowd; default all"
    )
    p.add_argument(
        "--out", default=out_path(__file__, "abuse.json"), help="JSON results file; default bench/out/abuse.json"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzzer and of the legitimate clients; default 0")
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size of the random model (6 Llama blocks); default 64, quick 32",
    )
    p.add_argument(
        "--session-ttl", type=float, default=None, help="the server's --session-ttl in seconds; default 6, quick 2"
    )
    p.add_argument(
        "--scenario-timeout",
        type=float,
        default=None,
        help="seconds a scenario may run before it is stopped and failed; default 1800, quick 60",
    )
    p.add_argument(
        "--fuzz-n", type=int, default=None, help="malformed messages the fuzzer sends; default 10000, quick 300"
    )
    p.add_argument("--fuzz-workers", type=int, default=4, help="fuzzer threads sending at once; default 4")
    p.add_argument(
        "--fuzz-rpcs",
        default="",
        help="comma-separated RPC names to fuzz (e.g. Forward,Generate); default every RPC the server offers",
    )
    p.add_argument(
        "--fuzz-max-bytes",
        type=int,
        default=1 << 20,
        help="largest random string/bytes/tensor payload in one fuzz message; default 1 MiB",
    )
    p.add_argument(
        "--legit-steps",
        type=int,
        default=None,
        help="steps of one legitimate run (repeated while the fuzzer runs); default 20, quick 4",
    )
    p.add_argument("--vanish-clients", type=int, default=None, help="clients per vanish wave; default 64, quick 8")
    p.add_argument("--vanish-waves", type=int, default=2, help="vanish waves; default 2")
    p.add_argument(
        "--vanish-procs",
        type=int,
        default=None,
        help="of each wave's clients, how many are separate processes SIGKILLed mid-Forward (the rest are "
        "threads that drop their channel); default 8, quick 1",
    )
    p.add_argument(
        "--vanish-tokens",
        type=int,
        nargs=2,
        default=(16, 256),
        metavar=("BATCH", "SEQ"),
        help="shape of a vanishing client's training Forward; default 16 256",
    )
    p.add_argument(
        "--crowd-clients", type=int, default=None, help="concurrent normal clients in the crowd; default 16, quick 3"
    )
    p.add_argument("--crowd-steps", type=int, default=None, help="steps of each crowd client; default 8, quick 2")
    p.add_argument("--big-batch", type=int, default=16, help="the oversized client's batch; default 16")
    p.add_argument("--big-seq", type=int, default=128, help="the oversized client's sequence length; default 128")
    p.add_argument(
        "--batch-max-tokens",
        type=int,
        default=1024,
        help="the server's --batch-max-tokens (the oversized batch is above it); default 1024",
    )
    p.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=8192,
        help="the server's --max-tokens-per-step (the oversized batch is within it); default 8192",
    )
    p.add_argument(
        "--malloc-arena-max",
        type=int,
        default=0,
        help="run the server with MALLOC_ARENA_MAX=N (glibc's per-thread malloc arenas); default 0: glibc's "
        "own limit (8 per core). After fuzzing with large payloads the RSS stays above its start with "
        "nothing held; fewer arenas strand less of it",
    )
    p.add_argument("--_vanisher", nargs=4, help=argparse.SUPPRESS)  # internal: one vanishing client process
    a = p.parse_args(argv)
    full = {
        "hidden": 64,
        "session_ttl": 6.0,
        "scenario_timeout": 1800.0,
        "fuzz_n": 10000,
        "legit_steps": 20,
        "vanish_clients": 64,
        "vanish_procs": 8,
        "crowd_clients": 16,
        "crowd_steps": 8,
    }
    quick = {
        "hidden": 32,
        "session_ttl": 2.0,
        "scenario_timeout": 60.0,
        "fuzz_n": 300,
        "legit_steps": 4,
        "vanish_clients": 8,
        "vanish_procs": 1,
        "crowd_clients": 3,
        "crowd_steps": 2,
    }
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    names = [m for _, m in RPCS]
    a.fuzz_rpcs = [r for r in a.fuzz_rpcs.split(",") if r] or names
    if set(a.fuzz_rpcs) - set(names):
        p.error(f"unknown --fuzz-rpcs {sorted(set(a.fuzz_rpcs) - set(names))}; choose from {', '.join(names)}")
    bad = set(a.scenarios) - {"fuzz", "vanish", "crowd"}
    if bad:
        p.error(f"unknown scenarios {sorted(bad)}; choose from fuzz, vanish, crowd")
    if a.big_batch * a.big_seq <= a.batch_max_tokens or a.big_batch * a.big_seq > a.max_tokens_per_step:
        p.error("--big-batch x --big-seq must be above --batch-max-tokens and at most --max-tokens-per-step")
    if a.vanish_procs > a.vanish_clients:
        p.error("--vanish-procs must be at most --vanish-clients")
    return a


# The server and its memory -------------------------------------------------------------------------------------------
def make_model(out_dir: str, hidden: int) -> str:
    """A random 6-block Llama of width `hidden` with the tests' small tokenizer (tandem.testing.models)."""
    from tandem.testing import models

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    return models.make_model("llama", out_dir, hidden=hidden, positions=512)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status memory field in MiB (VmRSS now, VmHWM the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssPeak:
    """Samples a process's RSS every 50 ms in a thread; `.peak` is the largest seen since `start()`."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return
            self._stop.wait(0.05)

    def __enter__(self):
        self.peak = rss_mib(self.pid)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def wait_expired(env, ttl: float) -> float:
    """Waits out the TTL, lets the server sweep (an OpenSession expires idle sessions first), returns RSS in MiB."""
    from tandem.client.session import open_session
    from tandem.client.transport import Transport
    from tandem.stages.lora import LoraConfig

    time.sleep(ttl + 1.0)
    t = Transport(env["server"].transport_cfg(seal=False))
    try:
        s = open_session(t, LoraConfig(rank=4, alpha=8))
        from tandem.protos import split_pb2 as pb

        t.call("CloseSession", pb.CloseSessionRequest(session_id=s.id), retry=False)
    finally:
        t.close()
    time.sleep(0.5)
    return rss_mib(env["server"].proc.pid)


def held(env) -> dict:
    """What the server says it holds (its Prometheus metrics): open sessions and forward state bytes."""
    from tandem.testing.servers import metric

    return {
        "sessions": metric(env["mport"], "tandem_sessions"),
        "forward_state_bytes": metric(env["mport"], "tandem_forward_state_bytes"),
    }


def raw_channel(env, identity: str):
    """A mutual-TLS channel as `identity` that sends bytes as they are (no client-library checks)."""
    import grpc

    from tandem.protos.bundle import read_bundle

    key, cert, ca = read_bundle(os.path.join(env["tls"], "clients", identity + ".pem"))
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(env["server"].addr, creds, options=CHANNEL_OPTIONS)


def call_raw(ch, service: str, method: str, body: bytes, timeout: float):
    """One call with a raw body; returns (status name, tandem-reason or '', details)."""
    import grpc

    path = f"/{service}/{method}"
    try:
        if method in STREAMING:
            for _ in ch.unary_stream(path, request_serializer=None, response_deserializer=None)(body, timeout=timeout):
                pass
        else:
            ch.unary_unary(path, request_serializer=None, response_deserializer=None)(body, timeout=timeout)
        return "OK", "", ""
    except grpc.RpcError as e:
        reason = next((v for k, v in (e.trailing_metadata() or ()) if k == "tandem-reason"), "")
        return e.code().name, reason, (e.details() or "")[:300]


# Legitimate training -------------------------------------------------------------------------------------------------
def legit_losses(tcfg, data: str, seed: int, steps: int, seq_len: int = 24, batch: int = 2) -> list[float]:
    """A real split run (sealed, remote LoRA; tandem.testing.split_runs): the per-step losses."""
    from tandem.testing.split_runs import split_losses

    return split_losses(tcfg, data, seed, steps, seq_len=seq_len, batch=batch)


# Fuzz ----------------------------------------------------------------------------------------------------------------
class Fuzzer:
    """Builds malformed requests. `sessions` are ids the fuzzer opened itself (deeper code paths run for them)."""

    def __init__(self, rng: random.Random, max_bytes: int, hidden: int):
        from tandem.protos import offsite_pb2, serving_pb2
        from tandem.protos import split_pb2 as pb

        self.rng, self.max_bytes, self.hidden = rng, max_bytes, hidden
        self.pb, self.opb, self.spb = pb, offsite_pb2, serving_pb2
        self.sessions: list[str] = []

    # Field values
    def blob(self) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 7, 64, 1024, r.randrange(self.max_bytes + 1)])
        return r.randbytes(n)

    def text(self) -> str:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            return ""
        if kind == 1:
            return "x" * r.randrange(self.max_bytes + 1)  # huge
        if kind == 2:
            return (
                "".join(chr(r.randrange(1, 0x2FFFF)) for _ in range(r.randrange(64)))
                .encode("utf-8", "replace")
                .decode("utf-8", "replace")
            )
        if kind == 3:
            return "../../etc/passwd\x00" + "A" * r.randrange(300)
        if kind == 4 and self.sessions:
            return r.choice(self.sessions)
        if kind == 5:
            return r.choice(
                ["q_proj", "v_proj", "c_attn", "model.layers.2.self_attn.q_proj", "llama", "float32", "int4"]
            )
        return r.randbytes(r.randrange(48)).hex()

    def int64(self) -> int:
        r = self.rng
        return r.choice([0, -1, 1, 2**31 - 1, -(2**31), 2**62, INT64[0], INT64[1], r.randint(*INT64), r.randrange(100)])

    def int32(self) -> int:
        return max(-(2**31), min(2**31 - 1, self.int64()))

    def uint64(self) -> int:
        return self.int64() % 2**64

    def real(self) -> float:
        r = self.rng
        return r.choice(
            [
                0.0,
                -1.0,
                1e-3,
                1e38,
                -1e38,
                3.4e39,
                float("nan"),
                float("inf"),
                -float("inf"),
                5e-324,
                r.uniform(-10, 10),
            ]
        )

    def floats(self, n: int, bad: bool) -> bytes:
        """n float32 values (a random block repeated); `bad`: a tenth of them NaN, infinite or huge."""
        k = min(n, 4096)
        if k == 0:
            return b""
        vals = [self.rng.gauss(0, 1) for _ in range(k)]
        for _ in range(k // 10 + 1 if bad else 0):
            vals[self.rng.randrange(k)] = self.rng.choice([float("nan"), float("inf"), -float("inf"), 3e38])
        block = struct.pack(f"<{k}f", *vals)
        reps, rem = divmod(n, k)
        return block * reps + block[: 4 * rem]

    def shape(self) -> list[int]:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return [r.randrange(1, 5), r.randrange(1, 40), self.hidden]  # plausible
        if kind == 1:
            return [2**31, 2**31, 2**31]  # overflowing element count
        if kind == 2:
            return [0, INT64[1], 8]  # zero elements, overflowing bytes
        if kind == 3:
            return [-1, 4, self.hidden]
        if kind == 4:
            return [1] * r.randrange(9, 40)  # too many dims
        return [self.int64() for _ in range(r.randrange(5))]

    def tensor(self):
        r, pb = self.rng, self.pb
        t = pb.Tensor(
            shape=self.shape(),
            dtype=r.choice([0, 1, 2, 3, 4, 5, 6, 99, -5]),
            codec=r.choice([0, 1, 2, 3, 4, 7, -1]),
            block_size=self.int32(),
            sealed=r.random() < 0.2,
        )
        n = math.prod(t.shape) if all(0 <= d <= self.max_bytes for d in t.shape) else -1
        n = n if 0 < n <= self.max_bytes // 4 else r.randrange(1024)  # the declared size when it is affordable
        t.data = self.floats(n, bad=r.random() < 0.5) if r.random() < 0.7 else self.blob()
        if r.random() < 0.3:
            t.scales = self.blob()
        if r.random() < 0.2:
            t.counter, t.scales_counter = self.uint64(), self.uint64()
        return t

    def sid(self) -> str:
        r = self.rng
        if self.sessions and r.random() < 0.6:
            return r.choice(self.sessions)
        return self.text()

    # Requests
    def request(self, method: str) -> bytes:
        r = self.rng
        if r.random() < 0.15:  # not even a protobuf (or a truncated one)
            return r.randbytes(r.randrange(1, 2048))
        msg = getattr(self, "_" + method)()
        data = msg.SerializeToString()
        if r.random() < 0.05 and data:  # truncated
            data = data[: r.randrange(len(data))]
        return data

    def _GetInfo(self):
        return self.pb.GetInfoRequest()

    def _OpenSession(self):
        r, pb = self.rng, self.pb
        req = pb.OpenSessionRequest(
            model_id=r.choice(["", self.text()]),
            remote_lora=r.random() < 0.7,
            codec=r.choice(["float32", "int4", "int8", "", self.text()]),
            gradient_codec=r.choice(["", "float16", self.text()]),
            lora_codec=r.choice(["", "float32", "bfloat16", self.text()]),
            seal_public_key=r.choice([b"", r.randbytes(32), self.blob()]),
        )
        req.lora.CopyFrom(
            pb.LoraSpec(
                rank=r.choice([0, -3, 1, 4, 257, 2**31 - 1, self.int32()]),
                alpha=self.real(),
                dropout=self.real(),
                target_modules=[self.text() for _ in range(r.choice([0, 1, 2, 17, 200]))],
            )
        )
        if r.random() < 0.4:
            req.cloud_optimizer.CopyFrom(
                pb.AdamW(
                    lr=self.real(), beta1=self.real(), beta2=self.real(), eps=self.real(), weight_decay=self.real()
                )
            )
        return req

    def _FetchClientStages(self):
        return self.pb.FetchClientStagesRequest(session_id=self.sid())

    def _Forward(self):
        r, pb = self.rng, self.pb
        req = pb.ForwardRequest(
            session_id=self.sid(),
            step=self.int64(),
            lora_version=self.int64(),
            dropout_seed=self.uint64(),
            train=r.random() < 0.6,
            hidden=self.tensor(),
            attention_mask=self.tensor(),
        )
        if r.random() < 0.5:
            req.lora.CopyFrom(self.tensor())
        return req

    def _Backward(self):
        return self.pb.BackwardRequest(session_id=self.sid(), step=self.int64(), grad_output=self.tensor())

    def _CloseSession(self):
        # Never closes the fuzzer's own sessions (they keep the deep paths open); a random id otherwise.
        return self.pb.CloseSessionRequest(session_id=self.text() if self.rng.random() < 0.8 else "")

    def _GetRemoteState(self):
        return self.pb.GetRemoteStateRequest(session_id=self.sid(), step=self.int64())

    def _PutRemoteState(self):
        return self.pb.RemoteState(
            session_id=self.sid(),
            step=self.int64(),
            lora=self.tensor(),
            exp_avg=self.tensor(),
            exp_avg_sq=self.tensor(),
            optimizer_steps=self.int64(),
            lora_version=self.int64(),
        )

    def _FetchEmulator(self):
        return self.opb.FetchEmulatorRequest()

    def _PushAdapter(self):
        r = self.rng
        files = [
            self.opb.AdapterFile(
                name=r.choice(["adapter_config.json", "adapter_model.safetensors", self.text()]),
                data=r.choice([self.blob(), b"{}", b'{"peft_type": "LORA", "r": -1}']),
                sha256=r.choice(["", self.text(), "0" * 64]),
            )
            for _ in range(r.choice([0, 1, 2, 3, 50]))
        ]
        return self.opb.PushAdapterRequest(name=r.choice(["", self.text()]), files=files, public=r.random() < 0.5)

    def _ListAdapters(self):
        return self.opb.ListAdaptersRequest()

    def _Generate(self):
        r = self.rng
        prompts = [r.choice(["", "the quick brown fox", self.text()]) for _ in range(r.choice([0, 1, 2, 33, 1000]))]
        return self.spb.GenerateRequest(
            adapter=r.choice(["", self.text()]),
            prompts=prompts,
            max_new_tokens=r.choice([0, -1, 1, 2**31 - 1, self.int32()]),
            temperature=self.real(),
            seed=self.uint64(),
        )


def open_fuzz_sessions(ch, n: int, rng: random.Random) -> list[str]:
    """Real sessions of the fuzzer's own (plain, cloud optimizer), so malformed requests reach the deep paths."""
    from tandem.protos import split_pb2 as pb

    sids = []
    for i in range(n):
        req = pb.OpenSessionRequest(
            lora=pb.LoraSpec(rank=4, alpha=8), remote_lora=True, codec=["float32", "int8"][i % 2]
        )
        if i % 2:
            req.cloud_optimizer.CopyFrom(pb.AdamW(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8))
        resp = pb.OpenSessionResponse.FromString(call_ok(ch, SPLIT, "OpenSession", req.SerializeToString()))
        sids.append(resp.session_id)
    return sids


def call_ok(ch, service, method, body):
    return ch.unary_unary(f"/{service}/{method}", request_serializer=None, response_deserializer=None)(body, timeout=60)


def warm_up_generate(env) -> None:
    """One legitimate Generate (base model, a few prompts) before the start RSS is taken."""
    from tandem.protos import serving_pb2 as spb

    ch = raw_channel(env, FUZZ_IDENTITY)
    try:
        call_ok(
            ch,
            SERVING,
            "Generate",
            spb.GenerateRequest(prompts=["the quick brown fox"] * 4, max_new_tokens=8).SerializeToString(),
        )
    finally:
        ch.close()


def run_fuzz(env, a) -> dict:
    import grpc

    server = env["server"]
    pid = server.proc.pid
    t0 = time.monotonic()
    ref = legit_losses(server.transport_cfg(), env["data"], a.seed, a.legit_steps)  # undisturbed, same server
    warm_up_generate(env)  # its first use initializes what every later Generate reuses: not the fuzzer's doing
    rss_start = wait_expired(env, a.session_ttl)
    codes, reasons, examples, per_rpc = Counter(), Counter(), {}, Counter()
    hangs, sent, lock = [], [0], threading.Lock()
    diffs, legit_runs, legit_err, stop = [], [0], [], threading.Event()

    def legit():
        while not stop.is_set():
            try:
                got = legit_losses(server.transport_cfg(), env["data"], a.seed, a.legit_steps)
            except Exception as e:  # noqa: BLE001  (reported, not raised: the run must finish and say so)
                legit_err.append(f"{type(e).__name__}: {e}"[:300])
                return
            diffs.append(max(abs(x - y) for x, y in zip(got, ref)))
            legit_runs[0] += 1

    rpcs = [(sv, m) for sv, m in RPCS if m in a.fuzz_rpcs]

    def worker(i: int, n: int):
        rng = random.Random(a.seed * 1000 + i)  # i: worker and round
        ch = raw_channel(env, FUZZ_IDENTITY)
        fz = Fuzzer(rng, a.fuzz_max_bytes, a.hidden)
        try:
            fz.sessions = open_fuzz_sessions(ch, 2, rng)
        except grpc.RpcError as e:
            legit_err.append(f"fuzzer could not open its sessions: {e.code().name} {e.details()}")
        for k in range(n):
            if time.monotonic() - t0 > a.scenario_timeout:
                break
            service, method = rpcs[k % len(rpcs)] if k < len(rpcs) else rng.choice(rpcs)  # each at least once
            code, reason, details = call_raw(ch, service, method, fz.request(method), timeout=60)
            with lock:
                sent[0] += 1
                codes[code] += 1
                per_rpc[(method, code)] += 1
                if reason:
                    reasons[reason] += 1
                key = f"{method} {code} {reason}"
                if key not in examples:
                    examples[key] = details
                if code == "DEADLINE_EXCEEDED":
                    hangs.append(f"{method}: {details}")
        ch.close()

    legit_t = threading.Thread(target=legit)
    with RssPeak(pid) as peak:
        legit_t.start()
        # Two rounds of N/2, the TTL waited out after each: memory that grows again in the second round is a
        # leak; memory the first round left that the second reuses is the allocator's (fragmentation, caches).
        rss_rounds = []
        for rnd in range(2):
            n_round = a.fuzz_n // 2 + (a.fuzz_n % 2 if rnd else 0)
            per = [
                n_round // a.fuzz_workers + (1 if i < n_round % a.fuzz_workers else 0) for i in range(a.fuzz_workers)
            ]
            ws = [threading.Thread(target=worker, args=(100 * rnd + i, n)) for i, n in enumerate(per)]
            for w in ws:
                w.start()
            for w in ws:
                w.join()
            if rnd == 1:
                stop.set()
                legit_t.join()
            if server.proc.poll() is not None:
                break
            rss_rounds.append(wait_expired(env, a.session_ttl))  # round 1: the legitimate client still trains
    alive = server.proc.poll() is None
    rss_after = rss_rounds[-1] if alive else float("nan")
    internal = {k: v for k, v in examples.items() if k.split(" ")[1] in ("INTERNAL", "UNKNOWN")}
    undecodable = sum(v for (m, c), v in per_rpc.items() if c == "INTERNAL") - reasons.get("internal", 0)
    res = {
        "n": sent[0],
        "wall_s": time.monotonic() - t0,
        "server_alive": alive,
        "crashes": 0 if alive else 1,
        "hangs": len(hangs),
        "hang_examples": hangs[:5],
        "unknown": codes.get("UNKNOWN", 0),
        "internal_bugs": reasons.get("internal", 0),  # INTERNAL with tandem-reason 'internal': a server bug caught
        "internal_undecodable": undecodable,  # INTERNAL from gRPC itself: a body that is not the request message
        "held_after": held(env) if alive else None,
        "status_histogram": dict(codes.most_common()),
        "reason_histogram": dict(reasons.most_common()),
        "per_rpc": {f"{m} {c}": v for (m, c), v in sorted(per_rpc.items())},
        "internal_examples": internal,
        "examples": examples,
        "legit_runs": legit_runs[0],
        "legit_errors": legit_err,
        "reference_losses": ref,
        "max_loss_diff": max(diffs) if diffs else float("nan"),
        "rss_mib": {
            "start": rss_start,
            "peak": peak.peak,
            "after_round_1": rss_rounds[0] if rss_rounds else None,
            "after": rss_after,
            "hwm": rss_mib(pid, "VmHWM") if alive else None,
        },
    }
    res["pass"] = {
        "no_crash": alive,
        "no_hang": not hangs,
        "no_unknown": res["unknown"] == 0,
        "legit_identical": bool(diffs) and not legit_err and res["max_loss_diff"] <= 1e-6,
        "rss_back": alive and rss_after <= rss_start * (1 + RSS_MARGIN),
        "rss_stable": alive and len(rss_rounds) == 2 and rss_rounds[1] <= rss_rounds[0] * (1 + RSS_MARGIN),
    }
    return res


# Vanish --------------------------------------------------------------------------------------------------------------
def vanish_request(session: str, hidden: int, batch: int, seq: int, lora_n: int) -> bytes:
    """A serialized training Forward of (batch, seq, hidden) constant activations with the session's remote LoRA."""
    from tandem.protos import split_pb2 as pb

    h = pb.Tensor(shape=[batch, seq, hidden], dtype=pb.FLOAT32, data=struct.pack("<f", 0.5) * (batch * seq * hidden))
    mask = pb.Tensor(shape=[batch, seq], dtype=pb.UINT8, data=b"\x01" * (batch * seq))
    lora = pb.Tensor(shape=[lora_n], dtype=pb.FLOAT32, data=struct.pack("<f", 0.01) * lora_n)
    return pb.ForwardRequest(
        session_id=session, step=0, hidden=h, attention_mask=mask, lora=lora, lora_version=1, dropout_seed=1, train=True
    ).SerializeToString()


def vanish_one(env, a, how: str, rng: random.Random) -> str:
    """Opens a session, sends a training Forward and vanishes: 'cancel' (drop mid-call) or 'after' (drop after)."""
    from tandem.protos import split_pb2 as pb

    ch = raw_channel(env, VANISH_IDENTITY)
    try:
        req = pb.OpenSessionRequest(lora=pb.LoraSpec(rank=8, alpha=16), remote_lora=True, codec="float32")
        if rng.random() < 0.5:
            req.cloud_optimizer.CopyFrom(pb.AdamW(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8))
        info = pb.OpenSessionResponse.FromString(call_ok(ch, SPLIT, "OpenSession", req.SerializeToString()))
        n = sum(8 * (s.in_features + s.out_features) for s in info.middle_slots)
        body = vanish_request(info.session_id, a.hidden, *a.vanish_tokens, n)
        fn = ch.unary_unary(f"/{SPLIT}/Forward", request_serializer=None, response_deserializer=None)
        if how == "cancel":
            fut = fn.future(body, timeout=60)
            time.sleep(rng.uniform(0, 0.02))
            fut.cancel()
        else:
            fn(body, timeout=60)
        return "ok"
    except Exception as e:  # noqa: BLE001  (a refused open is a result to report)
        detail = e.details() if hasattr(e, "details") else str(e)
        return f"{type(e).__name__}: {detail}"[:200]
    finally:
        ch.close()  # gone: no Backward, no CloseSession


def vanisher_process(addr: str, tls: str, hidden: str, tokens: str) -> None:
    """Internal (--_vanisher): one client process that sends a training Forward and waits to be SIGKILLed."""
    from types import SimpleNamespace

    env = {"server": SimpleNamespace(addr=addr), "tls": tls}
    a = argparse.Namespace(hidden=int(hidden), vanish_tokens=tuple(int(x) for x in tokens.split("x")))
    from tandem.protos import split_pb2 as pb

    ch = raw_channel(env, VANISH_IDENTITY)
    info = pb.OpenSessionResponse.FromString(
        call_ok(
            ch,
            SPLIT,
            "OpenSession",
            pb.OpenSessionRequest(
                lora=pb.LoraSpec(rank=8, alpha=16), remote_lora=True, codec="float32"
            ).SerializeToString(),
        )
    )
    n = sum(8 * (s.in_features + s.out_features) for s in info.middle_slots)
    fut = ch.unary_unary(f"/{SPLIT}/Forward", request_serializer=None, response_deserializer=None).future(
        vanish_request(info.session_id, a.hidden, *a.vanish_tokens, n), timeout=60
    )
    print("sent", flush=True)
    fut.exception()  # whatever comes back, the process waits to be killed
    time.sleep(600)


def run_vanish(env, a) -> dict:
    server = env["server"]
    pid, t0 = server.proc.pid, time.monotonic()
    rss = {"start": wait_expired(env, a.session_ttl)}
    outcomes, killed = Counter(), 0
    with RssPeak(pid) as peak:
        for wave in range(a.vanish_waves):
            rng = random.Random(a.seed + wave)
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--_vanisher",
                        server.addr,
                        env["tls"],
                        str(a.hidden),
                        "x".join(map(str, a.vanish_tokens)),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for _ in range(a.vanish_procs)
            ]
            threads, results = [], []

            def vanish(how: str, r: random.Random, out: list = results) -> None:
                out.append(f"{how}:{vanish_one(env, a, how, r)}")

            for i in range(a.vanish_clients - a.vanish_procs):
                th = threading.Thread(target=vanish, args=("cancel" if i % 2 else "after", random.Random(rng.random())))
                threads.append(th)
                th.start()
            for p in procs:  # SIGKILL each process once its Forward is on the wire (or after 60 s)
                deadline = time.monotonic() + 60
                line = ""
                while time.monotonic() < deadline and not line and p.poll() is None:
                    line = p.stdout.readline()
                time.sleep(rng.uniform(0, 0.02))
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed += 1
                outcomes["killed-process" if line else "process-failed-before-forward"] += 1
            for th in threads:
                th.join(120)
            outcomes.update(results)
            time.sleep(0.5)
            rss[f"after_wave_{wave + 1}"] = rss_mib(pid)
        rss["peak"] = peak.peak
    alive = server.proc.poll() is None
    rss["after"] = wait_expired(env, a.session_ttl) if alive else float("nan")
    res = {
        "n": a.vanish_clients * a.vanish_waves,
        "killed_processes": killed,
        "outcomes": dict(outcomes),
        "held_after": held(env) if alive else None,
        "wall_s": time.monotonic() - t0,
        "server_alive": alive,
        "rss_mib": rss,
    }
    res["pass"] = {"no_crash": alive, "rss_back": alive and rss["after"] <= rss["start"] * (1 + RSS_MARGIN)}
    return res


# Crowd ---------------------------------------------------------------------------------------------------------------
def run_crowd(env, a) -> dict:
    server = env["server"]
    pid, t0 = server.proc.pid, time.monotonic()
    clients = [{"name": f"c{i}", "batch": 2, "seq": 24, "seed": a.seed + i} for i in range(a.crowd_clients)]
    clients.append({"name": "big", "batch": a.big_batch, "seq": a.big_seq, "seed": a.seed + 999})

    def one(c):
        t = time.monotonic()
        try:
            c["losses"] = legit_losses(
                server.transport_cfg(), env["data"], c["seed"], a.crowd_steps, seq_len=c["seq"], batch=c["batch"]
            )
            c["finished"] = all(math.isfinite(x) for x in c["losses"]) and len(c["losses"]) == a.crowd_steps
        except Exception as e:  # noqa: BLE001  (reported per client)
            c["error"], c["finished"] = f"{type(e).__name__}: {e}"[:300], False
        c["steps"], c["wall_s"] = len(c.get("losses", [])), time.monotonic() - t

    with RssPeak(pid) as peak:
        rss_start = rss_mib(pid)
        ths = [threading.Thread(target=one, args=(c,)) for c in clients]
        for th in ths:
            th.start()
        for th in ths:
            th.join(a.scenario_timeout)
    alive = server.proc.poll() is None
    res = {
        "n": len(clients),
        "clients": clients,
        "finished": sum(c["finished"] for c in clients),
        "big_tokens": a.big_batch * a.big_seq,
        "wall_s": time.monotonic() - t0,
        "server_alive": alive,
        "rss_mib": {"start": rss_start, "peak": peak.peak, "after": rss_mib(pid) if alive else float("nan")},
    }
    res["pass"] = {"no_crash": alive, "all_finished": res["finished"] == len(clients)}
    return res


# Output --------------------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = [("scenario", "N", "RSS start/peak/after MiB", "UNKNOWN", "loss diff", "finished", "wall s", "pass")]
    for name, r in results.items():
        m = r.get("rss_mib", {})
        rows.append(
            (
                name,
                str(r["n"]),
                f"{m.get('start', 0):.0f}/{m.get('peak', 0):.0f}/{m.get('after', 0):.0f}",
                str(r.get("unknown", "-")),
                f"{r['max_loss_diff']:.1e}" if "max_loss_diff" in r else "-",
                f"{r['finished']}/{r['n']}" if "finished" in r else "-",
                f"{r['wall_s']:.0f}",
                "yes" if all(r["pass"].values()) else "NO: " + ",".join(k for k, v in r["pass"].items() if not v),
            )
        )
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._vanisher:
        vanisher_process(*a._vanisher)
        return 0
    from tandem.client.sample import write_sample
    from tandem.cloud.tls import issue_bundle
    from tandem.testing.servers import free_port, start_server

    work = os.path.join(os.path.dirname(os.path.abspath(a.out)), "abuse")
    os.makedirs(work, exist_ok=True)
    model = make_model(os.path.join(work, f"model-h{a.hidden}"), a.hidden)
    data = write_sample(os.path.join(work, "data"), n=120, seed=0)
    from pathlib import Path

    run_dir = Path(work) / f"run-{os.getpid()}"
    run_dir.mkdir()
    mport = free_port()
    if a.malloc_arena_max:
        os.environ["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)  # inherited by the server process
    server = start_server(
        model,
        run_dir,
        "--metrics-port",
        str(mport),
        "--session-ttl",
        str(a.session_ttl),
        "--quota-sessions",
        "0",
        "--max-sessions",
        "512",
        "--batch-max-tokens",
        str(a.batch_max_tokens),
        "--max-tokens-per-step",
        str(a.max_tokens_per_step),
        "--adapter-registry",
        str(run_dir / "registry"),
        "--generate-max-new-tokens",
        "16",
    )
    env = {"server": server, "tls": server.tls_dir, "data": data, "mport": mport}
    for name in (FUZZ_IDENTITY, VANISH_IDENTITY):
        issue_bundle(server.tls_dir, name)
    results = {}
    try:
        for name in a.scenarios:
            print(f"abuse: {name} ...", file=sys.stderr, flush=True)
            results[name] = {"fuzz": run_fuzz, "vanish": run_vanish, "crowd": run_crowd}[name](env, a)
            if not results[name]["server_alive"]:
                break
    finally:
        server.stop()
    log = server.log()
    out = {
        "args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
        "results": results,
        "server_log_tracebacks": log.count("Traceback"),
        "server_exit": server.proc.returncode,
        "passed": all(all(r["pass"].values()) for r in results.values()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(table(results))
    print(f"server log tracebacks: {out['server_log_tracebacks']}; results in {a.out}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
