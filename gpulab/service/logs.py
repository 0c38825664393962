"""How every gpulab service process logs: one format, INFO and up, tornado's access log only for problems."""

import logging

FORMAT = "[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
