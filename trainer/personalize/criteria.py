"""Convergence criteria: streaming stop rules over the deterministic-loss series.

Each criterion consumes one value per *evaluation* (`update(value)`), returns its convergence
value once that value is defined, and says whether training may stop (`should_stop()`).
Windows here are counted in evaluations; `window_in_evaluations` converts the user's window
(in training steps) with `evalEvery`.

Adding a criterion means writing one subclass of `Criterion` that declares its `name` (a value of
`spec.CriterionName`), its constructor `options`, its `default_threshold` and whether it can be
`replayable` on a recorded loss series, and adding it to `CRITERIA`. `from_spec` (the training
loop), `build_criterion` (replay) and the contract tests all read the registry.

Every update costs O(1) (Hall: O(1) amortised), independent of how long the history is; the
official DVAR code recomputes the variance of the whole history at each step instead.

Conventions shared by all criteria (see docs/criteria.md):
- Variances are population variances (ddof=0), as `numpy.var` computes by default.
- A non-finite value (NaN, +-inf) is *ignored*: it is not added to any statistic, `update`
  returns None for it, `should_stop()` keeps its previous answer, and the count of ignored
  values is kept in `nonfinite` (also in the state dict). The training loop decides whether a
  NaN loss is fatal; the criterion only refuses to let it poison its running sums.
- `state_dict()` is plain JSON (floats, ints, lists): a resumed run restores it and continues
  the same series as if never interrupted.

This module is torch-free and numpy-free: it runs inside the training loop, the replay command
and the operator's tooling alike.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Optional

from personalize.spec import CriterionName, EarlyStopping, PersonalizationJobSpec, StopReason

__all__ = [
    "Criterion",
    "DvarCriterion",
    "EmaCriterion",
    "HallCriterion",
    "TrendCriterion",
    "ClipScoreCriterion",
    "NoCriterion",
    "StopPolicy",
    "make_criterion",
    "build_criterion",
    "criterion_class",
    "from_spec",
    "default_threshold",
    "stop_threshold",
    "window_in_evaluations",
    "CRITERIA",
]


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0/0 -> 0 (nothing moves: converged) and x/0 -> inf."""
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


class _Window:
    """The last `size` values in arrival order: a fixed-size ring buffer.

    `append` returns the value that fell out (None while the buffer is still filling).
    """

    def __init__(self, size: int):
        self.size = size
        self._buf: list[float] = [0.0] * size
        self._start = 0  # index of the oldest value
        self.count = 0  # how many slots are filled (<= size)

    def append(self, value: float) -> Optional[float]:
        if self.count < self.size:
            self._buf[(self._start + self.count) % self.size] = value
            self.count += 1
            return None
        dropped = self._buf[self._start]
        self._buf[self._start] = value
        self._start = (self._start + 1) % self.size
        return dropped

    def oldest(self) -> float:
        return self._buf[self._start]

    @property
    def full(self) -> bool:
        return self.count == self.size

    def values(self) -> list[float]:
        """Oldest first."""
        return [self._buf[(self._start + i) % self.size] for i in range(self.count)]

    def load(self, values: list[float]) -> None:
        if len(values) > self.size:
            raise ValueError(f"window state holds {len(values)} values, more than its size {self.size}")
        self._buf = [float(v) for v in values] + [0.0] * (self.size - len(values))
        self._start = 0
        self.count = len(values)


