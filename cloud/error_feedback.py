"""The cloud's side of error feedback: a session's sender stream (grad_input at the bottom cut; the hidden at the top
cut is offered but carries nothing, see tandem.kernels.feedback) and its memory, counted under the server's cap for the session's life; and the exact evaluation forwards
that measure what a lossy-codec run tuned (`client tune --exact-eval`)."""

from __future__ import annotations

from tandem.kernels import feedback as kernel
from tandem.protos import split_pb2 as pb

from .errors import Overloaded, SessionNotFound, TooLarge


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

    What the streams hold beyond what the session already counts is counted with the store's `hold`. When the cap
    has no room for them, the streams restart from zero and this step's tensor still goes back: the step's backward
    (and a cloud optimizer's update) has already run, so refusing now would lose it.
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
                session.feedback_held += grown
            except (Overloaded, TooLarge, SessionNotFound):
                feedback.reset()  # nothing carried, nothing held
        return values, scales

    return encode
