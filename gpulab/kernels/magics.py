"""IPython magics: ``%%train``/``%train``, ``%preprocess``, ``%notebook``, ``%schedule``, ``%schedules``, ``%jobs``, ``%job``, ``%logs``, ``%cancel``,
``%deploy``, ``%infer``.

Wrong options and failed calls print one line (argparse style) to stderr and return None:
never a traceback.
"""

import argparse
import functools
import json
import os
import shlex
import sys

from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.display import display

from ..inference.triton import BACKENDS
from ..job_states import JOB_STATES
from . import sweeps
from .client import GpulabError, default_client, job_spec, notebook_spec
from .widgets import Monitor


class _Stop(Exception):
    """Parsing ended: an option error (the message) or ``--help`` (no message)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Stop(f"{self.prog}: error: {message} (see {self.prog}?)")

    def exit(self, status=0, message=None):
        raise _Stop(message)


def _reporting(prog: str, call):
    """``call()``; option and gpulab errors are printed as one line and give None."""
    try:
        return call()
    except _Stop as stop:
        if stop.args[0]:
            print(stop.args[0].strip(), file=sys.stderr, flush=True)
    except GpulabError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
    return None


def _one_line(func):
    """A magic whose line is shell-like options: ``func(self, prog, argv, cell)``, errors as one line."""

    @functools.wraps(func)
    def wrapper(self, line, cell=None):
        prog = f"%{'%' * (cell is not None)}{func.__name__}"
        return _reporting(prog, lambda: func(self, prog, shlex_split(prog, line), cell))

    return wrapper


def _one_line_raw(func):
    """A magic that takes its line as it is (a Python expression): ``func(self, prog, line)``."""

    @functools.wraps(func)
    def wrapper(self, line):
        prog = f"%{func.__name__}"
        return _reporting(prog, lambda: func(self, prog, line))

    return wrapper


def shlex_split(prog: str, line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise _Stop(f"{prog}: error: {exc}") from None


def _job_parser(prog: str, cell: bool, program: bool = True, follow: bool = True) -> _Parser:
    """The options every job takes; ``program``: and a script with its arguments where there is no cell;
    ``follow``: --wait and --no-monitor."""
    parser = _Parser(prog=prog, description="Submit a job; returns its handle and shows its live monitor.")
    parser.add_argument("--gpus", type=int, default=0, metavar="N")
    parser.add_argument("--cpus", type=float, default=1.0, metavar="N")
    parser.add_argument("--memory", metavar="M", help="e.g. 4Gi")
    parser.add_argument("--pool", default="default", metavar="P")
    parser.add_argument("--group", metavar="G", help="the group (one of yours) whose cohort quota the job uses")
    parser.add_argument(
        "--preemptible",
        action="store_true",
        help="may be preempted and requeued; checkpoint to gpulab.checkpoint_dir() on SIGTERM",
    )
    parser.add_argument("--experiment", metavar="E", help="MLflow experiment (default: the job name)")
    parser.add_argument("--name", metavar="N")
    parser.add_argument("--priority", type=int, default=0, metavar="P", help="-100..100")
    parser.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="ID[:COND]",
        help="start after this job: it must succeed, or :afternotok (fail) or :afterany (end); repeatable",
    )
    parser.add_argument(
        "--array",
        metavar="N[%M]",
        help="a job array of N jobs, each with its GPULAB_ARRAY_INDEX (0..N-1), at most M at once (Slurm's %%M)",
    )
    if follow:
        parser.add_argument("--wait", action="store_true", help="block until the job ends")
        parser.add_argument("--no-monitor", dest="monitor", action="store_false", help="do not show the monitor")
    if program and not cell:
        parser.add_argument("script", nargs="?", help="a Python file; options go before it")
        parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return parser


def _notebook_parser(prog: str) -> _Parser:
    parser = _job_parser(prog, cell=False, program=False)
    parser.description = "Run a notebook as a job with papermill; returns its handle and shows its live monitor."
    parser.add_argument("notebook", help="the notebook to run (.ipynb)")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter, as papermill's -p: True/False/None, numbers, else a string",
    )
    parser.add_argument("--kernel", metavar="K", help="kernel spec (default: the notebook's)")
    parser.add_argument("--output", metavar="PATH", help="the executed notebook (default: beside it)")
    parser.add_argument("--html", action="store_true", help="also an HTML copy of the executed notebook")
    parser.add_argument(
        "--files",
        action="append",
        default=[],
        metavar="PATH",
        help="a file or folder of the notebook's folder to copy with it ('.': all of it); the job runs in the copy",
    )
    return parser


def parameter_value(text: str):
    """A ``-p`` value as papermill's command line reads one: True, False, None, an int, a float, else the text."""
    constants = {"True": True, "False": False, "None": None}
    if text in constants:
        return constants[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _id_parser(prog: str, **flags) -> _Parser:
    parser = _Parser(prog=prog)
    parser.add_argument("id", help="a job id, or a unique prefix as %%jobs shows")
    for flag, kwargs in flags.items():
        parser.add_argument(flag, **kwargs)
    return parser


def _fields(args) -> dict:
    """The job fields of :func:`_job_parser`'s options."""
    return {
        "depends_on": _dependencies(args.after),
        "name": args.name,
        "gpus": args.gpus,
        "cpus": args.cpus,
        "memory": args.memory,
        "pool": args.pool,
        "experiment": args.experiment,
        "priority": args.priority,
        "array": _array(args),
        **({"group": args.group} if args.group else {}),
        **({"preemptible": True} if args.preemptible else {}),
    }


def _array(args) -> dict | None:
    """``--array N[%M]`` as the job's ``array``."""
    if args.array is None:
        return None
    count, _, limit = args.array.partition("%")
    if not count.isdigit() or (limit and not limit.isdigit()):
        raise GpulabError(f"--array {args.array}: give N or N%M (N jobs, at most M at once), e.g. --array 20%4")
    return {"count": int(count), "max_concurrent": int(limit) if limit else None}


def _sweep_space(params: list[str], ranges: list[str]) -> dict:
    """``--param NAME=V1,V2`` (each value JSON if it reads as JSON, else a string) and ``--range
    NAME=LOW:HIGH[:log][:int][:N]`` as a sweep's parameters."""
    space: dict = {}
    for item in params:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise GpulabError(f"--param {item}: give NAME=V1,V2,... e.g. --param lr=0.1,0.01")
        space[name] = [_value(v) for v in values.split(",")]
    for item in ranges:
        name, sep, spec = item.partition("=")
        parts = spec.split(":")
        try:
            low, high = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise GpulabError(
                f"--range {item}: give NAME=LOW:HIGH[:log][:int][:N], e.g. --range lr=1e-4:1e-1:log"
            ) from None
        if not sep:
            raise GpulabError(f"--range {item}: give NAME=LOW:HIGH")
        space[name] = {"low": low, "high": high}
        for flag in parts[2:]:
            if flag in ("log", "int"):
                space[name][flag] = True
            elif flag.isdigit():
                space[name]["count"] = int(flag)
            else:
                raise GpulabError(f"--range {item}: {flag!r} is not log, int or a number of points")
    if not space:
        raise GpulabError("give the space to search: --param NAME=V1,V2,... or --range NAME=LOW:HIGH")
    return space


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dependencies(after: list[str]) -> list[tuple[str, str]]:
    """``--after ID[:CONDITION]`` as (job id, condition); a short id as ``%jobs`` shows it is looked up."""
    dependencies = []
    for item in after:
        job, _, condition = item.partition(":")
        dependencies.append((default_client().get(job).id, condition or "afterok"))
    return dependencies


def _launch(spec: dict, args):
    """Submit ``spec``, show its monitor (or a line) and, with ``--wait``, wait for its end."""
    client = default_client()
    job = client.submit(spec)
    if array := job.data.get("array"):  # one submission, many jobs: a line, and with --wait all of them
        limit = array["max_concurrent"] or "all"
        print(f"submitted job array {array['id']} ({job.name}): {array['count']} jobs, {limit} at once", flush=True)
        if args.wait:
            members = client.list(array=array["id"], limit=array["count"])
            for member in members:
                member.wait(raise_on_failure=False)
            print(members, flush=True)
        return job
    monitor = Monitor(job) if args.monitor else None
    if monitor:
        display(monitor)
    else:
        print(f"submitted job {job.id} ({job.name}): {job.state}", flush=True)
    if args.wait:
        try:
            job.wait(raise_on_failure=False)
        except KeyboardInterrupt:
            print(f"stopped waiting; job {job.id} goes on (%cancel {job.id[:8]} stops it)", file=sys.stderr)
            return job
        if monitor:
            monitor.join(10)  # the monitor shows the final state before the cell ends
        else:
            print(f"job {job.id} {job.state}", flush=True)
        job.wait()  # ended: raises JobFailed unless it succeeded
    return job


@magics_class
class GpulabMagics(Magics):
    """Train, preprocess and follow jobs on the gpulab job service."""

    def _submit(self, kind: str, prog: str, argv: list[str], cell: str | None):
        parser = _job_parser(prog, cell is not None)
        args = parser.parse_args(argv)
        if cell is None and not args.script:
            parser.error(f"give the script to run: {prog} [options] script.py [args...]")
        fields = {**_fields(args), "kind": kind, "working_dir": os.getcwd()}
        if cell is not None:
            if kind == "preprocess":
                cell = "from gpulab.kernels.rapids import activate as _a; print(_a()); del _a\n" + cell
            spec = job_spec(source=cell, **fields)
        else:
            runner = ["-m", "gpulab.kernels.rapids"] if kind == "preprocess" else []
            spec = job_spec(entrypoint=["python", *runner, args.script, *args.args], **fields)
        return _launch(spec, args)

    @line_cell_magic
    @_one_line
    def train(self, prog, argv, cell=None):
        """Submit a training job: ``%%train [options]`` runs the cell's code; ``%train [options] script.py
        [args...]`` runs a file. Both run in the notebook's working directory. Options: --gpus N, --cpus N,
        --memory M, --pool P, --group G, --preemptible, --experiment E, --name N, --priority P, --wait,
        --no-monitor.
        Returns the job (``job = %train ...``)."""
        return self._submit("train", prog, argv, cell)

    @line_cell_magic
    @_one_line
    def sweep(self, prog, argv, cell=None):
        """Submit a hyperparameter sweep, a job per trial: ``%sweep --param lr=0.1,0.01 --param batch=16,64
        train.py`` (a grid), ``--range lr=1e-4:1e-1:log`` (``:int``, ``:N`` points in a grid), ``--strategy random
        --trials 20 [--seed S]``, ``--max-concurrent M``, and the options of ``%train``. Each trial reads its
        parameters with ``gpulab.trial_params()``. Returns the sweep (``s = %sweep ...``; ``s.best("loss")``)."""
        parser = _job_parser(prog, cell is not None)
        parser.description = "Submit a hyperparameter sweep: a job array, a job per trial."
        parser.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...")
        parser.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH[:log][:int][:N]")
        parser.add_argument("--strategy", choices=("grid", "random"), default="grid")
        parser.add_argument("--trials", type=int, metavar="N", help="random: how many combinations to draw")
        parser.add_argument("--seed", type=int, metavar="S")
        parser.add_argument("--max-concurrent", type=int, metavar="M", help="trials running at once at most")
        args = parser.parse_args(argv)
        if cell is None and not args.script:
            parser.error(f"give the script to run: {prog} [options] script.py [args...]")
        if args.array:
            parser.error("a sweep is its own job array: give --max-concurrent, not --array")
        fields = {**_fields(args), "array": None, "kind": "train", "working_dir": os.getcwd()}
        program = {"source": cell} if cell is not None else {"entrypoint": ["python", args.script, *args.args]}
        found = sweeps.sweep(
            _sweep_space(args.param, args.range),
            strategy=args.strategy,
            trials=args.trials,
            seed=args.seed,
            max_concurrent=args.max_concurrent,
            **program,
            **fields,
        )
        limit = found.array["max_concurrent"] or "all"
        print(f"submitted sweep {found.id}: {found.array['count']} trials, {limit} at once", flush=True)
        if args.wait:
            print(found.wait(), flush=True)
        return found

    @line_cell_magic
    @_one_line
    def preprocess(self, prog, argv, cell=None):
        """Submit a preprocessing job (like ``%train``): pandas in it is cudf.pandas when its node has a GPU."""
        return self._submit("preprocess", prog, argv, cell)

    @line_magic
    @_one_line
    def notebook(self, prog, argv, cell=None):
        """Run a notebook as a job: ``%notebook [options] path.ipynb -p lr 0.01 -p epochs 5``, with papermill (the
        parameters go after its cell tagged ``parameters``), in the notebook's folder. Options as ``%train``, and
        --kernel K, --output PATH, --html, --files PATH (copied with it; the job runs in the copy). The executed
        notebook is ``job.output_notebook``."""
        args = _notebook_parser(prog).parse_args(argv)
        fields = _fields(args)
        parameters = {name: parameter_value(value) for name, value in args.parameter}
        spec = notebook_spec(
            args.notebook,
            parameters,
            kernel=args.kernel,
            output=args.output,
            html=args.html,
            files=args.files,
            **fields,
        )
        return _launch(spec, args)

    @line_magic
    @_one_line
    def schedule(self, prog, argv, cell=None):
        """Run a job on a schedule, kept by the job service: ``%schedule "0 3 * * *" [--timezone TZ]
        [--max-concurrent N] [--overlap skip|queue] [--catch-up once|skip] [job options] script.py [args...]``, or
        ``... --notebook report.ipynb -p day 1``. Returns the schedule."""
        from .schedules import schedule

        parser = _job_parser(prog, cell=False, follow=False)
        parser.usage = f'{prog} "CRON" [options] (script.py [args...] | --notebook PATH [-p NAME VALUE]...)'
        parser.description = (
            'Run a job at the times of CRON (five fields, quoted: "0 3 * * *", or @hourly, @daily, ...), '
            "whether or not your server is up."
        )
        parser.add_argument("--timezone", default="UTC", metavar="TZ", help="IANA zone, e.g. Europe/Berlin")
        parser.add_argument("--max-concurrent", type=int, default=1, metavar="N")
        parser.add_argument("--overlap", choices=("skip", "queue"), default="skip")
        parser.add_argument("--catch-up", choices=("once", "skip"), default="once")
        parser.add_argument("--notebook", metavar="PATH", help="run this notebook (papermill) instead of a script")
        parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
        if not argv or argv[0].startswith("-"):
            parser.parse_args(argv)  # --help, or what is wrong with the options
            parser.error('give the cron expression first, quoted: %schedule "0 3 * * *" [options] script.py')
        cron, args = argv[0], parser.parse_args(argv[1:])
        if (args.notebook is None) == (args.script is None):
            parser.error("give a script to run or --notebook PATH (one of them)")
        settings = {
            "timezone": args.timezone,
            "max_concurrent": args.max_concurrent,
            "overlap": args.overlap,
            "catch_up": args.catch_up,
        }
        if args.notebook:
            parameters = {name: parameter_value(value) for name, value in args.parameter}
            return schedule(cron, notebook=args.notebook, parameters=parameters, **settings, **_fields(args))
        entrypoint = ["python", args.script, *args.args]
        return schedule(cron, entrypoint=entrypoint, working_dir=os.getcwd(), **settings, **_fields(args))

    @line_magic
    @_one_line
    def schedules(self, prog, argv, cell=None):
        """List your schedules: ``%schedules [--all]`` (``--all``: everyone's, admins only)."""
        from .schedules import schedules

        parser = _Parser(prog=prog)
        parser.add_argument("--all", action="store_true")
        display(schedules(all=parser.parse_args(argv).all))

    @line_magic
    @_one_line
    def jobs(self, prog, argv, cell=None):
        """List your jobs: ``%jobs [--all] [--state S] [--limit N]`` (``--all``: everyone's, admins only)."""
        parser = _Parser(prog=prog)
        parser.add_argument("--all", action="store_true")
        parser.add_argument("--state", choices=JOB_STATES)
        parser.add_argument("--limit", type=int, default=50)
        args = parser.parse_args(argv)
        display(default_client().list(state=args.state, all=args.all, limit=args.limit))

    @line_magic
    @_one_line
    def job(self, prog, argv, cell=None):
        """Show a job's live monitor: ``%job ID``."""
        display(Monitor(default_client().get(_id_parser(prog).parse_args(argv).id)))

    @line_magic
    @_one_line
    def logs(self, prog, argv, cell=None):
        """Print a job's log: ``%logs ID [--tail N] [--follow]`` (``--follow``: until the job ends)."""
        args = _id_parser(
            prog, **{"--tail": {"type": int, "metavar": "N"}, "--follow": {"action": "store_true"}}
        ).parse_args(argv)
        client = default_client()
        job = client.get(args.id)
        if not args.follow:
            print(client.logs(job.id, args.tail), end="", flush=True)
            return
        try:
            for text in client.follow(job.id):
                print(text, end="", flush=True)
        except KeyboardInterrupt:
            pass

    @line_magic
    @_one_line
    def cancel(self, prog, argv, cell=None):
        """Cancel a queued or running job: ``%cancel ID``."""
        job = default_client().get(_id_parser(prog).parse_args(argv).id).cancel()
        print(f"job {job.id} ({job.name}): {job.state}", flush=True)

    @line_magic
    @_one_line
    def deploy(self, prog, argv, cell=None):
        """Serve an MLflow model: ``%deploy SOURCE --name N [--backend B]``; SOURCE is runs:/<run_id>/model,
        models:/<name>/<version> or a run id. Returns the model (``model = %deploy ...``)."""
        parser = _Parser(prog=prog)
        parser.add_argument("source", help="runs:/<run_id>/model, models:/<name>/<version> or a run id")
        parser.add_argument("--name", required=True, metavar="N")
        parser.add_argument("--backend", choices=list(BACKENDS))
        args = parser.parse_args(argv)
        from .inference import default_client as inference_client  # tritonclient loads on first use

        return inference_client().deploy(args.source, args.name, args.backend)

    @line_magic
    @_one_line_raw
    def infer(self, prog, line):
        """Call a deployed model: ``%infer MODEL EXPRESSION``, the expression (evaluated in the notebook) giving
        the input array, or a dict of them. Returns ``{output: array}`` (``y = %infer digits X[:5]``)."""
        model, _, expression = line.strip().partition(" ")
        if not model or not expression.strip():
            raise _Stop(f"{prog}: error: give the model and the input: {prog} MODEL EXPRESSION")
        try:
            inputs = eval(expression, self.shell.user_ns)  # the user's own code, in their kernel
        except Exception as exc:  # noqa: BLE001 - any error in the expression is the user's to fix
            raise _Stop(f"{prog}: error: {expression.strip()}: {type(exc).__name__}: {exc}") from None
        from .inference import default_client as inference_client

        return inference_client().infer(model, inputs)
