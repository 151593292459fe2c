"""The cloud's side of error feedback: a session's sender streams (hidden at the top cut, grad_input at the bottom
cut) and their memory, counted under the server's cap for the session's life."""

from __future__ import annotations

from tandem.kernels.feedback import Feedback


def begin(session) -> None:
    """Gives a session its streams (empty: the first step carries no error)."""
    session.feedback = Feedback()


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
