"""Rules on text that comes from users and ends up in names, paths, headers or logs."""

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""ASCII control characters: none may be in a name (job, pool, model), where they would break logs, headers and
the nginx data plane's paths."""
