"""Who is calling: client-certificate identities under mutual TLS, revocation, and per-identity quotas."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass

from cryptography import x509

from .errors import Overloaded, OverQuota, Unauthenticated

REVOKED_FILE = "revoked.json"
ANONYMOUS = "anonymous"
# Identity names: ASCII only (a certificate CN, a file name under clients/), no path separators.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BURST_S = 4.0  # a bucket holds this many seconds of an identity's byte quota


def revoked_path(tls_dir: str) -> str:
    return os.path.join(tls_dir, REVOKED_FILE)


def read_revoked(tls_dir: str) -> dict:
    """{"serials": [hex...], "names": [...]} from tls_dir/revoked.json (empty when absent).

    Revocation is by certificate serial. "names" is only in files written by older versions, which revoked
    by name: such a name stays refused for every certificate except the one issued after the revocation
    (the one on file at clients/NAME.cert.pem, unless its serial is revoked too), so a bundle that an
    overwrite lost cannot come back.
    """
    try:
        with open(revoked_path(tls_dir)) as f:
            d = json.load(f)
    except FileNotFoundError:
        return {"serials": [], "names": []}
    return {"serials": list(d.get("serials", [])), "names": list(d.get("names", []))}


def cert_serial(path: str) -> str | None:
    """The serial (lower-case hex) of the PEM certificate at path; None when there is none."""
    try:
        with open(path, "rb") as f:
            return format(x509.load_pem_x509_certificate(f.read()).serial_number, "x")
    except (OSError, ValueError):
        return None


@dataclass
class QuotaConfig:
    """Per-identity limits; 0 means unlimited.

    Attributes:
        max_sessions: Open sessions one identity may hold.
        bytes_per_s: Sustained bytes per second for one identity, requests and responses together
            (burst: BURST_S seconds worth; one request larger than the burst is refused outright).
    """

    max_sessions: int = 0
    bytes_per_s: float = 0.0

    def __post_init__(self):
        if self.max_sessions < 0 or self.bytes_per_s < 0:
            raise ValueError("quotas must be >= 0 (0 = unlimited)")


class Identities:
    """Resolves the caller of each RPC and enforces revocation and byte-rate quotas.

    The byte quota is a token bucket per identity. A request is charged on arrival and refused when the
    bucket lacks its bytes; a unary response is charged when sent and may put the bucket in debt (the work
    is done, so it is not thrown away: the identity's next request waits instead); a streamed response is
    paced, each chunk waiting for the bucket.
    """

    def __init__(self, tls_dir: str | None, mutual: bool, quotas: QuotaConfig | None = None):
        self.tls_dir, self.mutual = tls_dir, mutual
        self.quotas = quotas or QuotaConfig()
        self._revoked: tuple[float, set[str], set[str]] = (-1.0, set(), set())
        self._serials: dict[bytes, tuple[str, str]] = {}
        self._buckets: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _revocations(self) -> tuple[set[str], set[str]]:
        if self.tls_dir is None:
            return set(), set()
        try:
            mtime = os.stat(revoked_path(self.tls_dir)).st_mtime
        except FileNotFoundError:
            return set(), set()
        if mtime != self._revoked[0]:
            d = read_revoked(self.tls_dir)
            self._revoked = (mtime, {s.lower() for s in d["serials"]}, set(d["names"]))
        return self._revoked[1], self._revoked[2]

    def _revoked_by_old_name_entry(self, name: str, serial: str) -> bool:
        """An older version's name revocation: refuses every certificate but the one issued after it."""
        if not NAME_RE.fullmatch(name):
            return True
        return cert_serial(os.path.join(self.tls_dir, "clients", f"{name}.cert.pem")) != serial

    def resolve(self, context) -> str:
        """The caller's name (certificate CN under mutual TLS, else 'anonymous'); raises Unauthenticated."""
        if not self.mutual:
            return ANONYMOUS
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [None])[0]
        if pem is None:
            raise Unauthenticated(
                "this server requires a client certificate; pass --identity BUNDLE issued by the operator"
            )
        cached = self._serials.get(pem)
        if cached is None:
            cert = x509.load_pem_x509_certificate(pem)
            cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            cached = (cn[0].value if cn else "", format(cert.serial_number, "x"))
            self._serials[pem] = cached
        name, serial = cached
        serials, names = self._revocations()
        if serial in serials or (name in names and self._revoked_by_old_name_entry(name, serial)):
            raise Unauthenticated(
                f"this certificate of identity {name!r} (serial {serial}) has been revoked; "
                "ask the operator for a new one"
            )
        return name

    # Byte quota ---------------------------------------------------------------------------------
    def _bucket(self, name: str, now: float) -> float:
        rate = self.quotas.bytes_per_s
        tokens, last = self._buckets.get(name, (BURST_S * rate, now))
        return min(BURST_S * rate, tokens + (now - last) * rate)

    def charge(self, name: str, nbytes: int) -> None:
        """Charges a request's bytes on arrival.

        Raises:
            OverQuota: the request alone is larger than the burst (retrying cannot help).
            Overloaded: the identity has used its quota; the message says when to retry.
        """
        rate = self.quotas.bytes_per_s
        if rate <= 0:
            return
        burst = BURST_S * rate
        if nbytes > burst:
            raise OverQuota(
                f"this request is {nbytes / 2**20:.2f} MiB, more than identity {name!r} may send at once "
                f"({burst / 2**20:.2f} MiB: {BURST_S:.0f} s of its {rate / 2**20:.2f} MiB/s quota); "
                "use a smaller batch (--batch-size/--seq-len) or ask the operator to raise --quota-mbps"
            )
        now = time.monotonic()
        with self._lock:
            tokens = self._bucket(name, now)
            if nbytes > tokens:
                self._buckets[name] = [tokens, now]
                wait = (nbytes - tokens) / rate
                raise Overloaded(
                    f"identity {name!r} is over its quota of {rate / 2**20:.2f} MiB/s; retry in {wait:.1f} s"
                )
            self._buckets[name] = [tokens - nbytes, now]

    def charge_reply(self, name: str, nbytes: int) -> None:
        """Charges a unary response's bytes; the bucket may go into debt, which the next request waits out."""
        if self.quotas.bytes_per_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._buckets[name] = [self._bucket(name, now) - nbytes, now]

    def pace(self, name: str, nbytes: int, context) -> None:
        """Waits until the bucket can pay for one streamed chunk, then charges it.

        Raises:
            Overloaded: the caller hung up or its deadline passed while waiting.
        """
        rate = self.quotas.bytes_per_s
        if rate <= 0:
            return
        need = min(nbytes, BURST_S * rate)  # a chunk larger than the burst waits for a full bucket
        while True:
            now = time.monotonic()
            with self._lock:
                tokens = self._bucket(name, now)
                if tokens >= need:
                    self._buckets[name] = [tokens - nbytes, now]
                    return
            if not context.is_active():
                raise Overloaded(f"identity {name!r}: the download was cancelled while it waited for its quota")
            time.sleep(min(1.0, (need - tokens) / rate))
