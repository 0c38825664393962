"""The parts every gpulab REST API is built from, so that each answers, fails and is configured the same way.

- :mod:`.app`: :class:`~.app.ServiceApp`, the one shape of a service process (config read once, settings checked,
  logging, tracing, signals), and :class:`~.app.HubEnvironment`, what JupyterHub tells it;
- :mod:`.errors`: :class:`~.errors.APIError`, the one error body, and the one table between gRPC status codes
  and HTTP statuses (the nginx data plane's Lua reads it too);
- :mod:`.handlers`: :class:`~.handlers.JSONAPIMixin`, the one ``write_error`` and JSON/pydantic plumbing of
  tornado handlers (the job service, the inference gateway's APIs, the MLflow proxy, the server extension), and
  the base handlers of hub services (:class:`~.handlers.ServiceHandler`, :class:`~.handlers.HubUserHandler`);
- :mod:`.client`: :class:`~.client.HubServiceClient`, the one client of the hub services, for kernels (blocking)
  and users' servers (forwarding on the event loop);
- :mod:`.http_methods`: the ``Allow`` header of every 405;
- :mod:`.storage`: how every gpulab database's engine is made, how time is stored, its one migration history
  (:class:`~.storage.Schema`), the thread its calls run on;
- :mod:`.supervisor`: the one way a service keeps its child processes running;
- :mod:`.logs` and :mod:`.loop_lag`: how every service logs, and the measure of a stalled event loop.
"""
