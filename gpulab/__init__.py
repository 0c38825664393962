"""gpulab: a Jupyter-centric platform for GPU machine learning."""

__version__ = "0.1.0"


def progress(step: int, total: int | None = None, **metrics) -> None:
    """Report a running job's progress and metrics (to the job service, MLflow and W&B)."""
    from .reporting import progress as report

    report(step, total, **metrics)
