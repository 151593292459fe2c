"""Domain errors of the cloud side; cloud/status.py alone maps them to gRPC status codes."""


def clip(value, limit: int = 80) -> str:
    """repr() of a client-sent value for an error message, cut to `limit` characters with an ellipsis."""
    if isinstance(value, str):  # cut before repr(): a 100 MB name must not be copied whole
        value = value[:limit]
    elif isinstance(value, (list, tuple)):
        value = [v[:limit] if isinstance(v, str) else v for v in value[:limit]]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CloudError(Exception):
    """Base class; `reason` travels to the client as trailing metadata (tandem-reason)."""

    reason = "error"


class InvalidRequest(CloudError):
    """A request is malformed (shape, dtype, sizes, NaN/Inf, unknown option)."""

    reason = "invalid"


class SessionNotFound(CloudError):
    """No such session: never opened, closed, or expired after its TTL."""

    reason = "no-session"


class NotOwner(CloudError):
    """The caller's identity did not open this session."""

    reason = "not-owner"


class StepNotPending(CloudError):
    """Backward names a step whose forward the cloud does not hold."""

    reason = "no-step"


class StateEvicted(CloudError):
    """The forward state for a step was evicted (memory cap); redo the step's forward."""

    reason = "evicted"


class LoraMissing(CloudError):
    """The cloud does not hold the remote-LoRA version the client asked for; resend it."""

    reason = "lora-missing"


class Overloaded(CloudError):
    """The server is at a capacity limit (sessions, memory); retry later or use a smaller batch."""

    reason = "overloaded"


class TooLarge(CloudError):
    """One request needs more than a server limit allows; retrying cannot help, a smaller batch can."""

    reason = "too-large"


class OverQuota(TooLarge):
    """One request is larger than its identity's byte-quota burst: no wait makes it fit, a smaller one does."""

    reason = "over-quota-burst"


class Unauthenticated(CloudError):
    """No valid identity: missing, unknown, expired or revoked certificate."""

    reason = "unauthenticated"


class SealFailure(CloudError):
    """A sealed tensor was replayed, reordered, tampered with or not sealed."""

    reason = "seal"


class AdapterRejected(CloudError):
    """An uploaded adapter does not fit the served model (names, shapes, layout, hashes)."""

    reason = "adapter-rejected"


class NameTaken(CloudError):
    """A different adapter is already registered under this name."""

    reason = "name-taken"


class RegistryFull(CloudError):
    """The pushing identity's share of the registry (bytes or adapters) would be exceeded."""

    reason = "registry-quota"


class NoEmulator(CloudError):
    """The server was started without --emulator, so it has no package to hand out."""

    reason = "no-emulator"


class AdapterNotFound(CloudError):
    """No adapter of the requested name is registered."""

    reason = "no-adapter"


class NotServable(CloudError):
    """The adapter is registered but cannot be applied over the shared frozen model."""

    reason = "not-servable"


class ServingClosed(CloudError):
    """The server is shutting down; the request was not decoded."""

    reason = "closed"
