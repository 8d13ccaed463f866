"""One log format for every service: time, service, level, message (to stderr)."""
from __future__ import annotations

import logging
import os


def setup_logging(service: str) -> logging.Logger:
    level = os.environ.get("HMI_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    return logging.getLogger(f"hmi.{service}")
