"""``gpulab-infer``: Triton's gRPC protocol (KServe v2) with hub-token auth, per-model scopes and allow-lists,
least-outstanding-requests load balancing over health-checked replicas, a circuit breaker per replica,
safe retries, ``traceparent`` propagation and Prometheus metrics. See docs/inference.md."""
