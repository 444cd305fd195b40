"""The evaluation grid: real NFE, shared sample sets and option parsing."""

from __future__ import annotations

import pytest

from calibexport.errors import CalibexportError
from calibexport.evaluation.plan import (
    PAPER_NFES,
    PAPER_ORDERS,
    SolverConfig,
    network_evaluations,
    parse_int_list,
    parse_settings,
    plan_configs,
    unique_sample_sets,
)


@pytest.mark.parametrize(
    ("order", "nfe", "actual"),
    [(1, 10, 10), (2, 15, 14), (3, 10, 9), (3, 20, 18), (3, 25, 24), (3, 30, 30), (2, 35, 34)],
)
def test_fixed_real_nfe_is_order_times_floor(order, nfe, actual):
    config = SolverConfig("fixed", order, nfe)
    assert config.actual_nfe == actual
    assert config.method == "singlestep_fixed"
    assert config.step_orders == (order,) * (nfe // order)


def test_fast_allocation_spends_requested_nfe():
    for order in PAPER_ORDERS:
        for nfe in PAPER_NFES:
            config = SolverConfig("fast", order, nfe)
            assert config.actual_nfe == nfe
            assert sum(config.step_orders) == nfe


def test_sample_key_names_step_orders():
    assert SolverConfig("fixed", 3, 20).sample_key == "singlestep-3x6"
    assert SolverConfig("fast", 3, 20).sample_key == "singlestep-3x6-2x1"
    assert SolverConfig("fast", 3, 21).sample_key == "singlestep-3x6-2x1-1x1"


def test_identical_allocations_share_samples():
    configs = plan_configs(("fixed", "fast"), PAPER_ORDERS, PAPER_NFES)
    unique = unique_sample_sets(configs)
    assert len(configs) == 42
    # Order 1 (7 NFE) and order 2 at even NFE (10, 20, 30, 40) coincide in both allocations.
    assert len(unique) == 42 - 7 - 4
    assert unique["singlestep-1x10"].setting == "fixed"
    assert SolverConfig("fast", 2, 20).sample_key == SolverConfig("fixed", 2, 20).sample_key


def test_network_evaluations_counts_distinct_sets():
    configs = plan_configs(("fixed",), (1, 3), (10, 20))
    # 10 + 20 + 9 + 18 evaluations per sample, 2 variants, 5 samples, 3 seeds
    assert network_evaluations(configs, 5, 3) == 57 * 2 * 5 * 3
    assert network_evaluations(configs, 5, 3, variants=1) == 57 * 5 * 3


def test_parse_lists():
    assert parse_int_list("10, 20,30", "nfe") == (10, 20, 30)
    assert parse_settings("fixed,fast") == ("fixed", "fast")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: parse_int_list("10,x", "nfe"), "--nfe '10,x' is invalid"),
        (lambda: parse_int_list(",", "seeds"), "--seeds is empty"),
        (lambda: parse_settings("fixed,slow"), "--settings 'fixed,slow' is invalid"),
        (lambda: plan_configs(("fixed",), (4,), (10,)), "order 4 is invalid"),
        (lambda: plan_configs(("fixed",), (1,), (0,)), "NFE 0 is invalid"),
        (lambda: plan_configs(("slow",), (1,), (10,)), "unknown setting 'slow'"),
    ],
)
def test_invalid_options_are_rejected(call, match):
    with pytest.raises(CalibexportError, match=match):
        call()
