"""Secrets come from files (compose and Kubernetes mount them) or environment variables, never from command
lines (which `ps` shows to every user of the machine). `hmi up` writes the ones it makes with mode 0600."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

MIN_SECRET_CHARS = 16


def read_secret(value_env: str, file: str | None, what: str) -> str | None:
    """The secret in `file` (surrounding whitespace dropped), else in the environment variable `value_env`."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise SystemExit(f"cannot read the {what} from {file}: {error.strerror}") from None
        if len(text) < MIN_SECRET_CHARS:
            raise SystemExit(f"the {what} in {file} is shorter than {MIN_SECRET_CHARS} characters")
        return text
    value = os.environ.get(value_env, "").strip()
    if value and len(value) < MIN_SECRET_CHARS:
        raise SystemExit(f"{value_env} is shorter than {MIN_SECRET_CHARS} characters")
    return value or None


def ensure_secret_file(path: Path) -> tuple[str, bool]:
    """The secret in `path`, made (32 random bytes, mode 0600, created so that it is never readable by others)
    when the file does not exist; returns it and whether it was made now."""
    try:
        return path.read_text(encoding="utf-8").strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    while value.startswith("-"):       # a leading '-' reads as an option on command lines (--token -x...)
        value = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:            # another process made it meanwhile
        return path.read_text(encoding="utf-8").strip(), False
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(value + "\n")
    return value, True