class Criterion:
    """Base class: bookkeeping shared by all criteria (name, window, threshold, NaN policy)."""

    name: ClassVar[str] = ""
    # Keyword options the constructor takes besides window and threshold (others are refused).
    options: ClassVar[tuple[str, ...]] = ()
    # The threshold when the spec gives none; None means the method's published DVAR threshold.
    default_threshold: ClassVar[Optional[float]] = None
    # Whether it runs on a recorded deterministic-loss series (`personalize-train replay`).
    replayable: ClassVar[bool] = True
    # False for a criterion that never stops (replay leaves it out of its default comparison).
    stops_early: ClassVar[bool] = True

    @classmethod
    def build(cls, window: int, threshold: float, **opts: Any) -> "Criterion":
        """The criterion for a window in evaluations; a subclass maps window/threshold when its
        constructor names them differently."""
        return cls(window, threshold, **opts)

    @classmethod
    def spec_options(cls, early_stopping: EarlyStopping, eval_every: int) -> dict[str, Any]:
        """The constructor options the spec decides (`eval_every`: the evaluation spacing in steps)."""
        return {}

    def __init__(self, window: int, threshold: float):
        if int(window) < 1:
            raise ValueError(f"{self.name}: window must be >= 1 evaluation, got {window}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"{self.name}: threshold must be a finite number >= 0, got {threshold}")
        self.window = int(window)
        self.threshold = float(threshold)
        self.count = 0  # finite values consumed
        self.nonfinite = 0  # non-finite values ignored
        self.value: Optional[float] = None  # last convergence value (None until defined)

    # ---- public API -----------------------------------------------------------------------

    def update(self, value: float) -> Optional[float]:
        """Consume one evaluation; return the convergence value (None until it is defined).

        A non-finite value is ignored (see the module docstring) and returns None.
        """
        value = float(value)
        if not math.isfinite(value):
            self.nonfinite += 1
            return None
        self.count += 1
        self.value = self._consume(value)
        return self.value

    def should_stop(self) -> bool:
        """True when the convergence value is defined and its magnitude is below the threshold."""
        return self.value is not None and abs(self.value) < self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "window": self.window,
            "threshold": self.threshold,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "value": _json_float(self.value),
            **self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of criterion {state.get('name')!r} cannot be loaded into {self.name!r}")
        if int(state["window"]) != self.window:
            raise ValueError(f"{self.name}: state has window {state['window']}, criterion has {self.window}")
        # The threshold may legitimately change on resume (a user re-tunes it), so it is not checked.
        self.count = int(state["count"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.value = _from_json_float(state.get("value"))
        self._load(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, threshold={self.threshold}, count={self.count})"

    # ---- per-criterion hooks ----------------------------------------------------------------

    def _consume(self, value: float) -> Optional[float]:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _json_float(x: Optional[float]) -> Any:
    """JSON has no inf/NaN; a convergence value can be inf (x/0), so encode it as a string."""
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else ("-inf" if x < 0 else "nan")


def _from_json_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


class DvarCriterion(Criterion):
    """DVAR: var(last n values) / var(all values) < threshold, defined once n values exist.

    Both variances are computed on values shifted towards their centre, because a loss series can
    sit far from zero with tiny variation (1e6 +- 1e-3 would otherwise lose ~7 digits to
    cancellation):
    - the whole history: Welford's online algorithm (count, mean, M2) on x - x_0, x_0 being the
      first value;
    - the window: running sums S1 = sum(x - K), S2 = sum((x - K)^2) over a ring buffer of the
      last n values, var = (S2 - S1^2 / n) / n. The window may drift far from x_0, so it has its
      own shift K, reset to the window mean by an exact O(n) recompute every n updates (O(1)
      amortised), which also discards the rounding errors the add/subtract updates accumulate.
    """

    name = CriterionName.dvar.value

    def __init__(self, window: int, threshold: float):
        if int(window) < 2:
            raise ValueError(f"dvar: window must be >= 2 evaluations (a variance needs two values), got {window}")
        super().__init__(window, threshold)
        self._origin: Optional[float] = None  # x_0: shift of the global statistics
        self._all_mean = 0.0  # mean of x - x_0
        self._all_m2 = 0.0
        self._win = _Window(self.window)
        self._shift = 0.0  # K: shift of the window sums
        self._s1 = 0.0
        self._s2 = 0.0
        self._since_recompute = 0

    def _consume(self, x: float) -> Optional[float]:
        # Whole history: Welford on the shifted value.
        if self._origin is None:
            self._origin = x
        d = x - self._origin
        delta = d - self._all_mean
        self._all_mean += delta / self.count
        self._all_m2 += delta * (d - self._all_mean)

        # Window: shifted running sums.
        if self._win.count == 0:
            self._shift = x
        dropped = self._win.append(x)
        c = x - self._shift
        self._s1 += c
        self._s2 += c * c
        if dropped is not None:
            c_old = dropped - self._shift
            self._s1 -= c_old
            self._s2 -= c_old * c_old
            self._since_recompute += 1
            if self._since_recompute >= self.window:
                self._recompute_window()

        if not self._win.full:
            return None
        n = self.window
        var_window = max(self._s2 - self._s1 * self._s1 / n, 0.0) / n
        var_all = max(self._all_m2, 0.0) / self.count
        return _ratio(var_window, var_all)

    def _recompute_window(self) -> None:
        values = self._win.values()
        self._shift = math.fsum(values) / len(values) if values else 0.0
        self._s1 = math.fsum(v - self._shift for v in values)
        self._s2 = math.fsum((v - self._shift) ** 2 for v in values)
        self._since_recompute = 0

    def _state(self) -> dict[str, Any]:
        # The running window sums are stored as they are (JSON floats round-trip exactly): a
        # recompute on load would differ in the last bits, and a value that close to the
        # threshold would move the stop step of a resumed run.
        return {
            "origin": self._origin,
            "all_mean": self._all_mean,
            "all_m2": self._all_m2,
            "recent": self._win.values(),
            "window_sums": {"shift": self._shift, "s1": self._s1, "s2": self._s2, "since": self._since_recompute},
        }

    def _load(self, state: dict[str, Any]) -> None:
        self._origin = None if state["origin"] is None else float(state["origin"])
        self._all_mean = float(state["all_mean"])
        self._all_m2 = float(state["all_m2"])
        self._win.load(state["recent"])
        sums = state["window_sums"]
        self._shift, self._s1, self._s2 = float(sums["shift"]), float(sums["s1"]), float(sums["s2"])
        self._since_recompute = int(sums["since"])


class EmaCriterion(Criterion):
    """EMA: (EMA(t) - EMA(t-n)) / |EMA(t-n)|, magnitude below the threshold.

    EMA(0) = x_0, EMA(t) = alpha * x_t + (1 - alpha) * EMA(t-1) (no bias correction; pandas'
    `ewm(alpha=..., adjust=False)`). Default smoothing alpha = 2 / (n + 1): the usual "span n"
    convention, so the average's centre of mass lies (n-1)/2 evaluations back and the two
    compared EMAs summarise roughly non-overlapping stretches of the series.
    Defined once EMA(t-n) exists, i.e. from the (n+1)-th value on. The last n+1 EMA values are
    kept in a ring buffer: O(1) per update.
    """

    name = CriterionName.ema.value
    options = ("alpha",)
    default_threshold = 0.01  # not published; see docs/criteria.md

    def __init__(self, window: int, threshold: float, alpha: Optional[float] = None):
        super().__init__(window, threshold)
        self.alpha = 2.0 / (self.window + 1) if alpha is None else float(alpha)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"ema: alpha must be in (0, 1], got {self.alpha}")
        self._ema: Optional[float] = None
        self._history = _Window(self.window + 1)  # EMA(t-n) .. EMA(t)

    def _consume(self, x: float) -> Optional[float]:
        self._ema = x if self._ema is None else self.alpha * x + (1.0 - self.alpha) * self._ema
        self._history.append(self._ema)
        if not self._history.full:
            return None
        past = self._history.oldest()  # EMA(t-n)
        return _ratio(self._ema - past, abs(past))

    def _state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ema": self._ema, "history": self._history.values()}

    def _load(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self._ema = None if state["ema"] is None else float(state["ema"])
        self._history.load(state["history"])


class HallCriterion(Criterion):
    """Hall: (max - min) / |max| over the last n values, below the threshold (defined at n values).

    Sliding max and min with monotonic deques of (index, value): each value enters and leaves
    each deque once, so an update is O(1) amortised.
    """

    name = CriterionName.hall.value
    default_threshold = 0.1  # not published; see docs/criteria.md

    def __init__(self, window: int, threshold: float):
        super().__init__(window, threshold)
        self._maxq: deque[tuple[int, float]] = deque()  # values decreasing from the left
        self._minq: deque[tuple[int, float]] = deque()  # values increasing from the left

    def _consume(self, x: float) -> Optional[float]:
        i = self.count - 1  # index of x in the finite series
        self._push(i, x)
        if self.count < self.window:
            return None
        hi, lo = self._maxq[0][1], self._minq[0][1]
        return _ratio(hi - lo, abs(hi))

    def _push(self, i: int, x: float) -> None:
        while self._maxq and self._maxq[-1][1] <= x:
            self._maxq.pop()
        self._maxq.append((i, x))
        while self._minq and self._minq[-1][1] >= x:
            self._minq.pop()
        self._minq.append((i, x))
        oldest_kept = i - self.window + 1
        while self._maxq[0][0] < oldest_kept:
            self._maxq.popleft()
        while self._minq[0][0] < oldest_kept:
            self._minq.popleft()

    def _state(self) -> dict[str, Any]:
        return {"max_deque": [list(p) for p in self._maxq], "min_deque": [list(p) for p in self._minq]}

    def _load(self, state: dict[str, Any]) -> None:
        self._maxq = deque((int(i), float(v)) for i, v in state["max_deque"])
        self._minq = deque((int(i), float(v)) for i, v in state["min_deque"])


class TrendCriterion(Criterion):
    """Trend: least-squares slope of the last n values, divided by their mean; |.| < threshold.

    With positions x = 0..n-1 inside the window, the slope is
        (n * Sxy - Sx * Sy) / (n * Sxx - Sx^2),
    where Sx and Sxx are constants of n. When the window slides, every remaining value moves one
    position left, so Sxy' = Sxy - (Sy - y_old) + (n-1) * y_new and Sy' = Sy - y_old + y_new.
    The sums are kept of y - shift (shift = the window mean at the last exact recompute) to
    avoid cancellation when the series sits far from zero, and recomputed exactly from the ring
    buffer every n updates (O(1) amortised).

    The slope is per evaluation divided by `eval_every`, i.e. per training step, so a threshold
    means the same relative change per step whatever the evaluation spacing is.
    """

    name = CriterionName.trend.value
    options = ("eval_every",)
    default_threshold = 1e-4  # not published; see docs/criteria.md

    @classmethod
    def spec_options(cls, early_stopping: EarlyStopping, eval_every: int) -> dict[str, Any]:
        return {"eval_every": eval_every}  # the slope is per training step, not per evaluation

    def __init__(self, window: int, threshold: float, eval_every: int = 1):
        if int(window) < 2:
            raise ValueError(f"trend: window must be >= 2 evaluations (a line needs two points), got {window}")
        super().__init__(window, threshold)
        if int(eval_every) < 1:
            raise ValueError(f"trend: eval_every must be >= 1, got {eval_every}")
        self.eval_every = int(eval_every)
        n = self.window
        self._sx = n * (n - 1) / 2.0
        self._denominator = n * (n * (n - 1) * (2 * n - 1) / 6.0) - self._sx**2  # n*Sxx - Sx^2
        self._win = _Window(n)
        self._shift = 0.0
        self._sy = 0.0  # sum of (y - shift)
        self._sxy = 0.0  # sum of position * (y - shift)
        self._since_recompute = 0

    def _consume(self, y: float) -> Optional[float]:
        if self._win.count == 0:
            self._shift = y
        dropped = self._win.append(y)
        c = y - self._shift
        if dropped is None:
            self._sxy += (self._win.count - 1) * c
            self._sy += c
        else:
            d = dropped - self._shift
            self._sxy = self._sxy - (self._sy - d) + (self.window - 1) * c
            self._sy = self._sy - d + c
            self._since_recompute += 1
            if self._since_recompute >= self.window:
                self._recompute()
        if not self._win.full:
            return None
        n = self.window
        slope = (n * self._sxy - self._sx * self._sy) / self._denominator  # shift-invariant
        mean = self._shift + self._sy / n
        return _ratio(slope / self.eval_every, abs(mean))

    def _recompute(self) -> None:
        values = self._win.values()
        self._shift = math.fsum(values) / len(values) if values else 0.0
        self._sy = math.fsum(v - self._shift for v in values)
        self._sxy = math.fsum(i * (v - self._shift) for i, v in enumerate(values))
        self._since_recompute = 0

    def _state(self) -> dict[str, Any]:
        # Running sums stored exactly, as in DVAR: a resumed run computes bit-identical values.
        sums = {"shift": self._shift, "sy": self._sy, "sxy": self._sxy, "since": self._since_recompute}
        return {"eval_every": self.eval_every, "recent": self._win.values(), "window_sums": sums}

    def _load(self, state: dict[str, Any]) -> None:
        self._win.load(state["recent"])
        sums = state["window_sums"]
        self._shift, self._sy, self._sxy = float(sums["shift"]), float(sums["sy"]), float(sums["sxy"])
        self._since_recompute = int(sums["since"])


class ClipScoreCriterion(Criterion):
    """The paper's baseline: stop when the CLIP image similarity has stopped improving.

    The loop generates samples every `every_steps` steps and passes the score to `update`.
    An improvement is a score above the best so far by more than `epsilon`. The convergence
    value is this check's gain over the best previous score (None for the first check); the
    criterion stops after `patience` consecutive checks without improvement.
    Here `window` is the patience (in checks) and `threshold` is epsilon.
    Non-finite scores are ignored like everywhere else.
    """

    name = CriterionName.clip.value
    options = ("patience", "epsilon", "every_steps")
    replayable = False  # it consumes CLIP scores of samples, not a loss series

    @classmethod
    def build(cls, window: int, threshold: float, **opts: Any) -> "ClipScoreCriterion":
        """`patience`/`epsilon` default to `window`/`threshold`."""
        return cls(
            patience=opts.get("patience", window),
            epsilon=opts.get("epsilon", threshold),
            every_steps=opts.get("every_steps", 100),
        )

    @classmethod
    def spec_options(cls, early_stopping: EarlyStopping, eval_every: int) -> dict[str, Any]:
        clip = early_stopping.clip
        return {"patience": clip.patience, "epsilon": clip.epsilon, "every_steps": clip.every_steps}

    def __init__(self, patience: int = 3, epsilon: float = 0.0, every_steps: int = 100):
        super().__init__(patience, epsilon)
        if int(every_steps) < 1:
            raise ValueError(f"clip: every_steps must be >= 1, got {every_steps}")
        self.every_steps = int(every_steps)
        self.best: Optional[float] = None
        self.stale_checks = 0

    @property
    def patience(self) -> int:
        return self.window

    @property
    def epsilon(self) -> float:
        return self.threshold

    def _consume(self, score: float) -> Optional[float]:
        if self.best is None:
            self.best = score
            return None
        gain = score - self.best
        if gain > self.epsilon:
            self.stale_checks = 0
        else:
            self.stale_checks += 1
        self.best = max(self.best, score)
        return gain

    def should_stop(self) -> bool:
        return self.stale_checks >= self.patience

    def _state(self) -> dict[str, Any]:
        return {"every_steps": self.every_steps, "best": self.best, "stale_checks": self.stale_checks}

    def _load(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.stale_checks = int(state["stale_checks"])


class NoCriterion(Criterion):
    """`none`: never stops early (the fixed-budget baseline). Still counts what it was given."""

    name = CriterionName.none.value
    stops_early = False

    def __init__(self, window: int = 1, threshold: float = 0.0):
        super().__init__(max(1, int(window)), threshold)

    def _consume(self, value: float) -> Optional[float]:
        return None

    def should_stop(self) -> bool:
        return False

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        pass


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c for c in (DvarCriterion, EmaCriterion, HallCriterion, TrendCriterion, ClipScoreCriterion, NoCriterion)
}


def window_in_evaluations(window_steps: int, eval_every: int) -> int:
    """A window of `window_steps` training steps holds ceil(window_steps / evalEvery) evaluations
    (at least two: a variance or a slope needs two values)."""
    return max(2, -(-window_steps // eval_every))


def criterion_class(name: Any) -> type[Criterion]:
    key = name.value if isinstance(name, CriterionName) else str(name)
    if key not in CRITERIA:
        raise ValueError(f"unknown criterion {key!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[key]


def default_threshold(name: Any, method_default: float) -> float:
    """The threshold a criterion uses when the user gives none (DVAR: the method's published one)."""
    declared = criterion_class(name).default_threshold
    return method_default if declared is None else declared


def stop_threshold(spec: PersonalizationJobSpec) -> float:
    """The spec's stop threshold: `earlyStopping.threshold`, else the criterion's default."""
    es = spec.early_stopping
    return es.threshold if es.threshold is not None else default_threshold(es.criterion, spec.defaults.threshold)


def make_criterion(name: Any, window: int, threshold: float, **opts: Any) -> Criterion:
    """Build a criterion by name. `window` is in EVALUATIONS (see `window_in_evaluations`).

    Options are those the class declares in `options` (ema `alpha`; trend `eval_every`; clip
    `patience`, `epsilon`, `every_steps`); unknown ones are rejected rather than silently dropped.
    """
    cls = criterion_class(name)
    unknown = set(opts) - set(cls.options)
    if unknown:
        raise ValueError(f"criterion {cls.name!r} does not take option(s) {', '.join(sorted(unknown))}")
    return cls.build(window, threshold, **opts)


def build_criterion(
    name: Any, window_steps: int, eval_every: int, threshold: float, early_stopping: Optional[EarlyStopping] = None
) -> Criterion:
    """The criterion for a window in training steps over evaluations `eval_every` steps apart,
    with the options the spec decides (the training loop and replay both build it here)."""
    cls = criterion_class(name)
    options = cls.spec_options(early_stopping or EarlyStopping(), eval_every)
    return make_criterion(cls.name, window_in_evaluations(window_steps, eval_every), threshold, **options)


def from_spec(spec: PersonalizationJobSpec, window_steps: int, threshold: float) -> Criterion:
    """The criterion a training stage uses (a stage has its own window and threshold)."""
    es = spec.early_stopping
    return build_criterion(es.criterion, window_steps, es.criterion_spacing, threshold, es)


class StopPolicy:
    """A criterion plus the step budget: when must training stop, and why.

    `check(step)` is called after optimizer step `step` (1-based count of completed steps) and
    may be called at every step: between evaluations the criterion's answer does not change.
      - step >= max_steps                         -> MaxSteps (takes precedence: stopping at the
        budget is not an early stop, even if the criterion agrees at that very step);
      - step >= min_steps and criterion says stop -> ConvergenceThreshold;
      - otherwise None (keep training).
    """

    def __init__(self, criterion: Criterion, max_steps: int, min_steps: int = 0):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if min_steps < 0 or min_steps > max_steps:
            raise ValueError(f"min_steps must be in [0, max_steps={max_steps}], got {min_steps}")
        self.criterion = criterion
        self.max_steps = int(max_steps)
        self.min_steps = int(min_steps)

    def update(self, value: float) -> Optional[float]:
        """Feed one evaluation to the criterion (same return value as `Criterion.update`)."""
        return self.criterion.update(value)

    def observe(self, step: int, value: Optional[float] = None) -> Optional[StopReason]:
        """After step `step`: feed the evaluation made at this step (if any), then `check`."""
        if value is not None:
            self.criterion.update(value)
        return self.check(step)

    def check(self, step: int) -> Optional[StopReason]:
        if step >= self.max_steps:
            return StopReason.max_steps
        if step >= self.min_steps and self.criterion.should_stop():
            return StopReason.convergence_threshold
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "min_steps": self.min_steps, "criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The budget comes from the (possibly edited) spec of the resumed run; only the series
        # state is carried over.
        self.criterion.load_state_dict(state["criterion"])
