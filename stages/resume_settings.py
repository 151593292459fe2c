"""Which settings a checkpoint was saved with differ from a run's: the check behind every --resume."""

from __future__ import annotations

PLAIN = (str, int, float, bool, type(None), list, tuple, dict)


def differs(saved, now) -> bool:
    """Whether a saved setting differs from the run's. The checkpoint is a file in the user's run directory, so a
    saved value that is not a plain one (a tensor in an edited file) or that cannot be compared counts as a
    difference rather than raising."""
    if not isinstance(saved, PLAIN):
        return True
    try:
        return bool(saved != now)
    except Exception:  # e.g. a list holding a tensor: its comparison has no single truth value
        return True


def differing(saved: dict, now: dict, missing_differs: bool = True) -> list[str]:
    """The keys of `now` whose saved value differs, in `now`'s order. missing_differs=False skips keys the
    checkpoint lacks (one made before the setting existed)."""
    return [k for k in now if (k in saved and differs(saved[k], now[k])) or (k not in saved and missing_differs)]
