"""Sealed tensors: per-session X25519 + HKDF keys and AES-256-GCM over every tensor payload, with replay counters.

TLS protects a hop; sealing protects the tensors end to end between the client and the process
that computes on them, across TLS-terminating proxies, load balancers, request logs and multi-hop
(Ray) deployments. The associated data binds session, step, direction and field name, and a
strictly increasing counter per direction (the GCM nonce) makes replayed, reordered or tampered
messages fail closed.
"""
from __future__ import annotations

import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import split_pb2 as pb

C2S, S2C = "c2s", "s2c"
_INFO = b"tandem/v1 sealed tensors"


class SealError(ValueError):
    """A sealed payload failed: `kind` is 'replay', 'tamper' or 'missing'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """An ephemeral X25519 key and its raw 32-byte public key."""
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Sealer:
    """One side of a session's sealing: seals what it sends, opens and checks what it receives."""

    def __init__(self, private: X25519PrivateKey, peer_public: bytes, session_id: str, side: str):
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:
            raise SealError("missing", f"bad X25519 public key: {e}") from None
        keys = HKDF(hashes.SHA256(), 64, salt=session_id.encode(), info=_INFO).derive(shared)
        c2s, s2c = AESGCM(keys[:32]), AESGCM(keys[32:])
        self.session_id = session_id
        self.send_dir, self.recv_dir = (C2S, S2C) if side == "client" else (S2C, C2S)
        self._send, self._recv = (c2s, s2c) if side == "client" else (s2c, c2s)
        self._next = 1  # next counter to send
        self._last_seen = 0  # highest counter accepted
        self._lock = threading.Lock()

    def _aad(self, step: int, direction: str, field: str, counter: int) -> bytes:
        return f"{self.session_id}|{step}|{direction}|{field}|{counter}".encode()

    def _take(self) -> int:
        with self._lock:
            c = self._next
            self._next += 1
            return c

    def seal(self, msg, step: int) -> None:
        """Seals every Tensor field of `msg` in place (data and scales)."""
        for fd, value in msg.ListFields():
            if fd.message_type is pb.Tensor.DESCRIPTOR and not value.sealed:
                c = self._take()
                value.data = self._send.encrypt(c.to_bytes(12, "big"), value.data, self._aad(step, self.send_dir, fd.name, c))
                value.counter = c
                if value.scales:
                    c2 = self._take()
                    value.scales = self._send.encrypt(c2.to_bytes(12, "big"), value.scales,
                                                      self._aad(step, self.send_dir, fd.name + ".scales", c2))
                    value.scales_counter = c2
                value.sealed = True

    def open(self, msg, step: int) -> None:
        """Opens every Tensor field in place; raises SealError on unsealed, replayed or tampered data."""
        fields = [(fd, v) for fd, v in msg.ListFields() if fd.message_type is pb.Tensor.DESCRIPTOR]
        with self._lock:
            for fd, value in fields:
                if not value.sealed:
                    raise SealError("missing", f"{fd.name}: this session seals tensors, but this one is not sealed")
                parts = [(value.counter, "data", fd.name)]
                if value.scales:
                    parts.append((value.scales_counter, "scales", fd.name + ".scales"))
                for counter, attr, aad_name in parts:
                    if counter <= self._last_seen:
                        raise SealError("replay", f"{aad_name}: counter {counter} was already used (replayed or reordered message)")
                    try:
                        plain = self._recv.decrypt(counter.to_bytes(12, "big"), getattr(value, attr),
                                                   self._aad(step, self.recv_dir, aad_name, counter))
                    except InvalidTag:
                        raise SealError("tamper", f"{aad_name}: authentication failed (tampered, or sealed for another session/step)") from None
                    setattr(value, attr, plain)
                    self._last_seen = counter
                value.sealed = False

    def unseal_sent(self, msg, step: int):
        """A plaintext copy of a message this side sealed (what the peer holds once it opened it).

        Used by the privacy audit to attack exactly what the cloud received; counters are not checked.
        """
        out = type(msg)()
        out.CopyFrom(msg)
        for fd, value in out.ListFields():
            if fd.message_type is not pb.Tensor.DESCRIPTOR or not value.sealed:
                continue
            parts = [(value.counter, "data", fd.name)]
            if value.scales:
                parts.append((value.scales_counter, "scales", fd.name + ".scales"))
            for counter, attr, aad_name in parts:
                plain = self._send.decrypt(counter.to_bytes(12, "big"), getattr(value, attr),
                                           self._aad(step, self.send_dir, aad_name, counter))
                setattr(value, attr, plain)
            value.sealed = False
        return out
