"""Helpers for tests that drive real processes: the API shim and Celery workers, on PostgreSQL and Redis."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEST_DATABASE_URL = os.environ.get(
    "INGEST_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_test")
# Tests use their own Redis database number, so a development server on database 0 is never touched.
TEST_REDIS_URL = os.environ.get("INGEST_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

T = TypeVar("T")


def tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def service_env(**overrides: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "INGEST_DATABASE_URL": TEST_DATABASE_URL,
        "INGEST_REDIS_URL": TEST_REDIS_URL,
        "INGEST_QUEUE": "ingest-test",
        "INGEST_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"INGEST_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Service:
    """A real `ingest` process (api or worker) with its output in a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", *args], env=dict(env), cwd=ROOT,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident memory of the process and its children, in bytes."""
        total = 0
        for pid in tree(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._log_file.close()


def start_api(env: Mapping[str, str], log: Path, tls: tuple[Path, Path] | None = None,
              extra_args: list[str] | None = None) -> tuple[Service, str]:
    port = free_port()
    args = ["api", "--port", str(port), *(extra_args or [])]
    scheme = "http"
    if tls is not None:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        scheme = "https"
    service = Service(args, env, log)
    url = f"{scheme}://127.0.0.1:{port}"

    def up() -> bool:
        if not service.alive():
            service.stop()
            raise AssertionError(f"api exited:\n{service.output()}")
        try:
            httpx.get(f"{url}/api/v1/user", verify=False, timeout=1)
        except httpx.TransportError:
            return False
        return True

    wait_for(up, timeout=30, what="the API to listen")
    return service, url


def start_worker(env: Mapping[str, str], log: Path, concurrency: int = 2) -> Service:
    # At least INFO: readiness is read from the worker's log.
    level = "DEBUG" if env.get("INGEST_LOG_LEVEL") == "DEBUG" else "INFO"
    service = Service(["worker", "--concurrency", str(concurrency), "--metrics-host", "127.0.0.1",
                       "--metrics-port", str(free_port())],
                      dict(env) | {"INGEST_LOG_LEVEL": level}, log)

    def ready() -> bool:
        if not service.alive():
            service.stop()
            raise AssertionError(f"worker exited:\n{service.output()}")
        return " ready." in service.output()

    wait_for(ready, timeout=60, what="the worker to be ready")
    return service


class Api:
    """An API client holding one bearer token."""

    def __init__(self, base_url: str, token: str | None, **client_args: Any) -> None:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=f"{base_url}/api/v1", headers=headers, timeout=30, **client_args)

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is not None:
            kw["json"] = body
        return self.http.post(path, **kw)

    def create_run(self, project_id: int, **body: Any) -> int:
        body = {"name": "Run", "source": "backend", "fields": [], "links": [], "artifacts": []} | body
        response = self.post(f"/projects/{project_id}/automation/runs", body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def create_thread(self, run_id: int, **body: Any) -> int:
        response = self.post(f"/automation/runs/{run_id}/threads", {"fields": [], "artifacts": []} | body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def append(self, thread_id: int, tests: list[dict[str, Any]], **body: Any) -> None:
        response = self.post(f"/automation/runs/threads/{thread_id}/append", {"tests": tests} | body)
        assert response.status_code == 204, response.text

    def complete_thread(self, thread_id: int, **body: Any) -> None:
        response = self.post(f"/automation/runs/threads/{thread_id}/complete", body)
        assert response.status_code == 204, response.text

    def complete_run(self, run_id: int, measure_elapsed: bool = True) -> None:
        response = self.post(f"/automation/runs/{run_id}/complete", {"measure_elapsed": measure_elapsed})
        assert response.status_code == 204, response.text

    def run(self, run_id: int, **params: Any) -> dict[str, Any]:
        response = self.get(f"/automation/runs/{run_id}", params=params)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()["result"]
        return result

    def wait_completed(self, run_id: int, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(lambda: (r := self.run(run_id))["is_completed"] and r, timeout=timeout,
                        what=f"run {run_id} to complete")


# The POST endpoints by name, with their path templates.
POSTS = {
    "create run": "/projects/{project}/automation/runs",
    "run append": "/automation/runs/{run}/append",
    "create thread": "/automation/runs/{run}/threads",
    "thread append": "/automation/runs/threads/{thread}/append",
    "thread complete": "/automation/runs/threads/{thread}/complete",
    "run complete": "/automation/runs/{run}/complete",
}


def make_tests(n: int, statuses: list[str] | None = None, prefix: str = "t") -> list[dict[str, Any]]:
    statuses = statuses or ["passed"]
    return [{"key": f"{prefix}{i:06d}", "name": f"{prefix} {i}", "folder": "Suite",
             "status": statuses[i % len(statuses)], "elapsed": 1000 + i} for i in range(n)]


PG_BIN = Path("/usr/lib/postgresql") / sorted(p.name for p in Path("/usr/lib/postgresql").iterdir())[-1] / "bin" \
    if Path("/usr/lib/postgresql").exists() else Path("/usr/bin")


class PrivatePostgres:
    """A PostgreSQL cluster of a test's own, so that the test may stop and start it at will.

    Its directory is made under the system's temporary directory, not the test's (pytest keeps those
    private to root, and the server runs as postgres); `close` stops the server and removes it.
    """

    def __init__(self, *settings: str) -> None:
        """`settings`: more server settings, such as "shared_preload_libraries=pg_stat_statements"."""
        self.dir = Path(tempfile.mkdtemp(prefix="ingest-pg-"))
        self.port = free_port()
        self.settings = settings
        shutil.chown(self.dir, "postgres")
        self._pg("initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ingest"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir), "-l", str(self.dir / "log"), "-w", "start", "-o",
                 " ".join([f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                           *(f"-c {setting}" for setting in self.settings)]))

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.dir), "-m", mode, "-w", "stop")

    def close(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A Redis server of a test's own, persisting with AOF as recommended for production."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_for(up, timeout=30, what="redis to start")

    def kill(self) -> None:
        """A crash of the process, not of the machine: what Redis wrote but did not fsync yet is kept."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class HoldingProxy:
    """A TCP proxy (to Redis, say) that can hold back the first chunk a client sends that matches a predicate,
    until the test releases it: a way to put an event between two steps of a real server process."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.held = threading.Event()
        self._release = threading.Event()
        self._match: Callable[[bytes], bool] | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, match: Callable[[bytes], bool]) -> None:
        """Hold back the next chunk for which `match` is true; `held` is set once it arrives."""
        with self._lock:
            self.held.clear()
            self._release.clear()
            self._match = match

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream:
                    with self._lock:
                        matched = self._match is not None and self._match(data)
                        if matched:
                            self._match = None
                    if matched:
                        self.held.set()
                        self._release.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            source.close()


def read_responses(sock: socket.socket, n: int, timeout: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` responses from a raw socket, in the order the server wrote them: status, headers (lower-case names)
    and body (by Content-Length)."""
    sock.settimeout(timeout)
    data, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response, after {len(out)}: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", 0))
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a response body"
            data += chunk
        out.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return out
