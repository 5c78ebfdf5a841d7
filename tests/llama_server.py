"""A real OpenAI-compatible server on loopback for tests: llama-cpp-python serving the default GGUF.

:func:`llama_server` is a session fixture (import it into a test module) that starts
``python -m llama_cpp.server`` once, waits until ``GET /v1/models`` answers and stops it at teardown.
The server requires an API key (:data:`API_KEY`), so one server serves both the good-key and the
bad-key tests. :class:`FaultyProxy` stands between a client and the server to count requests and to
inject the failures a real deployment shows (503 with ``Retry-After``, a hang, a dropped connection,
a non-JSON page).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

MODEL_ALIAS = "smollm2-135m-instruct"
"""The model id the server lists (llama-cpp-python's default id would be the GGUF's path)."""
API_KEY = "lmscope-test-key"
SEED = 1234
READY_TIMEOUT_S = 120.0


@dataclass
class LlamaServer:
    """A running server: its API base (``http://127.0.0.1:P/v1``) and how long it took to answer."""

    base_url: str
    api_key: str
    process: subprocess.Popen
    log: Path
    start_seconds: float = 0.0


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(server: LlamaServer, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``GET /v1/models`` until it answers 200; fail with the server's log if it dies or never answers."""
    request = urllib.request.Request(f"{server.base_url}/models", headers={"Authorization": f"Bearer {server.api_key}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {server.process.returncode} before answering:\n{_log_tail(server.log)}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    pytest.fail(f"llama_cpp.server did not answer GET /v1/models within {timeout:.0f} s:\n{_log_tail(server.log)}")


def start_server(gguf: Path, *, api_key: str = API_KEY, log_dir: Path | None = None, threads: int = 1) -> LlamaServer:
    """Start ``python -m llama_cpp.server`` on a free loopback port and wait until it answers.

    No flag is needed for log-probabilities: the server's ``logits_all`` setting defaults to true.
    One thread by default (``threads``): on a busy 2-core machine two llama.cpp threads wait on each other.
    """
    missing = [name for name in ("llama_cpp", "fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"llama-cpp-python[server] is not installed here (no {', '.join(missing)}); run `make dev`.")
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log", dir=log_dir)[1])
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf), "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--seed", str(SEED), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--api_key", api_key,
    ]
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", api_key, process, log)
    try:
        wait_ready(server)
    except BaseException:
        stop_server(server)
        raise
    server.start_seconds = time.monotonic() - started
    return server


def stop_server(server: LlamaServer) -> None:
    """Terminate the server (kill it if it lingers) and remove its log."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    server.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    """One llama-cpp-python server for the session, serving the default GGUF under :data:`MODEL_ALIAS`."""
    from lmscope.models.loading import locate_default_gguf

    server = start_server(locate_default_gguf())
    try:
        yield server
    finally:
        stop_server(server)


@dataclass
class FaultyProxy:
    """A loopback HTTP proxy in front of ``upstream`` (a server root, ``http://host:port``).

    Each POST first meets the next fault in ``faults``, then, once they are used up, is forwarded;
    GETs are always forwarded. A fault is ``("status", code, retry_after)``, ``("hang", seconds)``
    (then close without answering, as a stuck server does to a client that gave up), ``("drop",)`` (close without answering) or ``("body", code, bytes)``.
    ``posts`` and ``gets`` count the requests that arrived, faulted or not.
    """

    upstream: str
    faults: list[tuple] = field(default_factory=list)
    posts: int = 0
    gets: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def do_GET(self) -> None:
                with proxy._lock:
                    proxy.gets += 1
                self._forward(None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    proxy.posts += 1
                    fault = proxy.faults.pop(0) if proxy.faults else None
                if fault is None:
                    return self._forward(body)
                kind = fault[0]
                if kind == "status":
                    headers = {"Retry-After": str(fault[2])} if fault[2] is not None else {}
                    self._answer(fault[1], json.dumps({"error": {"message": "injected by the test proxy"}}).encode(), headers)
                elif kind == "hang":
                    time.sleep(fault[1])
                    self.close_connection = True
                elif kind == "drop":
                    self.close_connection = True
                elif kind == "body":
                    self._answer(fault[1], fault[2], {"Content-Type": "text/html"})
                else:
                    raise ValueError(f"unknown fault {fault!r}")

            def _forward(self, body: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        self._answer(response.status, response.read(), {"Content-Type": response.headers.get("Content-Type", "")})
                except urllib.error.HTTPError as err:
                    self._answer(err.code, err.read(), {"Content-Type": err.headers.get("Content-Type", "")})

            def _answer(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except ConnectionError:  # the client gave up (a timeout under test)
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def server_root(base_url: str) -> str:
    """``http://host:port`` from an API base ``http://host:port/v1``."""
    return base_url.removesuffix("/v1")

