"""Where the CLI and the local tools find their credential and where `hmi up` keeps the ones it makes."""
from __future__ import annotations

import os
from pathlib import Path

from services.common.config import env

ADMIN_TOKEN_FILE = "admin.token"           # in HMI_DATA_DIR, mode 0600, made by `hmi up` on first start
SERVICE_SECRET_FILE = "service.secret"     # likewise: the secret the services share


def cli_token(explicit: str | None = None) -> str | None:
    """--token, else HMI_TOKEN, else HMI_ADMIN_TOKEN, else the admin token `hmi up` wrote into HMI_DATA_DIR (the
    CLI on the deployment's own machine needs no extra step)."""
    if explicit:
        return explicit.strip()
    for name in ("HMI_TOKEN", "HMI_ADMIN_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    try:
        return (Path(env("HMI_DATA_DIR")) / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
