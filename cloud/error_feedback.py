"""The cloud's side of error feedback: a session's sender stream (grad_input at the bottom cut; the hidden at the top
cut is offered but carries nothing, see tandem.kernels.feedback) and its memory, counted under the server's cap for the session's life; and the exact evaluation forwards
that measure what a lossy-codec run tuned (`client tune --exact-eval`)."""

from __future__ import annotations

from tandem.kernels import feedback as kernel
from tandem.protos import split_pb2 as pb


def received(session, x, codec: str):
    """A decoded hidden or gradient; in an error-feedback session the client rotated its int8/int4 tensors."""
    return kernel.received(x, codec) if session.feedback is not None else x


def forward_codec(session, request) -> str:
    """The codec of a Forward's hidden, both ways: the session's, or float32 for an evaluation forward (not
    training, negative step) that the client sent in float32 (exact: it only costs the client bytes)."""
    exact = not request.train and request.step < 0 and request.hidden.codec == pb.CODEC_NONE
    return "float32" if exact else session.codec


def begin(session) -> None:
    """Gives a session its streams (empty: the first step carries no error)."""
    session.feedback = kernel.Feedback()


def encoder(store, session, stream: str, codec: str, step: int):
    """The encoder of `stream` at `step` for serde.encode (None: no error feedback, a float codec or evaluation).

    What the streams hold beyond what the session already counts is counted with the store's `hold` (the cap
    refuses a step whose residuals do not fit; the streams then restart from zero).
    """
    feedback = session.feedback
    inner = None if feedback is None else feedback.encoder(stream, codec, step)
    if inner is None:
        return None

    def encode(x):
        values, scales = inner(x)
        grown = feedback.nbytes - session.feedback_held
        if grown > 0:
            try:
                store.hold(session, grown)
            except Exception:
                feedback.reset()
                raise
            session.feedback_held += grown
        return values, scales

    return encode
