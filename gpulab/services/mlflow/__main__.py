"""``python -m gpulab.services.mlflow``: see :mod:`gpulab.services.mlflow`."""

from . import main

main()
