"""Who is calling: client-certificate identities under mutual TLS, revocation, and per-identity quotas."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

from cryptography import x509

from .errors import Overloaded, Unauthenticated

REVOKED_FILE = "revoked.json"
ANONYMOUS = "anonymous"


def revoked_path(tls_dir: str) -> str:
    return os.path.join(tls_dir, REVOKED_FILE)


def read_revoked(tls_dir: str) -> dict:
    """{"serials": [hex...], "names": [...]} from tls_dir/revoked.json (empty when absent)."""
    try:
        with open(revoked_path(tls_dir)) as f:
            d = json.load(f)
    except FileNotFoundError:
        return {"serials": [], "names": []}
    return {"serials": list(d.get("serials", [])), "names": list(d.get("names", []))}


@dataclass
class QuotaConfig:
    """Per-identity limits; 0 means unlimited.

    Attributes:
        max_sessions: Open sessions one identity may hold.
        bytes_per_s: Sustained request bytes per second for one identity (burst: 4 s worth).
    """

    max_sessions: int = 0
    bytes_per_s: float = 0.0

    def __post_init__(self):
        if self.max_sessions < 0 or self.bytes_per_s < 0:
            raise ValueError("quotas must be >= 0 (0 = unlimited)")


class Identities:
    """Resolves the caller of each RPC and enforces revocation and byte-rate quotas."""

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

    def resolve(self, context) -> str:
        """The caller's name (certificate CN under mutual TLS, else 'anonymous'); raises Unauthenticated."""
        if not self.mutual:
            return ANONYMOUS
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [None])[0]
        if pem is None:
            raise Unauthenticated("this server requires a client certificate; pass --identity BUNDLE issued by the operator")
        cached = self._serials.get(pem)
        if cached is None:
            cert = x509.load_pem_x509_certificate(pem)
            cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            cached = (cn[0].value if cn else "", format(cert.serial_number, "x"))
            self._serials[pem] = cached
        name, serial = cached
        serials, names = self._revocations()
        if serial in serials or name in names:
            raise Unauthenticated(f"the identity {name!r} has been revoked; ask the operator for a new one")
        return name

    def charge(self, name: str, nbytes: int) -> None:
        """Token bucket on request bytes per identity; raises Overloaded with a retry hint."""
        rate = self.quotas.bytes_per_s
        if rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(name, (4 * rate, now))
            tokens = min(4 * rate, tokens + (now - last) * rate)
            if nbytes > tokens:
                wait = (nbytes - tokens) / rate
                self._buckets[name] = [tokens, now]
                raise Overloaded(f"identity {name!r} is over its quota of {rate / 2**20:.2f} MiB/s; retry in {wait:.1f} s")
            self._buckets[name] = [tokens - nbytes, now]
