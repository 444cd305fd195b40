"""DPM-Solver and DDIM samplers for noise-prediction networks, in numpy.

Notation follows DPM-Solver (Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
Model Sampling in Around 10 Steps", NeurIPS 2022) and DPM-Solver++ (Lu et al., arXiv 2211.01095)
for the multistep form: ``x_t = alpha_t x_0 + sigma_t e``, ``lambda_t = log(alpha_t / sigma_t)``,
a step from s to t has ``h = lambda_t - lambda_s`` and ``phi_1 = expm1(h)``.

Every method shares one contract (``solve``). The network is ``eps_fn(x, t)``: ``x`` is the
current state [B, C, H, W] in the dtype of ``x_T``, ``t`` is a float64 array [B] of solver times
(equal within a call), and it returns eps with x's shape. The solver keeps its coefficients
in float64 Python floats and does the array arithmetic in the state's dtype. ``eps_fn`` must
return a new array each call, not a view of ``x``, because multistep keeps earlier eps values.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import VPSchedule, lambda_from_log_alpha, sigma_from_log_alpha
from calibexport.runtime.spacing import check_spacing, time_grid

logger = logging.getLogger(__name__)

EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

METHODS = ("singlestep", "singlestep_fixed", "multistep", "ddim")

# Multistep lowers the order of its final steps only below this many steps, as the reference
# DPM-Solver code does (diffusers lowers the last step at any step count).
LOWER_ORDER_FINAL_MAX_STEPS = 10


@dataclass
class StepInfo:
    """State after one outer solver step, passed to ``solve``'s callback.

    ``step`` counts from 1, ``t`` is the solver time the state ``x`` belongs to and ``nfe`` the
    number of network evaluations so far. After the optional final denoising evaluation ``x`` is
    the data prediction and ``t`` is 0.0. Each step makes a new ``x`` and the solver never writes
    to it again, so a callback may keep it without copying.
    """

    step: int
    t: float
    x: np.ndarray
    nfe: int


class _Node(NamedTuple):
    """Schedule values at one solver time, in float64.

    A named tuple rather than a frozen dataclass: building one is several times cheaper, and a
    plan builds one per solver time on every ``solve`` call.
    """

    t: float
    log_alpha: float
    sigma: float
    lambda_: float


def _nodes(schedule: VPSchedule, times: Sequence[float] | np.ndarray) -> list[_Node]:
    times = np.asarray(times, dtype=np.float64)
    log_alpha = schedule.log_alpha(times)
    columns = (times, log_alpha, sigma_from_log_alpha(log_alpha), lambda_from_log_alpha(log_alpha))
    return [_Node(*values) for values in zip(*(c.tolist() for c in columns))]


def _alpha_ratio(t: _Node, s: _Node) -> float:
    """Return alpha_t / alpha_s, computed from the log values."""
    return math.exp(t.log_alpha - s.log_alpha)


def _combine(
    x: np.ndarray, a: float, terms: Sequence[tuple[float, np.ndarray]], scratch: np.ndarray
) -> np.ndarray:
    """Return ``a * x + sum(c * y)`` as a new array of x's dtype; products go through scratch."""
    out = np.multiply(x, a)
    for c, y in terms:
        np.multiply(y, c, out=scratch)
        out += scratch
    return out


class _Evaluator:
    """Call eps_fn with the solver-time array, check its output and count evaluations."""

    def __init__(self, eps_fn: EpsFn, batch: int, shape: tuple[int, ...]) -> None:
        self.eps_fn = eps_fn
        self.batch = batch
        self.shape = shape
        self.nfe = 0

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        eps = self.eps_fn(x, np.full((self.batch,), t, dtype=np.float64))
        self.nfe += 1
        if getattr(eps, "shape", None) != self.shape:
            raise CalibexportError(
                f"eps_fn returned shape {getattr(eps, 'shape', type(eps).__name__)} at t={t}; "
                f"it must return an array with the state's shape {self.shape}."
            )
        return eps


