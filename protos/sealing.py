"""Sealed tensors: per-session X25519 + HKDF keys and AES-256-GCM over every tensor payload, with replay counters.

TLS protects a hop; sealing protects the tensors end to end between the client and the process
that computes on them, across TLS-terminating proxies, load balancers, request logs and multi-hop
(Ray) deployments. The keys come from a handshake the server signs (protos/handshake.py), and the
HKDF salt is that handshake's transcript hash, so a hop that rewrote any of it derives other keys.
The associated data binds session, step, direction, field name, a strictly increasing counter per
direction (the GCM nonce) and a digest of everything else in the message (`header_digest`): a
reshaped tensor, a flipped flag or a dropped tensor field fails closed like a tampered byte.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import split_pb2 as pb

C2S, S2C = "c2s", "s2c"
_INFO = b"tandem/v2 sealed tensors"
_TENSOR = pb.Tensor.DESCRIPTOR


class SealError(ValueError):
    """A sealed payload failed: `kind` is 'replay', 'tamper' or 'missing'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """An ephemeral X25519 key and its raw 32-byte public key."""
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _canon(msg, skip=frozenset()) -> list:
    """A language-neutral form of `msg`: fields by number; a Tensor contributes its metadata, never its payload."""
    out = []
    for fd in sorted(msg.DESCRIPTOR.fields, key=lambda f: f.number):
        if fd.name in skip:
            continue
        if fd.message_type is _TENSOR:
            t = getattr(msg, fd.name)
            out.append(
                [
                    fd.number,
                    [list(t.shape), t.dtype, t.codec, t.block_size, bool(t.scales)] if msg.HasField(fd.name) else None,
                ]
            )
        elif fd.is_repeated:
            out.append([fd.number, [_value(fd, v) for v in getattr(msg, fd.name)]])
        elif fd.message_type is not None:
            out.append([fd.number, _canon(getattr(msg, fd.name)) if msg.HasField(fd.name) else None])
        else:
            out.append([fd.number, _value(fd, getattr(msg, fd.name))])
    return out


def _value(fd, v):
    if fd.message_type is not None:
        return _canon(v)
    if isinstance(v, float):
        return struct.pack("<d", v).hex()  # exact, also for float32 fields
    if isinstance(v, bytes):
        return v.hex()
    return v  # int, bool, str (enums are ints)


def canonical(msg, skip=frozenset()) -> bytes:
    """Deterministic bytes of `msg` (its type name and every field but `skip` and tensor payloads)."""
    return json.dumps([msg.DESCRIPTOR.full_name, _canon(msg, skip)], separators=(",", ":")).encode()


def header_digest(msg) -> bytes:
    """SHA-256 of what a sealed message means besides its payloads: bound into every tensor's associated data."""
    return hashlib.sha256(canonical(msg)).digest()


def _tensors(msg) -> list:
    return [(fd, v) for fd, v in msg.ListFields() if fd.message_type is _TENSOR]


def _parts(fd, value) -> list[tuple[int, str, str]]:
    """(counter, attribute, associated-data name) of each sealed payload of one tensor field."""
    parts = [(value.counter, "data", fd.name)]
    if value.scales:
        parts.append((value.scales_counter, "scales", fd.name + ".scales"))
    return parts


class Sealer:
    """One side of a session's sealing: seals what it sends, opens and checks what it receives.

    `transcript` is the handshake's transcript hash (protos/handshake.py): both sides must have
    seen the same keys and session parameters to derive the same keys.
    """

    def __init__(self, private: X25519PrivateKey, peer_public: bytes, session_id: str, side: str, transcript: bytes):
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:
            raise SealError("missing", f"bad X25519 public key: {e}") from None
        keys = HKDF(hashes.SHA256(), 64, salt=transcript, info=_INFO + session_id.encode()).derive(shared)
        c2s, s2c = AESGCM(keys[:32]), AESGCM(keys[32:])
        self.session_id = session_id
        self.send_dir, self.recv_dir = (C2S, S2C) if side == "client" else (S2C, C2S)
        self._send, self._recv = (c2s, s2c) if side == "client" else (s2c, c2s)
        self._next = 1  # next counter to send
        self._last_seen = 0  # highest counter accepted
        self._lock = threading.Lock()

    def _aad(self, step: int, direction: str, field: str, counter: int, header: bytes) -> bytes:
        return f"{self.session_id}|{step}|{direction}|{field}|{counter}|".encode() + header

    def _take(self) -> int:
        with self._lock:
            c = self._next
            self._next += 1
            return c

    def seal(self, msg, step: int) -> None:
        """Seals every Tensor field of `msg` in place (data and scales), bound to the rest of the message."""
        header = header_digest(msg)
        for fd, value in _tensors(msg):
            if value.sealed:
                continue
            c = self._take()
            value.data = self._send.encrypt(
                c.to_bytes(12, "big"), value.data, self._aad(step, self.send_dir, fd.name, c, header)
            )
            value.counter = c
            if value.scales:
                c2 = self._take()
                value.scales = self._send.encrypt(
                    c2.to_bytes(12, "big"),
                    value.scales,
                    self._aad(step, self.send_dir, fd.name + ".scales", c2, header),
                )
                value.scales_counter = c2
            value.sealed = True

    def open(self, msg, step: int) -> None:
        """Opens every Tensor field in place; raises SealError on unsealed, replayed, tampered or stripped data."""
        fields = _tensors(msg)
        if not fields and any(fd.message_type is _TENSOR for fd in msg.DESCRIPTOR.fields):
            raise SealError("missing", f"{msg.DESCRIPTOR.name}: no tensor in a message of a sealed session (stripped?)")
        header = header_digest(msg)
        with self._lock:
            for fd, value in fields:
                if not value.sealed:
                    raise SealError("missing", f"{fd.name}: this session seals tensors, but this one is not sealed")
                for counter, attr, aad_name in _parts(fd, value):
                    if counter <= self._last_seen:
                        raise SealError(
                            "replay", f"{aad_name}: counter {counter} was already used (replayed or reordered message)"
                        )
                    try:
                        plain = self._recv.decrypt(
                            counter.to_bytes(12, "big"),
                            getattr(value, attr),
                            self._aad(step, self.recv_dir, aad_name, counter, header),
                        )
                    except InvalidTag:
                        raise SealError(
                            "tamper",
                            f"{aad_name}: authentication failed (tampered or rewritten message, "
                            "or sealed for another session/step)",
                        ) from None
                    setattr(value, attr, plain)
                    self._last_seen = counter
                value.sealed = False

    def unseal_sent(self, msg, step: int):
        """A plaintext copy of a message this side sealed (what the peer holds once it opened it).

        Used by the privacy audit to attack exactly what the cloud received; counters are not checked.
        """
        out = type(msg)()
        out.CopyFrom(msg)
        header = header_digest(out)
        for fd, value in _tensors(out):
            if not value.sealed:
                continue
            for counter, attr, aad_name in _parts(fd, value):
                plain = self._send.decrypt(
                    counter.to_bytes(12, "big"),
                    getattr(value, attr),
                    self._aad(step, self.send_dir, aad_name, counter, header),
                )
                setattr(value, attr, plain)
            value.sealed = False
        return out
