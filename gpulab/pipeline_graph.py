"""The graph of a pipeline's steps, once for the job service (which refuses a bad one with a 4xx naming it) and the
kernel-side client (which refuses it before anything is sent, even with no service to ask)."""

import re

MAX_STEPS = 64
CONDITIONS = ("afterok", "afternotok", "afterany")
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class GraphError(ValueError):
    """A pipeline whose steps cannot be ordered; ``field`` is where in the body (``steps``, ``steps.1.name``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def order(steps: list[tuple[str, list[str]]]) -> list[int]:
    """The indexes of ``steps`` (each its name and the names it needs) in an order in which every step comes after
    those it needs; refuses empty, too long, repeated or unknown names and cycles, naming them."""
    if not steps:
        raise GraphError("steps", "give a list of steps")
    if len(steps) > MAX_STEPS:
        raise GraphError("steps", f"{len(steps)} steps; a pipeline has at most {MAX_STEPS}")
    index: dict[str, int] = {}
    for i, (name, _) in enumerate(steps):
        if not isinstance(name, str) or not STEP_NAME.fullmatch(name):
            raise GraphError(f"steps.{i}.name", "give each step a name (letters, digits, _ . -)")
        if name in index:
            raise GraphError(f"steps.{i}.name", f"there are two steps named {name!r}")
        index[name] = i
    for i, (name, needs) in enumerate(steps):
        for need in needs:
            if need not in index:
                raise GraphError(
                    f"steps.{i}.needs", f"step {name!r} needs {need!r}, which is not a step of this pipeline"
                )
    done: list[int] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise GraphError("steps", f"{' -> '.join(cycle)} form a cycle")
        state[name] = "visiting"
        for need in steps[index[name]][1]:
            visit(need, [*path, name])
        state[name] = "done"
        done.append(index[name])

    for name in index:
        visit(name, [])
    return done
