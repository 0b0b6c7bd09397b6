"""Running the app with uvicorn on a socket bound before start, so the URL (and a taken port) is known
at once; in the foreground for the command, in a background thread for tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from cbir_jax.core.errors import UserError


class ServeError(UserError, ValueError):
    """The page cannot start (e.g. the port is taken); its message is one line (a UserError: exit 2)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    try:
        return socket.create_server((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}/"


def _server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serves until Ctrl+C."""
    _server(app).run(sockets=[sock])


@contextlib.contextmanager
def in_background(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 30.0) -> Iterator[str]:
    """Serves `app` on a free loopback port in a thread; yields its URL; stops it on exit."""
    sock = bind(host, 0)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
