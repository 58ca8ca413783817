"""`loraforge serve`: load the runs, start the batching engine and the HTTP server (uvicorn)."""

import ipaddress
import logging
import os
import signal
import socket
import threading
import time

import uvicorn

from loraforge.errors import Interrupted, LoraforgeError
from loraforge.serve.app import build_app
from loraforge.serve.engine import Engine
from loraforge.serve.models import load_served
from loraforge.serve.vllm_server import become_vllm, choose

log = logging.getLogger("loraforge.serve")

API_KEY_ENV = "LORAFORGE_API_KEY"
DEFAULT_MAX_BATCH = 32


def build(run_dirs: list[str], api_key: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
          timeout_s: float = 300.0):
    """(the ASGI app, its engine, the served names) for the runs."""
    served = load_served(run_dirs)
    engine = Engine(max_batch=max_batch)
    return build_app(served, engine, api_key, timeout_s), engine, list(served)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def run_server(run_dirs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch: int | None = None, timeout_s: float = 300.0, engine: str = "auto") -> None:
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches this address can use the models; "
                    "set --api-key or %s", host, API_KEY_ENV)
    try:
        socket.getaddrinfo(host, port)
    except OSError as exc:
        raise LoraforgeError(f"--host {host}: {exc}") from None
    refuse_a_taken_port(host, port)
    chosen, vllm_args = choose(engine, run_dirs, host, port, max_batch)
    if chosen == "vllm":
        become_vllm(vllm_args, api_key)
    max_batch = max_batch or DEFAULT_MAX_BATCH
    app, engine, names = build(run_dirs, api_key, max_batch, timeout_s)
    log.info("serving %s at http://%s:%d/v1 (batches of up to %d)%s", ", ".join(names), host, port, max_batch,
             "; requests need the API key" if api_key else "")
    server = StoppingServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_S), engine)
    # uvicorn raises the signal it stopped on again once it has shut down: SIGTERM too is raised as an exception here.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()
    if server.stopped_by is not None:
        ended = (f"{server.cancelled} request(s) in flight were ended where they were" if server.cancelled
                 else "no request was in flight")
        raise Interrupted(f"stopped by {server.stopped_by}: {ended}", server.stopped_by)


# Seconds a stopping server gives its connections to close once every request in flight is ended.
SHUTDOWN_S = 10


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class StoppingServer(uvicorn.Server):
    """uvicorn's server, which on SIGINT or SIGTERM waits for every request in flight to be answered in full (minutes
    of generation, up to --timeout each): here each ends at its next token, and the signal is kept, to be said and
    exited with."""

    def __init__(self, config, engine: Engine):
        super().__init__(config)
        self.engine, self.stopped_by, self.cancelled = engine, None, 0

    def handle_exit(self, sig, frame):
        if self.stopped_by is None:
            self.stopped_by = signal.Signals(sig).name
            self.cancelled = self.engine.cancel_all()
        super().handle_exit(sig, frame)


def refuse_a_taken_port(host: str, port: int) -> None:
    """Before the models load: a port another program listens on fails only once uvicorn binds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LoraforgeError(f"--port {port}: {host}:{port} cannot be listened on ({exc.strerror}); another "
                                 "program may hold it: choose another with --port") from None


class Background:
    """A server on 127.0.0.1 on a free port in a thread of this process, for tests and benchmarks."""

    def __init__(self, app, ready_s: float = 30.0):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + ready_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start within {ready_s:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
