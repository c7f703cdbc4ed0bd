"""Logging set-up: one line per event, UTC timestamps, thread name; library chatter kept quiet.

pynetdicom logs datasets at DEBUG, which would put patient attributes in the log, so its
logger is held at WARNING whatever the node's level.
"""

from __future__ import annotations

import logging
import sys
import time


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(threadName)s %(name)s: %(message)s",
                                  "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "pydicom", "alembic", "sqlalchemy", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
