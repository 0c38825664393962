"""Hyperparameter sweeps: a parameter space searched by grid or at random, each trial a job of one job array. Once
for the job service (which checks a submitted space, naming the field, and gives each trial its parameters) and the
kernel-side client (which picks the best trial); pure, no I/O.

A space maps each parameter name to a list of values (``{"lr": [0.1, 0.01]}``) or a range (``{"lr": {"low":
1e-4, "high": 1e-1, "log": true}}``, ``"int": true`` for whole numbers). A grid takes every combination, a range
in ``count`` evenly spaced points (log-spaced with ``log``); a random search draws ``trials`` combinations, with
``seed``, uniformly (log-uniformly with ``log``) from ranges and uniformly from lists.
"""

import itertools
import math
import random
import re

MAX_TRIALS = 500  # a job array's most jobs
MAX_PARAMETERS = 32
MAX_VALUES = 100
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
RANGE_KEYS = {"low", "high", "log", "int", "count"}


class SpaceError(ValueError):
    """A sweep that cannot run as written; ``field`` is where in the sweep (``parameters.lr.low``, ``trials``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check(parameters: dict, strategy: str, trials: int | None) -> int:
    """How many trials the sweep has; a :class:`SpaceError` naming the field when it cannot run."""
    if not isinstance(parameters, dict) or not 0 < len(parameters) <= MAX_PARAMETERS:
        raise SpaceError("parameters", f"give 1 to {MAX_PARAMETERS} parameters, each a list of values or a range")
    sizes = []
    for name, space in parameters.items():
        at = f"parameters.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SpaceError(at, "a parameter name is a letter or _, then letters, digits, _, . or - (64 at most)")
        if isinstance(space, list):
            if not 0 < len(space) <= MAX_VALUES:
                raise SpaceError(at, f"give 1 to {MAX_VALUES} values")
            if any(isinstance(v, dict | list) for v in space):
                raise SpaceError(at, "values are numbers, strings, booleans or null")
            sizes.append(len(space))
        elif isinstance(space, dict):
            sizes.append(_check_range(space, at, strategy))
        else:
            raise SpaceError(at, "give a list of values or a range {low, high[, log, int, count]}")
    if strategy == "grid":
        total = math.prod(sizes)
        if trials is not None:
            raise SpaceError("trials", "a grid runs every combination: give trials only with strategy random")
        if total > MAX_TRIALS:
            raise SpaceError("parameters", f"the grid has {total} combinations, more than {MAX_TRIALS}")
        return total
    if trials is None:
        raise SpaceError("trials", "a random search needs trials, how many combinations to draw")
    return trials


def _check_range(space: dict, at: str, strategy: str) -> int:
    if unknown := sorted(set(space) - RANGE_KEYS):
        raise SpaceError(f"{at}.{unknown[0]}", f"not a range setting (give {', '.join(sorted(RANGE_KEYS))})")
    for key in ("low", "high"):
        value = space.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SpaceError(f"{at}.{key}", "give a finite number")
    for key in ("log", "int"):
        if not isinstance(space.get(key, False), bool):
            raise SpaceError(f"{at}.{key}", "give true or false")
    if space["low"] >= space["high"]:
        raise SpaceError(f"{at}.low", f"low must be less than high ({space['low']} >= {space['high']})")
    if space.get("log") and space["low"] <= 0:
        raise SpaceError(f"{at}.low", "a log range needs low > 0")
    count = space.get("count")
    if strategy == "grid":
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_VALUES:
            raise SpaceError(f"{at}.count", f"a range in a grid needs count, 2 to {MAX_VALUES} points")
        return len(_points(space))
    if count is not None:
        raise SpaceError(f"{at}.count", "count is for a grid; a random search draws from the whole range")
    return 1


def _points(space: dict) -> list:
    low, high, count = space["low"], space["high"], space["count"]
    if space.get("log"):
        values = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (count - 1)) for i in range(count)]
    else:
        values = [low + (high - low) * i / (count - 1) for i in range(count)]
    if space.get("int"):
        return sorted({round(v) for v in values})
    return values


def expand(parameters: dict, strategy: str, trials: int | None, seed: int | None) -> list[dict]:
    """Every trial's parameters, in index order (the same every time for the same sweep and seed)."""
    if strategy == "grid":
        names = list(parameters)
        axes = [space if isinstance(space, list) else _points(space) for space in parameters.values()]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]
    rng = random.Random(seed)
    return [{name: _draw(rng, space) for name, space in parameters.items()} for _ in range(trials or 0)]


def _draw(rng: random.Random, space):
    if isinstance(space, list):
        return rng.choice(space)
    low, high = space["low"], space["high"]
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if space.get("log") else rng.uniform(low, high)
    return min(max(round(value), math.ceil(low)), math.floor(high)) if space.get("int") else value


def best(trials: list[dict], metric: str, goal: str = "minimize") -> dict | None:
    """Of ``trials`` (each ``{"params": ..., "metrics": ...}`` and more), the one whose latest ``metric`` is
    lowest (``goal`` minimize) or highest (maximize); None when no trial reported it."""
    if goal not in ("minimize", "maximize"):
        raise ValueError(f"goal must be minimize or maximize, not {goal!r}")
    scored = [t for t in trials if isinstance((t.get("metrics") or {}).get(metric), int | float)]
    if not scored:
        return None
    pick = min if goal == "minimize" else max
    return pick(scored, key=lambda t: t["metrics"][metric])
