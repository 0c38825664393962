"""``gpulab-jobs``: a persistent, quota- and GPU-aware training job queue behind JupyterHub."""
