"""Hyperparameter sweeps (gpulab/sweeps.py, the job service's SweepSpec): a grid is every combination in order, a
range a grid's evenly (or log-) spaced points, a random search the same draws for the same seed within bounds; a
malformed space is refused naming the field; a sweep is the job array of its trials, whose seed is fixed when
submitted; the best trial is the one with the best latest metric."""

import json
import math

import pytest
from pydantic import ValidationError

from gpulab import sweeps
from gpulab.kernels.sweeps import trial_params
from gpulab.services.jobs.models import JobSpec


def test_a_grid_is_every_combination_in_order():
    space = {"lr": [0.1, 0.01], "depth": {"low": 2, "high": 8, "int": True, "count": 4}}
    assert sweeps.check(space, "grid", None) == 8
    trials = sweeps.expand(space, "grid", None, None)
    assert trials[:4] == [{"lr": 0.1, "depth": d} for d in (2, 4, 6, 8)]
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 8


def test_range_points_are_evenly_or_log_spaced():
    linear = sweeps.expand({"x": {"low": 0, "high": 1, "count": 5}}, "grid", None, None)
    assert [t["x"] for t in linear] == [0, 0.25, 0.5, 0.75, 1]
    logs = [t["x"] for t in sweeps.expand({"x": {"low": 1e-4, "high": 1e-1, "log": True, "count": 4}}, "grid", None, 0)]
    assert logs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert (
        sweeps.check({"n": {"low": 1, "high": 3, "int": True, "count": 10}}, "grid", None) == 3
    )  # whole numbers, once


def test_a_random_search_draws_the_same_trials_for_the_same_seed_within_bounds():
    space = {
        "lr": {"low": 1e-5, "high": 1e-1, "log": True},
        "layers": {"low": 1, "high": 4, "int": True},
        "act": ["relu", "gelu"],
    }
    first = sweeps.expand(space, "random", 50, 7)
    assert first == sweeps.expand(space, "random", 50, 7) and first != sweeps.expand(space, "random", 50, 8)
    assert all(1e-5 <= t["lr"] <= 1e-1 and t["layers"] in (1, 2, 3, 4) and t["act"] in ("relu", "gelu") for t in first)
    assert len({t["layers"] for t in first}) == 4  # every whole number of the range is drawn
    assert min(math.log10(t["lr"]) for t in first) < -4 and max(math.log10(t["lr"]) for t in first) > -2  # log-uniform


@pytest.mark.parametrize(
    "space, strategy, trials, field, message",
    [
        ({}, "grid", None, "parameters", "give 1 to 32 parameters"),
        ({"1x": [1]}, "grid", None, "parameters.1x", "a parameter name is"),
        ({"x": []}, "grid", None, "parameters.x", "give 1 to 100 values"),
        ({"x": [[1]]}, "grid", None, "parameters.x", "values are numbers, strings"),
        ({"x": 3}, "grid", None, "parameters.x", "give a list of values or a range"),
        ({"x": {"low": 1, "high": 1, "count": 2}}, "grid", None, "parameters.x.low", "low must be less than high"),
        ({"x": {"low": 0, "high": 1, "log": True, "count": 2}}, "grid", None, "parameters.x.low", "needs low > 0"),
        ({"x": {"low": 0, "high": 1}}, "grid", None, "parameters.x.count", "a range in a grid needs count"),
        ({"x": {"low": 0, "high": 1, "step": 1}}, "random", 2, "parameters.x.step", "not a range setting"),
        ({"x": {"low": "a", "high": 1}}, "random", 2, "parameters.x.low", "give a finite number"),
        ({"x": {"low": 0, "high": 1, "count": 3}}, "random", 2, "parameters.x.count", "count is for a grid"),
        ({"x": [1, 2]}, "random", None, "trials", "a random search needs trials"),
        ({"x": [1, 2]}, "grid", 4, "trials", "give trials only with strategy random"),
        ({"a": list(range(30)), "b": list(range(30))}, "grid", None, "parameters", "900 combinations, more than 500"),
    ],
)
def test_a_malformed_space_is_refused_naming_the_field(space, strategy, trials, field, message):
    with pytest.raises(sweeps.SpaceError) as e:
        sweeps.check(space, strategy, trials)
    assert e.value.field == field and message in str(e.value)


def test_a_sweep_is_the_job_array_of_its_trials_and_keeps_its_seed():
    spec = JobSpec(name="s", entrypoint=["true"], sweep={"parameters": {"lr": [0.1, 0.01, 0.001]}, "max_concurrent": 2})
    assert (spec.array.count, spec.array.max_concurrent) == (3, 2)
    drawn = JobSpec(
        name="s",
        entrypoint=["true"],
        sweep={"parameters": {"x": {"low": 0, "high": 1}}, "strategy": "random", "trials": 4},
    )
    assert drawn.sweep.seed is not None  # chosen at submission
    stored = JobSpec.model_validate(drawn.model_dump(mode="json"))  # as the store reads it back
    assert stored.sweep.expand() == drawn.sweep.expand() and stored.array == drawn.array
    with pytest.raises(ValidationError, match="parameters.lr: give 1 to 100 values"):
        JobSpec(name="s", entrypoint=["true"], sweep={"parameters": {"lr": []}})
    with pytest.raises(ValidationError, match="max_concurrent: at most the 3 trials"):
        JobSpec(name="s", entrypoint=["true"], sweep={"parameters": {"lr": [1, 2, 3]}, "max_concurrent": 4})
    with pytest.raises(ValidationError, match="give either a sweep or an array"):
        JobSpec(name="s", entrypoint=["true"], sweep={"parameters": {"lr": [1, 2]}}, array={"count": 5})


def test_the_best_trial_has_the_best_latest_metric():
    trials = [
        {"id": "a", "metrics": {"loss": 0.5, "acc": 0.7}},
        {"id": "b", "metrics": {"loss": 0.2, "acc": 0.6}},
        {"id": "c", "metrics": {}},  # reported nothing yet
    ]
    assert sweeps.best(trials, "loss")["id"] == "b"
    assert sweeps.best(trials, "acc", "maximize")["id"] == "a"
    assert sweeps.best(trials, "f1") is None
    with pytest.raises(ValueError, match="goal must be minimize or maximize"):
        sweeps.best(trials, "loss", "lowest")


def test_a_trial_reads_its_parameters(monkeypatch):
    assert trial_params() == {}
    monkeypatch.setenv("GPULAB_TRIAL_PARAMS", '{"lr": 0.01}')
    assert trial_params() == {"lr": 0.01}


def test_the_sweep_magic_reads_params_and_ranges():
    from gpulab.kernels.client import GpulabError
    from gpulab.kernels.magics import _sweep_space

    assert _sweep_space(["lr=0.1,0.01", "act=relu,gelu"], ["depth=2:8:int:4", "wd=1e-5:1e-2:log"]) == {
        "lr": [0.1, 0.01],
        "act": ["relu", "gelu"],
        "depth": {"low": 2.0, "high": 8.0, "int": True, "count": 4},
        "wd": {"low": 1e-5, "high": 1e-2, "log": True},
    }
    for params, ranges, message in [
        (["lr"], [], "--param lr: give NAME=V1,V2"),
        ([], ["lr=a:b"], "--range lr=a:b: give NAME=LOW:HIGH"),
        ([], ["lr=1:2:cubic"], "'cubic' is not log, int or a number of points"),
        ([], [], "give the space to search"),
    ]:
        with pytest.raises(GpulabError, match=message):
            _sweep_space(params, ranges)
