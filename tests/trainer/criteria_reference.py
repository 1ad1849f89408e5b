"""Plain numpy reference computations of the criteria (recomputed from the whole history)."""

from __future__ import annotations

import numpy as np

# Extended precision (80-bit on x86-64) so the reference is not limited by the float64
# cancellation that the streaming code is designed to avoid.
EXT = np.longdouble


def ref_dvar(history: np.ndarray, n: int) -> float | None:
    if len(history) < n:
        return None
    h = np.asarray(history, dtype=EXT)
    num, den = np.var(h[-n:]), np.var(h)
    return 0.0 if den == 0 and num == 0 else float(num / den)


def ref_ema(history: np.ndarray, n: int, alpha: float | None = None) -> float | None:
    if len(history) < n + 1:
        return None
    a = 2.0 / (n + 1) if alpha is None else alpha
    ema = [history[0]]
    for x in history[1:]:
        ema.append(a * x + (1 - a) * ema[-1])
    return (ema[-1] - ema[-1 - n]) / abs(ema[-1 - n])


def ref_hall(history: np.ndarray, n: int) -> float | None:
    if len(history) < n:
        return None
    w = history[-n:]
    return (w.max() - w.min()) / abs(w.max())


def ref_trend(history: np.ndarray, n: int, eval_every: int = 1) -> float | None:
    if len(history) < n:
        return None
    w = np.asarray(history[-n:], dtype=EXT)
    pos = np.arange(n, dtype=EXT)
    slope = np.sum((pos - pos.mean()) * (w - w.mean())) / np.sum((pos - pos.mean()) ** 2)
    return float(slope / eval_every / abs(w.mean()))


REFERENCES = {"dvar": ref_dvar, "ema": ref_ema, "hall": ref_hall, "trend": ref_trend}


def ref_clip_gain(history: np.ndarray, patience: int) -> float | None:
    """The CLIP criterion's value: this score's gain over the best previous one."""
    return None if len(history) < 2 else float(history[-1] - max(history[:-1]))


def ref_clip_stops(history: np.ndarray, patience: int, epsilon: float) -> bool:
    """The stale-check count recomputed from scratch: checks since the last gain above epsilon."""
    best, stale = history[0], 0
    for s in history[1:]:
        stale = 0 if s - best > epsilon else stale + 1
        best = max(best, s)
    return stale >= patience


def reference_decision(name: str, history: np.ndarray, window: int, threshold: float) -> tuple[float | None, bool]:
    """(convergence value, should stop) of criterion `name` after `history`, from scratch.

    Every registered criterion needs an entry here: the contract tests iterate over the
    registry, so a new criterion without a reference fails them."""
    if name == "clip":  # window is the patience (in checks), threshold is epsilon
        return ref_clip_gain(history, window), ref_clip_stops(history, window, threshold)
    if name == "none":
        return None, False
    value = REFERENCES[name](history, window)
    return value, value is not None and abs(value) < threshold
