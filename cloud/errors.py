"""Domain errors of the cloud side; only the servicer maps them to gRPC status codes."""


def clip(value, limit: int = 80) -> str:
    """repr() of a client-sent value for an error message, cut to `limit` characters with an ellipsis."""
    if isinstance(value, str):  # cut before repr(): a 100 MB name must not be copied whole
        value = value[:limit]
    elif isinstance(value, (list, tuple)):
        value = [v[:limit] if isinstance(v, str) else v for v in value[:limit]]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


MAX_DETAILS = 1024  # characters of a status's details: they travel in a header (clients drop one over 16 KiB)


def details(e: Exception) -> str:
    """An error's message as a status's details: one line of at most MAX_DETAILS characters (an ellipsis marks a cut).
    Messages may quote the request; unbounded, a huge name comes back as a header the client refuses."""
    text = " ".join(str(e)[: 4 * MAX_DETAILS].split())
    return text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 1] + "…"


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