# ---------------------------------------------------------------------------------------------
# Order allocation and evaluation counts
# ---------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_method_order(steps: int, order: int, method: str) -> None:
    if not _is_int(steps) or steps < 1:
        raise CalibexportError(
            f"steps={steps!r} is invalid; steps is the number of network evaluations and must "
            f"be an integer >= 1."
        )
    if method not in METHODS:
        raise CalibexportError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}.")
    if not _is_int(order) or order not in (1, 2, 3):
        raise CalibexportError(f"order={order!r} is invalid; valid orders: 1, 2, 3.")
    if method == "ddim" and order != 1:
        raise CalibexportError(
            f"method 'ddim' is first order but order={order} was requested; pass order=1, or "
            f"use method 'singlestep' or 'multistep' for orders 2 and 3."
        )


def singlestep_orders(steps: int, order: int, fixed: bool) -> list[int]:
    """Return the order of each singlestep DPM-Solver step for ``steps`` network evaluations.

    Fast allocation (``fixed=False``), which spends exactly ``steps`` evaluations:

    * order 3: ``K = steps // 3 + 1`` steps with orders ``[3, ..., 3, 2, 1]`` when
      ``steps % 3 == 0``, ``[3, ..., 3, 1]`` when ``== 1`` and ``[3, ..., 3, 2]`` when ``== 2``;
    * order 2: ``[2, ..., 2]`` and a final 1 when ``steps`` is odd;
    * order 1: ``steps`` steps of order 1.

    Fixed allocation (``fixed=True``): ``steps // order`` steps all of order ``order``, so only
    ``order * (steps // order)`` evaluations are spent; when ``steps < order`` it is one step of
    order ``steps``.
    """
    _check_method_order(steps, order, "singlestep_fixed" if fixed else "singlestep")
    steps = int(steps)
    if fixed:
        if steps < order:
            return [steps]
        return [order] * (steps // order)
    if order == 3:
        num_steps = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        orders = [3] * (num_steps - len(tail)) + tail
    elif order == 2:
        orders = [2] * (steps // 2) + [1] * (steps % 2)
    else:
        orders = [1] * steps
    assert sum(orders) == steps, (steps, order, orders)
    return orders


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Return the order of each multistep DPM-Solver step.

    Step ``i`` (from 1) uses ``min(order, i)`` because only ``i`` earlier eps values exist. With
    ``lower_order_final`` and fewer than 10 steps, step ``i`` also uses at most
    ``steps + 1 - i``, which ends on a first-order step.

    The first step is always first order. Where eps changes within it (t_start well below t_max)
    its O(h^2) local error caps the global order at 2 for large NFE.
    """
    _check_method_order(steps, order, "multistep")
    orders = []
    for i in range(1, int(steps) + 1):
        step_order = min(order, i)
        if lower_order_final and steps < LOWER_ORDER_FINAL_MAX_STEPS:
            step_order = min(step_order, steps + 1 - i)
        orders.append(step_order)
    return orders


def count_nfe(steps: int, order: int, method: str, denoise_to_zero: bool = False) -> int:
    """Return the number of eps_fn calls that ``solve`` makes with these options."""
    _check_method_order(steps, order, method)
    if method == "singlestep_fixed":
        nfe = sum(singlestep_orders(steps, order, fixed=True))
    else:
        nfe = int(steps)
    return nfe + int(bool(denoise_to_zero))


# ---------------------------------------------------------------------------------------------
# Step updates (noise prediction)
# ---------------------------------------------------------------------------------------------


def _dpm_solver_1(
    x: np.ndarray, s: _Node, t: _Node, eps_s: np.ndarray, scratch: np.ndarray
) -> np.ndarray:
    """DPM-Solver-1 (Lu et al., NeurIPS 2022), which is DDIM written in lambda."""
    h = t.lambda_ - s.lambda_

    # x_t = (alpha_t / alpha_s) x - sigma_t phi_1 eps_s
    terms = [(-t.sigma * math.expm1(h), eps_s)]
    return _combine(x, _alpha_ratio(t, s), terms, scratch)


def _singlestep_2(
    evaluate: _Evaluator,
    x: np.ndarray,
    nodes: Sequence[_Node],
    ratios: Sequence[float],
    eps_s: np.ndarray,
    scratch: np.ndarray,
) -> np.ndarray:
    """Singlestep DPM-Solver-2 (Lu et al., NeurIPS 2022) with its inner point at r1 of h."""
    s, s1, t = nodes
    (r1,) = ratios
    h = t.lambda_ - s.lambda_
    phi_1 = math.expm1(h)

    # Inner point s1: u = (alpha_s1 / alpha_s) x - sigma_s1 expm1(r1 h) eps_s
    u = _combine(x, _alpha_ratio(s1, s), [(-s1.sigma * math.expm1(r1 * h), eps_s)], scratch)
    eps_1 = evaluate(u, s1.t)

    # x_t = (alpha_t / alpha_s) x - sigma_t phi_1 eps_s - (0.5 / r1) sigma_t phi_1 (eps_1 - eps_s)
    c = 0.5 / r1 * t.sigma * phi_1
    terms = [(-t.sigma * phi_1 + c, eps_s), (-c, eps_1)]
    return _combine(x, _alpha_ratio(t, s), terms, scratch)


def _singlestep_3(
    evaluate: _Evaluator,
    x: np.ndarray,
    nodes: Sequence[_Node],
    ratios: Sequence[float],
    eps_s: np.ndarray,
    scratch: np.ndarray,
) -> np.ndarray:
    """Singlestep DPM-Solver-3 (Lu et al., NeurIPS 2022) with inner points at r1 < r2 of h."""
    s, s1, s2, t = nodes
    r1, r2 = ratios
    h = t.lambda_ - s.lambda_
    phi_1 = math.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0

    # Inner point s1: u1 = (alpha_s1 / alpha_s) x - sigma_s1 expm1(r1 h) eps_s
    u1 = _combine(x, _alpha_ratio(s1, s), [(-s1.sigma * math.expm1(r1 * h), eps_s)], scratch)
    eps_1 = evaluate(u1, s1.t)

    # Inner point s2: u2 = (alpha_s2 / alpha_s) x - sigma_s2 expm1(r2 h) eps_s
    #                      - (r2 / r1) sigma_s2 phi_22 (eps_1 - eps_s)
    c = r2 / r1 * s2.sigma * phi_22
    terms = [(-s2.sigma * math.expm1(r2 * h) + c, eps_s), (-c, eps_1)]
    u2 = _combine(x, _alpha_ratio(s2, s), terms, scratch)
    eps_2 = evaluate(u2, s2.t)

    # x_t = (alpha_t / alpha_s) x - sigma_t phi_1 eps_s - (1 / r2) sigma_t phi_2 (eps_2 - eps_s)
    c = t.sigma * phi_2 / r2
    terms = [(-t.sigma * phi_1 + c, eps_s), (-c, eps_2)]
    return _combine(x, _alpha_ratio(t, s), terms, scratch)


def _multistep_update(
    x: np.ndarray,
    history: Sequence[tuple[_Node, np.ndarray]],
    t: _Node,
    order: int,
    scratch: np.ndarray,
) -> np.ndarray:
    """Multistep DPM-Solver of order 1-3 from the last ``order`` (node, eps) pairs.

    Noise-prediction form of the multistep solver ("dpmsolver" type) of Lu et al., arXiv
    2211.01095. With eps_0 the newest value (at s_0) and eps_1, eps_2 older ones,
    ``x_t = (alpha_t / alpha_s0) x - sigma_t (phi_1 eps_0 + phi_2 D1 + phi_3 D2)``, where
    ``phi_2 = phi_1 / h - 1`` and ``phi_3 = phi_2 / h - 1/2``. D1 ~ h eps' and D2 ~ h^2 eps''
    are divided differences in lambda. Order 2 keeps only D1 ~ D1_0 with ``phi_2 -> phi_1 / 2``.
    Each D is kept as weights over (eps_0, eps_1, eps_2), so the update is one linear combination.

    NOTE: order 3 takes D2 = 2 (D1_0 - D1_1) / (r0 + r1). The reference DPM-Solver and diffusers
    code omit the factor 2, which leaves an O(h^3) local error, so their third-order multistep
    converges only at second order. Samples therefore differ from theirs at order 3.
    """
    s0, eps_0 = history[-1]
    h = t.lambda_ - s0.lambda_
    phi_1 = math.expm1(h)
    eps = [eps_0] + [e for _, e in reversed(history[-order:-1])]
    # Weights of (eps_0, eps_1, eps_2) as Python floats: numpy calls on 3-element arrays cost
    # more than the whole combination at small batch sizes.
    w0, w1, w2 = phi_1, 0.0, 0.0

    if order == 2:
        # D1_0 = (eps_0 - eps_1) / r0 with r0 = h_0 / h; x_t uses (1/2) phi_1 D1_0
        s1 = history[-2][0]
        r0 = (s0.lambda_ - s1.lambda_) / h
        w0 += 0.5 * phi_1 / r0
        w1 -= 0.5 * phi_1 / r0

    elif order == 3:
        # D1_0 = (eps_0 - eps_1) / r0, D1_1 = (eps_1 - eps_2) / r1,
        # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = 2 (D1_0 - D1_1) / (r0 + r1)
        s1, s2 = history[-2][0], history[-3][0]
        r0 = (s0.lambda_ - s1.lambda_) / h
        r1 = (s1.lambda_ - s2.lambda_) / h
        d1_0 = (1.0 / r0, -1.0 / r0, 0.0)
        d1_1 = (0.0, 1.0 / r1, -1.0 / r1)
        d1 = [a + r0 / (r0 + r1) * (a - b) for a, b in zip(d1_0, d1_1)]
        d2 = [2.0 * (a - b) / (r0 + r1) for a, b in zip(d1_0, d1_1)]
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        w0, w1, w2 = (w + (phi_2 * a + phi_3 * b) for w, a, b in zip((w0, w1, w2), d1, d2))

    # x_t = (alpha_t / alpha_s0) x - sigma_t (weights . eps)
    terms = [(-t.sigma * w, e) for w, e in zip((w0, w1, w2), eps)]
    return _combine(x, _alpha_ratio(t, s0), terms, scratch)


def _ddim_step(
    x: np.ndarray, s: _Node, t: _Node, eps_s: np.ndarray, scratch: np.ndarray
) -> np.ndarray:
    """Deterministic DDIM step (Song et al., ICLR 2021, eta = 0)."""
    alpha_s, alpha_t = math.exp(s.log_alpha), math.exp(t.log_alpha)

    # Data prediction: x0 = (x - sigma_s eps_s) / alpha_s
    x0 = _combine(x, 1.0 / alpha_s, [(-s.sigma / alpha_s, eps_s)], scratch)

    # x_t = alpha_t x0 + sigma_t eps_s
    return _combine(x0, alpha_t, [(t.sigma, eps_s)], scratch)


# ---------------------------------------------------------------------------------------------
# Sampling loops
# ---------------------------------------------------------------------------------------------


def _singlestep_plan(
    schedule: VPSchedule, orders: Sequence[int], spacing: str, t_start: float, t_end: float
) -> list[tuple[list[_Node], tuple[float, ...]]]:
    """Return, for each singlestep step, its nodes (s, inner points, t) and inner ratios r.

    With logSNR spacing the outer steps are equal in lambda and the inner points sit at
    r1 = 1/2 (order 2) or r1 = 1/3, r2 = 2/3 (order 3) of h. With the other spacings the outer
    times are points of the fine grid of ``sum(orders)`` intervals at the cumulative sums of the
    orders, the inner points are the fine-grid points in between and r comes from their lambdas.
    """
    if spacing == "logSNR":
        # All inner points of all steps go through one inverse_lambda and one _nodes call,
        # because one schedule call per step made the plan most of the loop's own cost.
        outer_times = time_grid(schedule, spacing, len(orders), t_start, t_end)
        outer_lambdas = schedule.lambda_(outer_times)
        ratios = [{1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}[order] for order in orders]
        h = np.diff(outer_lambdas)
        inner_lambdas = [outer_lambdas[i] + r * h[i] for i, rs in enumerate(ratios) for r in rs]
        inner_times = iter(schedule.inverse_lambda(np.array(inner_lambdas)))
        times = []
        for i, rs in enumerate(ratios):
            times += [outer_times[i], *(next(inner_times) for _ in rs)]
        nodes = iter(_nodes(schedule, [*times, outer_times[-1]]))
        steps = []
        s = next(nodes)
        for rs in ratios:
            inner = [next(nodes) for _ in rs]
            t = next(nodes)
            steps.append(([s, *inner, t], rs))
            s = t
        return steps

    fine = _nodes(schedule, time_grid(schedule, spacing, sum(orders), t_start, t_end))
    plan = []
    start = 0
    for order in orders:
        nodes = fine[start : start + order + 1]
        h = nodes[-1].lambda_ - nodes[0].lambda_
        ratios = tuple((node.lambda_ - nodes[0].lambda_) / h for node in nodes[1:-1])
        plan.append((nodes, ratios))
        start += order
    return plan


# How many plans each schedule keeps; a service sampling with a few settings reuses them.
PLAN_CACHE_SIZE = 16
# Serializes cache updates, so threads sampling with one schedule can evict entries safely.
_PLAN_LOCK = threading.Lock()


def _cached_plan(schedule: VPSchedule, key: tuple, build: Callable[[], Any]) -> Any:
    """Return ``build()``, computed once per key and schedule object.

    Building the plan calls the schedule a few times and takes about as long as the solver
    arithmetic of 20 steps, so repeated ``solve`` calls with the same settings (every batch of a
    ``Sampler.sample`` call) reuse it. Plans are lists of immutable nodes that the loops only
    read. The cache lives on the schedule, and ``VPSchedule.__setattr__`` drops it whenever an
    attribute changes.
    """
    attributes = getattr(schedule, "__dict__", None)
    if not isinstance(attributes, dict):  # __slots__ or a class object: nowhere to keep plans
        return build()
    with _PLAN_LOCK:
        cache = attributes.setdefault("_solver_plans", {})
        if key not in cache:
            if len(cache) >= PLAN_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = build()
        return cache[key]


def _run_singlestep(
    evaluate: _Evaluator,
    x: np.ndarray,
    plan: Sequence[tuple[list[_Node], tuple[float, ...]]],
    callback: Callable[[StepInfo], None] | None,
) -> np.ndarray:
    scratch = np.empty_like(x)
    for step, (nodes, ratios) in enumerate(plan, start=1):
        eps_s = evaluate(x, nodes[0].t)
        if len(nodes) == 2:
            x = _dpm_solver_1(x, nodes[0], nodes[1], eps_s, scratch)
        elif len(nodes) == 3:
            x = _singlestep_2(evaluate, x, nodes, ratios, eps_s, scratch)
        else:
            x = _singlestep_3(evaluate, x, nodes, ratios, eps_s, scratch)
        if callback is not None:
            callback(StepInfo(step=step, t=nodes[-1].t, x=x, nfe=evaluate.nfe))
    return x


def _run_multistep(
    evaluate: _Evaluator,
    x: np.ndarray,
    grid: Sequence[_Node],
    orders: Sequence[int],
    callback: Callable[[StepInfo], None] | None,
) -> np.ndarray:
    scratch = np.empty_like(x)
    history = [(grid[0], evaluate(x, grid[0].t))]
    for step, order in enumerate(orders, start=1):
        t = grid[step]
        x = _multistep_update(x, history, t, order, scratch)
        # The state at the last grid point needs no eps, except for denoise_to_zero (in solve).
        if step < len(orders):
            history = history[-2:] + [(t, evaluate(x, t.t))]
        if callback is not None:
            callback(StepInfo(step=step, t=t.t, x=x, nfe=evaluate.nfe))
    return x


def _run_ddim(
    evaluate: _Evaluator,
    x: np.ndarray,
    grid: Sequence[_Node],
    callback: Callable[[StepInfo], None] | None,
) -> np.ndarray:
    scratch = np.empty_like(x)
    for step in range(1, len(grid)):
        s, t = grid[step - 1], grid[step]
        x = _ddim_step(x, s, t, evaluate(x, s.t), scratch)
        if callback is not None:
            callback(StepInfo(step=step, t=t.t, x=x, nfe=evaluate.nfe))
    return x


def _check_times(
    schedule: VPSchedule, t_start: float | None, t_end: float | None
) -> tuple[float, float]:
    t_end = schedule.default_t_end if t_end is None else float(t_end)
    t_start = schedule.t_max if t_start is None else float(t_start)
    schedule.check_t_end(t_end)
    if not (t_end < t_start <= schedule.t_max):
        raise CalibexportError(
            f"t_start={t_start} is outside ({t_end}, {schedule.t_max}]; it must be above "
            f"t_end={t_end} and at most the schedule's t_max={schedule.t_max}."
        )
    return t_start, t_end


def _check_state(x_T: np.ndarray) -> np.ndarray:
    x_T = np.asarray(x_T)
    if x_T.ndim < 1 or x_T.shape[0] < 1 or not np.issubdtype(x_T.dtype, np.floating):
        raise CalibexportError(
            f"x_T must be a floating-point array [B, C, H, W] with B >= 1, got dtype "
            f"{x_T.dtype} and shape {list(x_T.shape)}."
        )
    return x_T


def solve(
    eps_fn: EpsFn,
    x_T: np.ndarray,
    schedule: VPSchedule,
    *,
    steps: int,
    order: int = 3,
    method: str = "singlestep",
    spacing: str = "logSNR",
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_to_zero: bool = False,
    lower_order_final: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> np.ndarray:
    """Solve the probability-flow ODE from ``t_start`` to ``t_end`` with a noise-prediction model.

    Methods (``METHODS``):

    * ``singlestep``: DPM-Solver-1/2/3 (Lu et al., NeurIPS 2022) with the fast order allocation
      of ``singlestep_orders(steps, order, fixed=False)``, which spends exactly ``steps`` NFE;
    * ``singlestep_fixed``: ``steps // order`` steps of order ``order``, so the real NFE is
      ``order * (steps // order)``; when ``steps < order`` it is one step of order ``steps``;
    * ``multistep``: multistep DPM-Solver of order 1-3 (noise prediction, arXiv 2211.01095),
      warming up with lower orders, NFE = ``steps``; ``lower_order_final`` lowers the order of the
      final steps only when ``steps < 10``;
    * ``ddim``: deterministic DDIM (eta = 0), order 1 only, NFE = ``steps``.

    ``steps`` counts network evaluations, excluding the final denoising evaluation that
    ``denoise_to_zero`` adds at ``t_end`` (it returns ``x0 = (x - sigma eps) / alpha``). Without
    it the result is the state at ``t_end``, which still contains noise of standard deviation
    ``sigma(t_end)``. ``t_start=None`` and ``t_end=None`` mean ``schedule.t_max`` and
    ``schedule.default_t_end``. ``spacing`` (one of ``spacing.SPACINGS``) places the steps; see
    ``calibexport.runtime.spacing``. ``callback(StepInfo)`` runs after every outer step.

    Returns the final state, a new array in x_T's dtype; x_T is not modified.
    """
    _check_method_order(steps, order, method)
    check_spacing(spacing)
    t_start, t_end = _check_times(schedule, t_start, t_end)
    x = _check_state(x_T)
    steps = int(steps)
    logger.debug(
        "solve: method=%s order=%d steps=%d spacing=%s t_start=%g t_end=%g denoise_to_zero=%s",
        method, order, steps, spacing, t_start, t_end, denoise_to_zero,
    )
    evaluate = _Evaluator(eps_fn, x.shape[0], x.shape)

    if method in ("singlestep", "singlestep_fixed"):
        orders = singlestep_orders(steps, order, fixed=method == "singlestep_fixed")
        plan = _cached_plan(schedule, (method, tuple(orders), spacing, t_start, t_end),
                            lambda: _singlestep_plan(schedule, orders, spacing, t_start, t_end))
        x = _run_singlestep(evaluate, x, plan, callback)
        num_steps = len(plan)
    else:
        grid = _cached_plan(schedule, ("grid", steps, spacing, t_start, t_end),
                            lambda: _nodes(schedule, time_grid(schedule, spacing, steps, t_start,
                                                               t_end)))
        if method == "multistep":
            orders = multistep_orders(steps, order, lower_order_final)
            x = _run_multistep(evaluate, x, grid, orders, callback)
        else:
            x = _run_ddim(evaluate, x, grid, callback)
        num_steps = steps

    if denoise_to_zero:
        # Final denoising: x0 = (x - sigma_end eps) / alpha_end at t_end
        (end,) = _nodes(schedule, [t_end])
        alpha_end = math.exp(end.log_alpha)
        eps_end = evaluate(x, end.t)
        terms = [(-end.sigma / alpha_end, eps_end)]
        x = _combine(x, 1.0 / alpha_end, terms, np.empty_like(x))
        if callback is not None:
            callback(StepInfo(step=num_steps + 1, t=0.0, x=x, nfe=evaluate.nfe))

    assert evaluate.nfe == count_nfe(steps, order, method, denoise_to_zero)
    return x
