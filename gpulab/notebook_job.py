"""A notebook job's program: ``python -m gpulab.notebook_job <notebook.ipynb>``, under :mod:`gpulab.runner`.

The notebook (the snapshot taken when the job was submitted) runs top to bottom with papermill, its parameters
injected after the cell tagged ``parameters`` as papermill does; what to run comes from ``$GPULAB_NOTEBOOK_JOB``
(JSON: ``parameters``, ``kernel``, ``output``, ``formats``), in the job's own environment rather than its argv,
which every account on the node can read. The executed notebook is written to ``output`` as it runs, so that a
failed or cancelled run leaves the cells that ran; with ``"html"`` in ``formats`` an HTML copy goes beside it.
Both, and the parameters, go to the job's MLflow run (``MLFLOW_RUN_ID``, set by the runner) when there is one.

A cell that raises ends the job (exit 1) with one line naming the cell and its error, the last line of the log.
"""

import json
import os
import sys
from pathlib import Path

from .reporting import warn

ENV_VAR = "GPULAB_NOTEBOOK_JOB"


def default_kernel(notebook: Path) -> str:
    """The kernel spec the notebook names, else python3 (a notebook saved without metadata names none)."""
    spec = json.loads(notebook.read_text()).get("metadata", {}).get("kernelspec") or {}
    return spec.get("name") or "python3"


def execute(notebook: Path, output: Path, parameters: dict, kernel: str) -> str | None:
    """Run ``notebook`` into ``output``; None when every cell ran, else the line that says which cell failed."""
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from papermill.exceptions import PapermillExecutionError

    try:  # the kernel's language (papermill writes the parameters in it), which a notebook need not name
        language = KernelSpecManager().get_kernel_spec(kernel).language
    except NoSuchKernel:
        return f"there is no kernel spec {kernel!r} where the job runs (jupyter kernelspec list shows those there)"
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name=kernel,
            language=language,
            cwd=os.getcwd(),
            progress_bar=False,
            log_output=True,
        )
    except PapermillExecutionError as e:
        count = f", execution count {e.exec_count}" if e.exec_count else ""
        return f"cell {e.cell_index + 1}{count} raised {e.ename}: {e.evalue}"
    return None


def to_html(output: Path) -> Path:
    """An HTML copy of the executed notebook beside it (nbconvert's lab template)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(output), as_version=4))
    html = output.with_suffix(".html")
    html.write_text(body)
    return html


def log_to_mlflow(parameters: dict, files: list[Path]) -> None:
    """The parameters as the run's params and the notebooks as its artifacts (under ``notebook/``)."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    import mlflow

    with mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]):
        if parameters:
            mlflow.log_params({name: json.dumps(value) for name, value in parameters.items()})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="notebook")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.environ.get(ENV_VAR):
        print(f"usage: {ENV_VAR}='{{...}}' python -m gpulab.notebook_job <notebook.ipynb>", file=sys.stderr)
        return 2
    notebook = Path(argv[0])
    job = json.loads(os.environ[ENV_VAR])
    output = Path(job["output"])
    parameters = job.get("parameters") or {}
    kernel = job.get("kernel") or default_kernel(notebook)
    print(f"gpulab: running {job.get('path', notebook)} on kernel {kernel} into {output}", flush=True)
    failure = execute(notebook, output, parameters, kernel)
    files = [output] if output.exists() else []
    if files and "html" in job.get("formats", []):
        try:
            files.append(to_html(output))
        except Exception as exc:  # noqa: BLE001 - the executed notebook is what matters; say why there is no copy
            warn(f"gpulab: no HTML copy of {output} ({type(exc).__name__}: {exc})")
    try:
        log_to_mlflow(parameters, files)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warn(f"gpulab: logging the notebook to MLflow failed ({type(exc).__name__}: {exc}); carrying on")
    if failure:
        print(f"gpulab: the notebook failed: {failure}; the cells that ran are in {output}", file=sys.stderr)
        return 1
    print(f"gpulab: the notebook ran; its outputs are in {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
