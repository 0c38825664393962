"""Hub-managed services: the training job queue, MLflow tracking, the inference gateway."""
