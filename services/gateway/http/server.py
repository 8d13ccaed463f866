"""Runs the HTTP front door with uvicorn on a thread of the gateway process."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("hmi.gateway.http")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--http {address!r}: give HOST:PORT (e.g. 127.0.0.1:8000), or 'off'")
    return host.strip("[]"), int(port)


class HttpServer:
    def __init__(self, app, address: str, *, tls_cert: str | None = None, tls_key: str | None = None) -> None:
        """With `tls_cert` and `tls_key` (the gateway's --tls-cert / --tls-key) it serves HTTPS."""
        import uvicorn
        host, port = split_address(address)
        self.address = address
        self.scheme = "https" if tls_cert else "http"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                                    ssl_certfile=tls_cert, ssl_keyfile=tls_key))
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Starts and waits until it listens (or fails, e.g. the port is taken)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"the HTTP front door cannot listen on {self.address} (address in use?)")
            time.sleep(0.02)
        log.info("HTTP doors on %s://%s (OpenAI /v1, KServe v2 /v2, TEI /embed, /predict, /tokenize)", self.scheme,
                 self.address)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
