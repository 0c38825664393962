import asyncio
import sys

from ...errors import ConfigError
from .app import main

try:
    asyncio.run(main())
except ConfigError as e:
    sys.exit(f"gpulab-infer: {e}")
