"""User lifecycle events: emitted by the hub into an outbox, delivered at least once
to subscribing services, applied there idempotently by event id.

- :mod:`gpulab.events.outbox` — hub side: validate, emit and store events.
- :mod:`gpulab.events.delivery` — hub side: POST pending events to subscribers.
- :mod:`gpulab.events.subscriber` — service side: authenticate, validate, apply once.
"""

from pathlib import Path

SCHEMA_ID = "https://events.gpulab.dev/user/lifecycle"
SCHEMA_PATH = Path(__file__).with_name("user.schema.yaml")
