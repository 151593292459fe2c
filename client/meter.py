"""Accounting of the client's traffic: serialized bytes per message kind, time per category, framing estimates."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# Estimated framing around each serialized message (payload bytes are measured exactly):
# gRPC adds a 5-byte length prefix; HTTP/2 a 9-byte header per DATA frame (16 KiB max) plus
# HEADERS frames (~40 B request with HPACK, ~30 B response + trailers); TLS 1.3 adds 22 B per
# record of at most 16 KiB (5 header, 1 content type, 16 AEAD tag).
FRAME_BYTES = 16 * 1024


def framing_estimate(payload: int, tls: bool) -> int:
    """Estimated HTTP/2 (+TLS) framing bytes for one message of `payload` bytes."""
    frames = max(1, -(-(payload + 5) // FRAME_BYTES))
    return 5 + 9 * frames + 35 + (22 * frames if tls else 0)


@dataclass
class KindTotals:
    calls: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class Meter:
    """Counts serialized bytes per message kind and direction, and time per category.

    `step_*` fields accumulate since the last `take_step()`; `kinds` and `one_time` are run totals.
    """

    tls: bool = True
    kinds: dict[str, KindTotals] = field(default_factory=lambda: defaultdict(KindTotals))
    one_time: dict[str, KindTotals] = field(default_factory=lambda: defaultdict(KindTotals))
    step_sent: int = 0
    step_received: int = 0
    step_rpc_s: float = 0.0
    step_cloud_s: float = 0.0
    step_serde_s: float = 0.0
    step_seal_s: float = 0.0
    framing: int = 0

    def add(self, kind: str, sent: int, received: int, one_time: bool = False) -> None:
        table = self.one_time if one_time else self.kinds
        totals = table[kind]
        totals.calls += 1
        totals.sent += sent
        totals.received += received
        self.framing += framing_estimate(sent, self.tls) + framing_estimate(received, self.tls)
        if not one_time:
            self.step_sent += sent
            self.step_received += received

    def take_step(self) -> dict:
        out = dict(
            bytes_sent=self.step_sent,
            bytes_received=self.step_received,
            rpc_s=self.step_rpc_s,
            cloud_compute_s=self.step_cloud_s,
            serialization_s=self.step_serde_s,
            sealing_s=self.step_seal_s,
        )
        self.step_sent = self.step_received = 0
        self.step_rpc_s = self.step_cloud_s = self.step_serde_s = self.step_seal_s = 0.0
        return out

    def totals(self) -> dict:
        per = {k: vars(v).copy() for k, v in self.kinds.items()}
        once = {k: vars(v).copy() for k, v in self.one_time.items()}
        return dict(per_kind=per, one_time=once, framing_estimate_bytes=self.framing)
