"""gpulab: a Jupyter-centric platform for GPU machine learning."""

__version__ = "0.1.0"
