"""The policy evaluation protocol (curtail.policy_eval): tune periods never overlap evaluation
periods, budgets fit the windows, the tuned setting comes from the tune periods, and the table's
figures are the runs' own."""

from __future__ import annotations

import pytest

from curtail.cli import main
from curtail.policy_eval import (
    DATASETS,
    evaluate,
    evaluate_period,
    period_budget,
    tune_budget_price,
)


def _span(period):
    return period[0] or "", period[1] or "9999"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_tune_and_evaluation_periods_never_overlap(name):
    dataset = DATASETS[name]
    assert dataset.evaluate
    for tuned in dataset.tune:
        for evaluated in dataset.evaluate:
            (a0, a1), (b0, b1) = _span(tuned), _span(evaluated)
            assert a1 <= b0 or b1 <= a0, (tuned, evaluated)


def test_a_period_is_evaluated_against_the_threshold_policy_and_the_windows_only_bound():
    dataset = DATASETS["caiso"]
    period = dataset.evaluate[0]
    budget = period_budget(dataset, period, 0.5)
    result = evaluate_period(dataset, period, seeds=1, budget_fraction=0.5, budget_price=65.0)
    assert result["token_budget"] == budget > 0
    rows = result["policies"]
    assert {"threshold", "forecast", "budget", "budget-tuned", "oracle"} <= set(rows)
    assert rows["threshold"]["capture"] == 0.0 and all(row["completed"] for row in rows.values())
    bound = rows["threshold"]["windows_only_bound_kg"]
    for row in rows.values():  # every run meets a budget its windows hold twice over, above the bound
        assert row["emissions_kg"] >= bound * (1 - 1e-9)
        assert row["over_bound"] == pytest.approx(row["emissions_kg"] / bound)
    assert rows["oracle"]["capture"] > 0.9  # measured: 0.98
    assert rows["oracle"]["capture_of_oracle_run"] == pytest.approx(1.0)
    threshold, oracle = rows["threshold"]["emissions_kg"], rows["oracle"]["emissions_kg"]
    for row in rows.values():
        assert row["capture_of_oracle_run"] == pytest.approx((threshold - row["emissions_kg"]) / (threshold - oracle))


def test_the_tuned_price_is_chosen_on_the_tune_periods_only():
    dataset = DATASETS["caiso"]
    price = tune_budget_price(dataset, seeds=1, budget_fraction=0.5, prices=(50.0, 200.0))
    assert price == 50.0  # at 200 g the price never binds: the threshold's windows, dirtier
    assert tune_budget_price(DATASETS["paper"], seeds=1, budget_fraction=0.5) is None  # no past to tune on


def test_the_command_prints_the_table_and_refuses_unknown_datasets(capsys):
    assert main(["evaluate-policies", "--datasets", "paper", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| paper | whole trace | threshold |" in out and "| paper | whole trace | oracle |" in out
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        evaluate(["nope"])
