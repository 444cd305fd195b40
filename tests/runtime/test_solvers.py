"""Sampler contract tests on the exact Gaussian problem (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from calibexport.errors import CalibexportError
from calibexport.runtime.schedule import LinearVPSchedule
from calibexport.runtime.solvers import (
    METHODS,
    StepInfo,
    count_nfe,
    multistep_orders,
    singlestep_orders,
    solve,
)
from calibexport.runtime.spacing import SPACINGS
from calibexport.testing.gaussian import GaussianData

ORDERS_BY_METHOD = {
    "singlestep": (1, 2, 3),
    "singlestep_fixed": (1, 2, 3),
    "multistep": (1, 2, 3),
    "ddim": (1,),
}


def _noise(shape=(2, 2, 3, 3), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _recording(eps_fn, times):
    def wrapped(x, t):
        times.append(t.copy())
        return eps_fn(x, t)

    return wrapped


@pytest.mark.parametrize("method", METHODS)
def test_every_nfe_counts_and_stays_finite(ddpm_schedule, gaussian, exact_eps, method):
    x_T = _noise()
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    for order in ORDERS_BY_METHOD[method]:
        for steps in range(1, 51):
            times = []
            recording = _recording(eps_fn, times)
            x = solve(recording, x_T, ddpm_schedule, steps=steps, order=order, method=method)
            assert len(times) == count_nfe(steps, order, method), (steps, order)
            assert np.all(np.isfinite(x)), (steps, order)
            assert x.dtype == np.float32


@pytest.mark.parametrize("method", ["singlestep", "singlestep_fixed"])
@pytest.mark.parametrize("spacing", ["time_uniform", "time_quadratic"])
def test_every_nfe_counts_other_spacings(ddpm_schedule, gaussian, exact_eps, method, spacing):
    x_T = _noise()
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    for order in (2, 3):
        for steps in range(1, 51):
            times = []
            x = solve(
                _recording(eps_fn, times), x_T, ddpm_schedule,
                steps=steps, order=order, method=method, spacing=spacing,
            )
            assert len(times) == count_nfe(steps, order, method), (steps, order)
            assert np.all(np.isfinite(x)), (steps, order)


@pytest.mark.parametrize("method", METHODS)
def test_denoise_to_zero_adds_one_evaluation(ddpm_schedule, gaussian, exact_eps, method):
    times = []
    eps_fn = _recording(exact_eps(ddpm_schedule, gaussian), times)
    solve(eps_fn, _noise(), ddpm_schedule, steps=7, order=1, method=method, denoise_to_zero=True)
    assert len(times) == count_nfe(7, 1, method, denoise_to_zero=True)
    assert len(times) == 8
    assert times[-1][0] == ddpm_schedule.default_t_end


def test_eps_fn_receives_float64_times_per_sample(ddpm_schedule, gaussian, exact_eps):
    times = []
    eps_fn = _recording(exact_eps(ddpm_schedule, gaussian), times)
    solve(eps_fn, _noise((3, 2, 2, 2)), ddpm_schedule, steps=6)
    for t in times:
        assert t.dtype == np.float64
        assert t.shape == (3,)
        assert np.all(t == t[0])
    assert times[0][0] == 1.0
    assert all(1e-3 < t[0] <= 1.0 for t in times)


@pytest.mark.parametrize(
    ("steps", "order", "fixed", "expected"),
    [
        (20, 3, False, [3] * 6 + [2]),
        (21, 3, False, [3] * 6 + [2, 1]),
        (22, 3, False, [3] * 7 + [1]),
        (3, 3, False, [2, 1]),
        (2, 3, False, [2]),
        (1, 3, False, [1]),
        (5, 2, False, [2, 2, 1]),
        (6, 2, False, [2, 2, 2]),
        (4, 1, False, [1, 1, 1, 1]),
        (20, 3, True, [3] * 6),
        (2, 3, True, [2]),
        (7, 2, True, [2, 2, 2]),
    ],
)
def test_singlestep_orders_table(steps, order, fixed, expected):
    assert singlestep_orders(steps, order, fixed) == expected


def test_fixed_singlestep_nfe_is_order_times_floor():
    assert count_nfe(20, 3, "singlestep_fixed") == 18
    assert count_nfe(2, 3, "singlestep_fixed") == 2
    assert count_nfe(20, 3, "singlestep") == 20


@pytest.mark.parametrize(
    ("steps", "order", "lower_order_final", "expected"),
    [
        (5, 3, True, [1, 2, 3, 2, 1]),
        (5, 3, False, [1, 2, 3, 3, 3]),
        (10, 3, True, [1, 2] + [3] * 8),
        (9, 2, True, [1] + [2] * 7 + [1]),
        (1, 3, True, [1]),
        (2, 3, False, [1, 2]),
    ],
)
def test_multistep_orders_table(steps, order, lower_order_final, expected):
    assert multistep_orders(steps, order, lower_order_final) == expected


def test_callback_sees_every_step(ddpm_schedule, gaussian, exact_eps):
    infos: list[StepInfo] = []
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    x = solve(eps_fn, _noise(), ddpm_schedule, steps=20, order=3, callback=infos.append)
    assert [info.step for info in infos] == list(range(1, 8))
    assert infos[-1].nfe == 20
    assert infos[-1].t == ddpm_schedule.default_t_end
    assert infos[-1].x is x
    assert all(a.t > b.t for a, b in zip(infos, infos[1:]))


def test_callback_states_stay_unchanged(ddpm_schedule, gaussian, exact_eps):
    kept: list[np.ndarray] = []
    copies: list[np.ndarray] = []

    def keep(info: StepInfo) -> None:
        kept.append(info.x)
        copies.append(info.x.copy())

    for method in METHODS:
        kept.clear()
        copies.clear()
        eps_fn = exact_eps(ddpm_schedule, gaussian)
        solve(eps_fn, _noise(), ddpm_schedule, steps=9, order=1, method=method, callback=keep)
        assert len(kept) == len({id(x) for x in kept}), method
        for x, copy in zip(kept, copies):
            np.testing.assert_array_equal(x, copy)


def test_callback_reports_denoising_step(ddpm_schedule, gaussian, exact_eps):
    infos: list[StepInfo] = []
    solve(
        exact_eps(ddpm_schedule, gaussian), _noise(), ddpm_schedule,
        steps=6, method="multistep", denoise_to_zero=True, callback=infos.append,
    )
    assert [info.step for info in infos] == list(range(1, 8))
    assert infos[-1].t == 0.0
    assert infos[-1].nfe == 7


def test_solve_leaves_input_unchanged(ddpm_schedule, gaussian, exact_eps):
    x_T = _noise()
    before = x_T.copy()
    solve(exact_eps(ddpm_schedule, gaussian), x_T, ddpm_schedule, steps=9, method="multistep")
    np.testing.assert_array_equal(x_T, before)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_equals_first_order_solver(ddpm_schedule, gaussian, exact_eps, spacing):
    x_T = _noise(dtype=np.float64)
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    ddim = solve(eps_fn, x_T, ddpm_schedule, steps=15, order=1, method="ddim", spacing=spacing)
    dpm1 = solve(
        eps_fn, x_T, ddpm_schedule, steps=15, order=1, method="singlestep", spacing=spacing
    )
    np.testing.assert_allclose(ddim, dpm1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
def test_calibrated_offset_recovers_exact_samples(ddpm_schedule, gaussian, exact_eps, method):
    offset = np.array([0.05, -0.08]).reshape(2, 1, 1)
    biased = exact_eps(ddpm_schedule, gaussian, offset)
    x_T = _noise(dtype=np.float64)
    exact = solve(exact_eps(ddpm_schedule, gaussian), x_T, ddpm_schedule, steps=20, method=method)
    biased_samples = solve(biased, x_T, ddpm_schedule, steps=20, method=method)

    def calibrated(x, t):
        return biased(x, t) - offset

    calibrated_samples = solve(calibrated, x_T, ddpm_schedule, steps=20, method=method)
    np.testing.assert_allclose(calibrated_samples, exact, rtol=0, atol=1e-12)
    drift = np.abs(biased_samples - exact).mean(axis=(0, 2, 3))
    assert np.all(drift > 0.01), drift


@pytest.mark.parametrize(
    ("schedule_kind", "t_end"), [("ddpm", 1e-3), ("linear", 1e-3), ("linear", 1e-4)]
)
@pytest.mark.parametrize("method", METHODS)
def test_final_noise_level(ddpm_schedule, exact_eps, method, schedule_kind, t_end):
    # Point-mass data: eps is constant along each exact trajectory, so every method is exact and
    # the state at t_end is alpha_end * mean + sigma_end * z with z the standardised noise.
    schedule = ddpm_schedule if schedule_kind == "ddpm" else LinearVPSchedule()
    data = GaussianData(mean=np.array([0.3, -0.6]).reshape(2, 1, 1), std=np.zeros((2, 1, 1)))
    eps_fn = exact_eps(schedule, data)
    x_T = _noise(dtype=np.float64)
    z = (x_T - schedule.alpha(1.0) * data.mean) / schedule.sigma(1.0)
    order = 1 if method == "ddim" else 3
    alpha_end, sigma_end = schedule.alpha(t_end), schedule.sigma(t_end)

    noisy = solve(eps_fn, x_T, schedule, steps=10, order=order, method=method, t_end=t_end)
    np.testing.assert_allclose(noisy, alpha_end * data.mean + sigma_end * z, rtol=0, atol=1e-12)

    clean = solve(
        eps_fn, x_T, schedule,
        steps=10, order=order, method=method, t_end=t_end, denoise_to_zero=True,
    )
    np.testing.assert_allclose(clean, np.broadcast_to(data.mean, clean.shape), rtol=0, atol=1e-12)


def test_final_noise_level_values(ddpm_schedule):
    # On the DDPM schedule sigma at t_end = 1/N is sqrt(beta_0) = 0.01.
    assert float(ddpm_schedule.sigma(1e-3)) == pytest.approx(1e-2, rel=1e-4)
    # On the continuous linear schedule sigma_t^2 = 1 - exp(-beta_0 t - (beta_1 - beta_0) t^2 / 2).
    linear = LinearVPSchedule()
    assert float(linear.sigma(1e-4)) == pytest.approx(np.sqrt(-np.expm1(-1e-5 - 9.95e-8)), rel=1e-9)
    assert float(linear.sigma(1e-4)) == pytest.approx(3.1780e-3, rel=1e-4)


def test_ddpm_rejects_t_end_below_extrapolation_limit(ddpm_schedule, gaussian, exact_eps):
    # Linear extrapolation of log_alpha below t = 1/N reaches log_alpha > 0 (sigma undefined)
    # before t = 1e-4 on the DDPM schedule.
    match = "t_end=0.0001 gives log_alpha=.*sigma_t is not positive"
    with np.errstate(all="raise"), pytest.raises(CalibexportError, match=match):
        solve(exact_eps(ddpm_schedule, gaussian), _noise(), ddpm_schedule, steps=5, t_end=1e-4)


def test_denoise_is_data_prediction_at_t_end(ddpm_schedule, gaussian, exact_eps):
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    x_T = _noise(dtype=np.float64)
    t_end = 2e-3
    noisy = solve(eps_fn, x_T, ddpm_schedule, steps=12, method="multistep", t_end=t_end)
    clean = solve(
        eps_fn, x_T, ddpm_schedule, steps=12, method="multistep", t_end=t_end, denoise_to_zero=True
    )
    alpha, sigma = ddpm_schedule.alpha(t_end), ddpm_schedule.sigma(t_end)
    expected = (noisy - sigma * eps_fn(noisy, np.full(noisy.shape[0], t_end))) / alpha
    np.testing.assert_allclose(clean, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps=0 is invalid"),
        ({"steps": 2.5}, "steps=2.5 is invalid"),
        ({"steps": 10, "order": 4}, "order=4 is invalid; valid orders: 1, 2, 3"),
        ({"steps": 10, "order": 0}, "order=0 is invalid"),
        ({"steps": 10, "order": 2.0}, "order=2.0 is invalid"),
        ({"steps": None}, "steps=None is invalid"),
        ({"steps": 10, "method": "heun"}, "unknown method 'heun'; valid methods: singlestep"),
        ({"steps": 10, "spacing": "karras"}, "unknown spacing 'karras'; valid spacings: logSNR"),
        ({"steps": 10, "method": "ddim", "order": 2}, "'ddim' is first order but order=2"),
        ({"steps": 10, "t_end": 0.0}, r"t_end=0.0 is outside the schedule's time range \(0, 1.0\)"),
        ({"steps": 10, "t_end": 1.5}, "t_end=1.5 is outside"),
        ({"steps": 10, "t_start": 1.2}, r"t_start=1.2 is outside \(0.001, 1.0\]"),
        ({"steps": 10, "t_start": 1e-3}, "t_start=0.001 is outside"),
    ],
)
def test_solve_rejects_bad_input(ddpm_schedule, gaussian, exact_eps, kwargs, match):
    with pytest.raises(CalibexportError, match=match):
        solve(exact_eps(ddpm_schedule, gaussian), _noise(), ddpm_schedule, **kwargs)


def test_count_nfe_rejects_bad_input():
    with pytest.raises(CalibexportError, match="unknown method 'euler'"):
        count_nfe(10, 1, "euler")


def test_solve_rejects_integer_state(ddpm_schedule, gaussian, exact_eps):
    with pytest.raises(CalibexportError, match="floating-point array.*int64"):
        x_T = np.zeros((1, 2, 2, 2), dtype=np.int64)
        solve(exact_eps(ddpm_schedule, gaussian), x_T, ddpm_schedule, steps=3)


def test_solve_rejects_wrong_eps_shape(ddpm_schedule):
    with pytest.raises(CalibexportError, match=r"eps_fn returned shape \(1, 2, 2\)"):
        solve(lambda x, t: x[:, 0], _noise((1, 2, 2, 2)), ddpm_schedule, steps=3)


@pytest.mark.parametrize("method", METHODS)
def test_solve_rejects_collapsed_times(ddpm_schedule, gaussian, exact_eps, method):
    t_start = 0.5
    t_end = float(np.nextafter(np.nextafter(t_start, 0.0), 0.0))
    order = 1 if method == "ddim" else 2
    options = {"order": order, "method": method, "spacing": "time_uniform"}
    match = "time grid collapses: t=0.5"
    with np.errstate(all="raise"), pytest.raises(CalibexportError, match=match):
        solve(
            exact_eps(ddpm_schedule, gaussian), _noise(), ddpm_schedule,
            steps=8, t_start=t_start, t_end=t_end, **options,
        )


# Observed convergence order on the exact Gaussian flow. time_quadratic spacing keeps every method
# in its asymptotic regime over NFE 24..192: with logSNR spacing over the whole range the leading
# error terms of multistep order 3 nearly cancel for this problem (observed slope near 4), and
# time_uniform spends its largest lambda steps near t_end, so order 3 is still pre-asymptotic.
# singlestep order 3 runs at NFE 3k - 1, where the fast allocation is order-3 steps and one
# final order-2 step, so no lower-order step enters the measured slope.
CONVERGENCE_NFE = np.array([24, 48, 96, 192])


@pytest.mark.parametrize(
    ("method", "order", "nfe_offset"),
    [
        ("singlestep_fixed", 1, 0),
        ("singlestep_fixed", 2, 0),
        ("singlestep_fixed", 3, 0),
        ("singlestep", 2, 0),
        ("singlestep", 3, -1),
        ("multistep", 1, 0),
        ("multistep", 2, 0),
        ("multistep", 3, 0),
        ("ddim", 1, 0),
    ],
)
def test_observed_convergence_order(ddpm_schedule, gaussian, exact_eps, method, order, nfe_offset):
    eps_fn = exact_eps(ddpm_schedule, gaussian)
    x_T = _noise(dtype=np.float64)
    t_end = ddpm_schedule.default_t_end
    exact = gaussian.flow(
        x_T,
        float(ddpm_schedule.alpha(1.0)), float(ddpm_schedule.sigma(1.0)),
        float(ddpm_schedule.alpha(t_end)), float(ddpm_schedule.sigma(t_end)),
    )
    errors = []
    for nfe in CONVERGENCE_NFE + nfe_offset:
        x = solve(
            eps_fn, x_T, ddpm_schedule,
            steps=int(nfe), order=order, method=method, spacing="time_quadratic",
        )
        errors.append(float(np.max(np.abs(x - exact))))

    slope = -np.polyfit(np.log(CONVERGENCE_NFE + nfe_offset), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.35, (slope, errors)
    assert errors[-1] < errors[0]



def _times_and_result(schedule, gaussian, exact_eps, **kwargs):
    times = []
    eps_fn = _recording(exact_eps(schedule, gaussian), times)
    result = solve(eps_fn, _noise(dtype=np.float64), schedule, **kwargs)
    return np.concatenate(times), result


@pytest.mark.parametrize("method", METHODS)
def test_reused_plan_gives_the_fresh_result(gaussian, exact_eps, method):
    # The second call on one schedule object reuses the cached plan; a new schedule builds it.
    from calibexport.runtime.schedule import DiscreteVPSchedule

    order = ORDERS_BY_METHOD[method][-1]
    schedule = DiscreteVPSchedule.linear()
    first = _times_and_result(schedule, gaussian, exact_eps, steps=12, order=order, method=method)
    second = _times_and_result(schedule, gaussian, exact_eps, steps=12, order=order, method=method)
    fresh = _times_and_result(DiscreteVPSchedule.linear(), gaussian, exact_eps, steps=12,
                              order=order, method=method)
    for a, b, c in zip(first, second, fresh):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_plan_cache_keys_and_bound(gaussian, exact_eps):
    from calibexport.runtime.schedule import DiscreteVPSchedule
    from calibexport.runtime.solvers import PLAN_CACHE_SIZE

    schedule = DiscreteVPSchedule.linear()
    settings = [dict(steps=steps, order=3, method="singlestep", t_end=t_end, spacing=spacing)
                for steps in (6, 7, 20) for t_end in (1e-3, 2e-3)
                for spacing in ("logSNR", "time_uniform", "time_quadratic")]
    for kwargs in settings + settings[:3]:
        times, result = _times_and_result(schedule, gaussian, exact_eps, **kwargs)
        fresh_times, fresh = _times_and_result(DiscreteVPSchedule.linear(), gaussian, exact_eps,
                                               **kwargs)
        np.testing.assert_array_equal(times, fresh_times)
        np.testing.assert_array_equal(result, fresh)
    assert len(schedule.__dict__["_solver_plans"]) == PLAN_CACHE_SIZE


def test_plan_cache_skips_objects_without_dict():
    from calibexport.runtime.solvers import _cached_plan

    class NoDict:
        __slots__ = ()

    builds = []

    def build():
        builds.append(1)
        return "plan"

    schedule = NoDict()
    assert _cached_plan(schedule, ("key",), build) == "plan"
    assert _cached_plan(schedule, ("key",), build) == "plan"
    assert len(builds) == 2


def test_plan_cache_under_threads(gaussian, exact_eps):
    from concurrent.futures import ThreadPoolExecutor

    from calibexport.runtime.schedule import DiscreteVPSchedule

    shared = DiscreteVPSchedule.linear()
    settings = [dict(steps=steps, order=order, method=method)
                for steps in range(4, 14) for order in (2, 3)
                for method in ("singlestep", "multistep")]

    def run(kwargs):
        return _times_and_result(shared, gaussian, exact_eps, **kwargs)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, settings * 2))
    for kwargs, (times, result) in zip(settings * 2, results):
        fresh_times, fresh = _times_and_result(DiscreteVPSchedule.linear(), gaussian, exact_eps,
                                               **kwargs)
        np.testing.assert_array_equal(times, fresh_times)
        np.testing.assert_array_equal(result, fresh)


def test_changed_schedule_attribute_drops_plans(gaussian, exact_eps):
    schedule = LinearVPSchedule()
    _times_and_result(schedule, gaussian, exact_eps, steps=6, order=3, method="singlestep")
    schedule.beta_1 = 10.0
    changed = _times_and_result(schedule, gaussian, exact_eps, steps=6, order=3,
                                method="singlestep")
    fresh = _times_and_result(LinearVPSchedule(beta_1=10.0), gaussian, exact_eps, steps=6,
                              order=3, method="singlestep")
    for a, b in zip(changed, fresh):
        np.testing.assert_array_equal(a, b)


def test_plan_cache_skips_class_objects():
    from calibexport.runtime.solvers import _cached_plan

    class AsSchedule:
        pass

    assert _cached_plan(AsSchedule, ("key",), lambda: "plan") == "plan"
    assert "_solver_plans" not in AsSchedule.__dict__
