"""``python -m gpulab.services.mlflow``: see :mod:`gpulab.services.mlflow`."""

from .app import MLflowApp

MLflowApp.launch_instance()
