"""Play a CI fleet against a running server and compare its end-to-end rate with raw COPY.

    .venv/bin/python tests/perf/bench.py --runs 1 --threads 1000 --appends 10 --tests 100
    .venv/bin/python tests/perf/bench.py --runs 20 --threads 50 --appends 10 --tests 100

It starts its own shim and workers on the database `ingest_bench` and Redis database 14 (so it never
touches a development server; `--database-url` and `--redis-url` choose others), creates R runs of T threads,
and has `--concurrency` CI jobs at a time each push one thread's A appends of B tests and complete it; then it
completes the runs and polls until all are completed. In the same run, before the fleet and after it, it
measures how fast the same PostgreSQL takes as many equivalent rows by COPY, and prints the end-to-end rate
against the faster of the two. It exits with status 1, saying what differed, if any
request was answered otherwise than expected or any run's counters or stored results differ from what the
fleet sent. Not collected by pytest: run it by hand or with `make bench`.
"""

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import psycopg
import redis
import uvloop
from sqlalchemy import make_url

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "perf"))

from support import Service, start_api, start_worker, tree  # noqa: E402

from ingest.admin import Admin  # noqa: E402
from schema.db import drop_database, upgrade  # noqa: E402
from schema.process import quiet_gc  # noqa: E402
from schema.settings import Settings  # noqa: E402

BENCH_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_bench"
BENCH_REDIS_URL = "redis://127.0.0.1:6379/14"
STATUSES = [("passed", 2)] * 7 + [("failed", 3), ("skipped", 6), ("error", 3)]
CONSOLE = "Traceback (most recent call last):\n" + "  File \"suite.py\", line 12, in test\n" * 8 + "AssertionError\n"


# --- a small HTTP/1.1 client: the load generator must cost the machine as little as possible ---------------

class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, parsed by hand: an asyncio Protocol costs
    a fraction of what streams do, and every cycle the fleet spends is one the server cannot."""

    def __init__(self, host: str, port: int, token: str, close: bool = False) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        # As the testmo CLI does: a new connection for every request.
        self.close_each = close
        if close:
            self.head += "Connection: close\r\n"
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError())

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.transport is None:
            await loop.create_connection(lambda: self, self.host, self.port)
        assert self.transport is not None
        self.waiter = loop.create_future()
        self.transport.writelines((
            f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode(), body))
        try:
            return await self.waiter
        finally:
            self.waiter = None
            if self.close_each:
                self.close()
                self.transport = None
                self.buffer.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    timeline: list[tuple[float, str, float]] = field(default_factory=list)
    # Open loop: how late the generator sent each request, by endpoint.
    late: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    async def call(self, conn: Connection, name: str, method: str, path: str, body: bytes = b"",
                   ok: int = 204, scheduled: float | None = None) -> bytes:
        """`scheduled`: in the open loop, when the request was due; its latency counts from then, so that a
        server slow to answer cannot hide how long requests waited to be sent (coordinated omission)."""
        start = time.perf_counter() if scheduled is None else scheduled
        status, payload = await conn.request(method, path, body)
        self.latencies[name].append(time.perf_counter() - start)
        self.timeline.append((start, name, time.perf_counter() - start))
        if status != ok:
            self.errors[f"{name} {status}"] += 1
            if sum(self.errors.values()) <= 5:
                print(f"  ! {name} -> {status}: {payload[:300]!r}", file=sys.stderr)
        return payload


# --- the fleet -------------------------------------------------------------------------------------------------

def make_append(rng: random.Random, thread_no: int, append_no: int, tests: int,
                expected: dict[int, int]) -> bytes:
    items = []
    for i in range(tests):
        name = f"test_case_{thread_no}_{append_no}_{i}"
        folder = f"tests/suite_{(thread_no * 7 + i) % 40}"
        status, status_id = rng.choice(STATUSES)
        expected[status_id] += 1
        test: dict[str, Any] = {
            "key": hashlib.sha256(f"{folder}.{name}".encode()).hexdigest(), "name": name, "folder": folder,
            "status": status, "elapsed": rng.randint(1_000, 5_000_000), "file": f"{folder}.py", "line": i + 1,
        }
        if status_id == 3:
            test["fields"] = [{"type": 4, "name": "Output", "value": CONSOLE}]
        items.append(test)
    return orjson.dumps({"tests": items})


@dataclass
class Plan:
    """The fleet's requests, made before the clock starts: generating them is the client's work, not the
    server's, and costs seconds (sha256 keys, JSON) that must count neither in the rates nor in the CPU."""

    jobs: list[tuple[int, int]]  # (run index, thread number), in the order the CI jobs take them
    bodies: list[list[bytes]]  # each job's appends
    expected: dict[int, dict[int, int]]  # by run index: results by status id


def prepare(args: argparse.Namespace) -> Plan:
    rng = random.Random(42)
    jobs = [(r, t) for t in range(args.threads) for r in range(args.runs)]
    rng.shuffle(jobs)
    print(f"generating {len(jobs) * args.appends} append bodies ...", file=sys.stderr)
    expected: dict[int, dict[int, int]] = {}
    bodies = []
    for job_no, (run_index, _) in enumerate(jobs):
        counts = expected.setdefault(run_index, defaultdict(int))
        bodies.append([make_append(rng, job_no, a, args.tests, counts) for a in range(args.appends)])
    return Plan(jobs, bodies, expected)


async def fleet(url: str, token: str, project_id: int, args: argparse.Namespace, plan: Plan,
                before_poll: Callable[[], None], at_last_complete: Callable[[], None]) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(42)
    stats = Stats()
    conns = [Connection(host, int(port), token, args.new_connections) for _ in range(args.concurrency)]

    t_start = time.perf_counter()
    runs = []
    for r in range(args.runs):
        body = orjson.dumps({"name": f"bench {r}", "source": "bench", "fields": [], "links": [], "artifacts": []})
        runs.append(orjson.loads(await stats.call(conns[0], "create run", "POST",
                                                  f"/api/v1/projects/{project_id}/automation/runs", body, 201))["id"])

    # Each CI job: create its thread, push its appends one after another, complete the thread.
    jobs = [(runs[run_index], t) for run_index, t in plan.jobs]
    bodies = plan.bodies
    expected_run = {runs[run_index]: counts for run_index, counts in plan.expected.items()}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for job_no in range(len(jobs)):
        queue.put_nowait(job_no)

    async def ci_job(conn: Connection) -> None:
        while not queue.empty():
            job_no = queue.get_nowait()
            run_id, _ = jobs[job_no]
            thread = orjson.loads(await stats.call(
                conn, "create thread", "POST", f"/api/v1/automation/runs/{run_id}/threads",
                b'{"fields":[],"artifacts":[],"elapsed_computed":1000}', 201))["id"]
            path = f"/api/v1/automation/runs/threads/{thread}"
            for body in bodies[job_no]:
                if args.think_ms:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * args.think_ms / 1000)
                await stats.call(conn, "thread append", "POST", f"{path}/append", body)
            await stats.call(conn, "thread complete", "POST", f"{path}/complete", b"{}")

    print("fleet starting", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    delayed = None
    if args.worker_delay is not None:
        async def start_later() -> None:
            await asyncio.sleep(args.worker_delay)
            await asyncio.get_running_loop().run_in_executor(None, before_poll)
        delayed = asyncio.create_task(start_later())
    if args.open_loop:
        await open_loop(host, int(port), token, args, stats, jobs, bodies, rng)
    else:
        await asyncio.gather(*(ci_job(c) for c in conns))
    for run_id in runs:
        await stats.call(conns[0], "run complete", "POST", f"/api/v1/automation/runs/{run_id}/complete",
                         b'{"measure_elapsed":true}')
    t_last_complete = time.perf_counter()
    at_last_complete()
    if delayed is not None:
        await delayed
    before_poll()
    accepted_seconds = t_last_complete - t0

    # Poll until every run is completed (the list endpoint: runs without their threads), keeping its counters.
    pending = set(runs)
    counters: dict[int, dict[int, int]] = {}
    while pending:
        page = orjson.loads(await stats.call(
            conns[0], "list runs", "GET", f"/api/v1/projects/{project_id}/automation/runs?per_page=100", ok=200))
        for run in page["result"]:
            if run["id"] in pending and run["is_completed"]:
                pending.discard(run["id"])
                got = {1: run["untested_count"], **{i + 1: run[f"status{i}_count"] for i in range(1, 25)}}
                counters[run["id"]] = {k: v for k, v in got.items() if v}
        if pending:
            await asyncio.sleep(args.poll_ms / 1000)
            if time.perf_counter() - t_last_complete > args.timeout:
                raise SystemExit(f"timed out: {len(pending)} runs not completed")
    t_exact = time.perf_counter()
    for c in conns:
        c.close()
    total = sum(sum(c.values()) for c in expected_run.values())
    return {"stats": stats, "total": total, "expected": expected_run, "e2e_seconds": t_exact - t_start,
            "accepted_seconds": accepted_seconds, "lag": t_exact - t_last_complete, "counters": counters}


def problems(errors: dict[str, int], expected: dict[int, dict[int, int]], counters: dict[int, dict[int, int]],
             stored: dict[int, dict[int, int]]) -> list[str]:
    """What went wrong, one line each: requests answered otherwise than expected, and runs whose counters (as
    the API reports them) or stored results (counted in the database) differ from what the fleet sent."""
    out = [f"{n} {what} responses" for what, n in sorted(errors.items())]
    for run_id, want in sorted(expected.items()):
        for what, got in (("counters", counters.get(run_id, {})), ("stored results", stored.get(run_id, {}))):
            wrong = [f"status {i}: {want.get(i, 0)} expected, {got.get(i, 0)} found"
                     for i in sorted(want.keys() | got.keys()) if want.get(i, 0) != got.get(i, 0)]
            if wrong:
                out.append(f"run {run_id} {what}: " + "; ".join(wrong))
    return out


WARM_CONNECTIONS = 200


async def open_loop(host: str, port: int, token: str, args: argparse.Namespace, stats: Stats,
                    jobs: list[tuple[int, int]], bodies: list[list[bytes]], rng: random.Random) -> None:
    """Every request sent when it is due, whatever the answers to the others: CI jobs offering
    `--open-loop` results a second between them. Job j creates its thread at its start (spread over one
    period), then sends an append every period, then completes; each request goes on a connection of its
    own from a pool of idle ones, so none waits for another's answer."""
    appends_per_second = args.open_loop / args.tests
    period = len(jobs) / appends_per_second
    idle: list[Connection] = []

    async def call(name: str, path: str, body: bytes, ok: int, due: float) -> bytes:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        stats.late[name].append(time.perf_counter() - due)
        conn = idle.pop() if idle else Connection(host, port, token, args.new_connections)
        try:
            return await stats.call(conn, name, "POST", path, body, ok, scheduled=due)
        finally:
            idle.append(conn)

    async def job(job_no: int, start: float) -> None:
        run_id, _ = jobs[job_no]
        thread = orjson.loads(await call("create thread", f"/api/v1/automation/runs/{run_id}/threads",
                                         b'{"fields":[],"artifacts":[],"elapsed_computed":1000}', 201, start))["id"]
        path = f"/api/v1/automation/runs/threads/{thread}"
        # The appends go at their times even if the ones before them are not answered yet. Each is set going
        # only when due: ten thousand tasks made at once would make this process late with the creates.
        sent = []
        for k, body in enumerate(bodies[job_no]):
            due = start + (k + 1) * period
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent.append(asyncio.create_task(call("thread append", f"{path}/append", body, 204, due)))
        await asyncio.gather(*sent)
        await call("thread complete", f"{path}/complete", b"{}", 204, start + (len(bodies[job_no]) + 1) * period)

    if not args.new_connections:
        # Connections open before the clock starts, as a fleet's would be by then: the first period should
        # measure the server's creates, not a thousand connects at once in this one process.
        loop = asyncio.get_running_loop()
        for _ in range(WARM_CONNECTIONS):
            conn = Connection(host, port, token)
            await loop.create_connection(lambda conn=conn: conn, host, port)  # type: ignore[misc]
            idle.append(conn)
    t0 = time.perf_counter() + 0.1
    print(f"open loop: {args.open_loop:,.0f} results/s offered, {appends_per_second:,.0f} appends/s, "
          f"each of {len(jobs)} jobs every {period:.2f} s", file=sys.stderr, flush=True)
    await asyncio.gather(*(job(j, t0 + rng.uniform(0, period)) for j in range(len(jobs))))
    for conn in idle:
        conn.close()


# --- raw COPY of as many equivalent rows -------------------------------------------------------------------------

def raw_copy_rate(database_url: str, rows: int) -> float:
    rng = random.Random(7)
    lines = []
    for i in range(rows):
        name = f"test_case_{i}"
        folder = f"tests/suite_{i % 40}"
        _, status_id = rng.choice(STATUSES)
        fields = orjson.dumps([{"type": 4, "name": "Output", "value": CONSOLE}]).decode() if status_id == 3 else None
        values = [1, 1 + i // 1000, status_id, hashlib.sha256(f"{folder}.{name}".encode()).hexdigest(), name, folder,
                  rng.randint(1_000, 5_000_000), f"{folder}.py", i % 100 + 1, None, fields, None,
                  "2026-11-28T00:00:00.000000Z"]
        lines.append("\t".join("\\N" if v is None else str(v).replace("\\", "\\\\").replace("\n", "\\n")
                               for v in values))
    data = ("\n".join(lines) + "\n").encode()
    url = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        # After the fleet, which has just written as much: let the checkpoint and autovacuum it set off finish
        # first. Keep the better of two tries, so that the ratio is never flattered by a slow COPY.
        conn.execute("VACUUM ANALYZE automation_results")
        conn.execute("CHECKPOINT")
        best = float("inf")
        for _ in range(2):
            conn.execute("DROP TABLE IF EXISTS bench_copy")
            conn.execute("CREATE TABLE bench_copy (LIKE automation_results INCLUDING ALL)")
            start = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                    "COPY bench_copy (run_id, thread_id, status_id, key, name, folder, elapsed, file, line, "
                    "assertions, fields, artifacts, created_at) FROM STDIN") as copy:
                for i in range(0, len(data), 1 << 20):
                    copy.write(data[i:i + (1 << 20)])
            best = min(best, time.perf_counter() - start)
            conn.execute("DROP TABLE bench_copy")
            conn.execute("CHECKPOINT")
    return rows / best


def preload(database_url: str, results: int, days: int) -> None:
    """Older results, loaded as the lifecycle loader loads them, then the database settled as one that has been
    running is (vacuumed, analysed, checkpointed)."""
    from lifecycle import load, psycopg_url

    started = time.perf_counter()
    # Ending yesterday: today's day partition, where the fleet writes, starts empty as it does every day.
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(seconds=1)
    load(database_url, results, days, end=end)
    with psycopg.connect(psycopg_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    print(f"preloaded {results:,} results over {days} days in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)


def bytes_per_result(database_url: str) -> tuple[float, int]:
    """Table and indexes of the stored results, per result; and how many there are."""
    url = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        row = conn.execute(
            "SELECT (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('automation_results') "
            "WHERE isleaf), (SELECT count(*) FROM automation_results)").fetchone()
    assert row is not None
    return (int(row[0] or 0) / row[1] if row[1] else float("nan")), int(row[1])


def wait_for_folds(database_url: str, timeout: float) -> float:
    """Seconds until the completed runs are folded into their cases (worker/cases.py), from now: after the
    counters, so that it counts in no rate above, and before raw COPY, which it would slow."""
    url = make_url(database_url).set(drivername="postgresql")
    start = time.perf_counter()
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM case_folds").fetchone() != (0,):
            if time.perf_counter() - start > timeout:
                raise SystemExit("timed out waiting for the runs to be folded into their cases")
            time.sleep(0.05)
    return time.perf_counter() - start


def stored_counts(database_url: str) -> dict[int, dict[int, int]]:
    url = make_url(database_url).set(drivername="postgresql")
    out: dict[int, dict[int, int]] = defaultdict(dict)
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        for run_id, status_id, n in conn.execute(
                "SELECT run_id, status_id, count(*) FROM automation_results GROUP BY 1, 2"):
            out[run_id][status_id] = n
    return out


# --- processes ---------------------------------------------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def pids_named(name: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def machine_seconds() -> tuple[float, float]:
    """The machine's CPU seconds busy and idle (waiting for I/O included), all cores, since it booted."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, (idle + iowait) / tick


def cpu_by_component(api: Service, worker: Service | None) -> dict[str, float]:
    busy, idle = machine_seconds()
    parts = {"shim": cpu_seconds(tree(api.proc.pid)),
             "workers": cpu_seconds(tree(worker.proc.pid)) if worker else 0.0,
             "postgres": cpu_seconds(pids_named("postgres")), "redis": cpu_seconds(pids_named("redis-server")),
             "load generator": cpu_seconds([os.getpid()])}
    # The rest of the machine's busy time (the kernel's own threads writing pages out, say), and what was idle.
    return parts | {"other": busy - sum(parts.values()), "idle": idle}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler(threading.Thread):
    """Resident memory of the shim's and workers' processes, twice a second, to show it stays flat."""

    def __init__(self, roots: Callable[[], dict[str, int]]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            for name, root in self.roots().items():
                # Every process of the tree: the shim's helper process and the worker's parent count too.
                for i, pid in enumerate(tree(root)):
                    self.samples[f"{name}[{i}]"].append(rss_mb(pid))

    def report(self) -> str:
        lines = []
        for name, values in self.samples.items():
            quarters = [values[min(len(values) - 1, len(values) * q // 4)] for q in (1, 2, 3, 4)]
            lines.append(f"  {name:<10} RSS MB at 1/4, 1/2, 3/4, end of the fleet: "
                         f"{', '.join(f'{v:.0f}' for v in quarters)}; peak {max(values):.0f}")
        return "\n".join(lines)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--appends", type=int, default=10)
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=200, help="CI jobs (requests) in flight")
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--think-ms", type=float, default=0,
                        help="each CI job pauses about this long before each append, as if running tests")
    parser.add_argument("--worker-delay", type=float,
                        help="start the workers this many seconds into the fleet, so that they work on a backlog")
    parser.add_argument("--new-connections", action="store_true",
                        help="a new connection for every request, as the testmo CLI does (Connection: close)")
    parser.add_argument("--timeline", action="store_true", help="append latency every 2 s of the fleet")
    parser.add_argument("--poll-ms", type=float, default=100,
                        help="how often the runs list is polled once the runs are completed, until their counters "
                             "are exact (each poll costs the shim some 2-4 ms of CPU that the workers then lack)")
    parser.add_argument("--open-loop", type=float, metavar="RESULTS_PER_S",
                        help="an open loop: the jobs send at this rate between them whatever the answers, and "
                             "latency counts from when each request was due (--concurrency is then unused)")
    parser.add_argument("--worker-after", action="store_true",
                        help="start the workers only once every request is accepted: shim and drain apart")
    parser.add_argument("--logs", type=Path, default=ROOT / ".run" / "bench")
    parser.add_argument("--preload", type=int, default=0, metavar="RESULTS",
                        help="first load this many older results (completed runs over the --preload-days before "
                             "today, by tests/perf/lifecycle.py), to measure the fleet on a database that has run "
                             "for a while")
    parser.add_argument("--preload-days", type=int, default=30)
    parser.add_argument("--database-url", default=BENCH_DATABASE_URL, help="dropped and created again")
    parser.add_argument("--redis-url", default=BENCH_REDIS_URL, help="flushed")
    args = parser.parse_args()

    settings = Settings(database_url=args.database_url, redis_url=args.redis_url)
    drop_database(args.database_url)
    upgrade(args.database_url)
    if args.preload:
        preload(args.database_url, args.preload, args.preload_days)
    planned = args.runs * args.threads * args.appends * args.tests
    # COPY before the fleet as well as after it: this machine's speed drifts within minutes, and a slow moment
    # after the fleet alone would flatter the ratio.
    print("measuring raw COPY ...", file=sys.stderr)
    copy_before = raw_copy_rate(args.database_url, planned) if planned else float("nan")
    with redis.Redis.from_url(args.redis_url) as client:
        client.flushdb()
    admin = Admin(settings)
    project_id = admin.create_project("bench")
    token = admin.create_token("bench", [project_id])
    admin.close()

    args.logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | {"INGEST_DATABASE_URL": args.database_url, "INGEST_REDIS_URL": args.redis_url,
                              "INGEST_LOG_LEVEL": "WARNING"}
    api, api_url = start_api(env, args.logs / "api.log", extra_args=["--workers", str(args.api_workers)])
    workers: list[Service] = []

    def start_workers() -> None:
        if not workers:
            workers.append(start_worker(env, args.logs / "worker.log", concurrency=args.worker_concurrency))
            print(f"pids api={api.proc.pid} worker={workers[0].proc.pid}", file=sys.stderr, flush=True)

    if not args.worker_after and args.worker_delay is None:
        start_workers()
    sampler = RssSampler(lambda: {"shim": api.proc.pid, **({"worker": workers[0].proc.pid} if workers else {})})
    sampler.start()
    try:
        plan = prepare(args)
        quiet_gc()  # the plan is a large heap: full collections of it would stall the generator for 100 ms
        cpu_at = [cpu_by_component(api, workers[0] if workers else None)]
        result = uvloop.run(fleet(api_url, token, project_id, args, plan, start_workers,
                                  lambda: cpu_at.append(cpu_by_component(api, workers[0] if workers else None))))
        sampler.stopped.set()
        worker = workers[0]
        cpu_at.append(cpu_by_component(api, worker))
        rss = {"shim": [rss_mb(p, "VmHWM") for p in tree(api.proc.pid)],
               "worker": [rss_mb(p, "VmHWM") for p in tree(worker.proc.pid)]}
        folded_after = wait_for_folds(args.database_url, args.timeout)
    finally:
        api.stop()
        for w in workers:
            w.stop()
    stats: Stats = result["stats"]
    wrong = problems(stats.errors, result["expected"], result["counters"], stored_counts(args.database_url))
    per_result, stored = bytes_per_result(args.database_url)
    print("measuring raw COPY ...", file=sys.stderr)
    copy_after = raw_copy_rate(args.database_url, planned) if planned else float("nan")
    copy_rate = max(copy_before, copy_after)

    total = result["total"]
    e2e_rate = total / result["e2e_seconds"]
    print(f"\nfleet: {args.runs} runs x {args.threads} threads x {args.appends} appends x {args.tests} tests "
          f"= {total:,} results, "
          + (f"open loop at {args.open_loop:,.0f} results/s offered" if args.open_loop
             else f"{args.concurrency} in flight") + f", api workers {args.api_workers}, "
          f"worker concurrency {args.worker_concurrency}")
    print(f"{'endpoint':<16}{'n':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, values in stats.latencies.items():
        ms = [v * 1000 for v in values]
        print(f"{name:<16}{len(ms):>8}{statistics.median(ms):>9.1f}{percentile(ms, 95):>9.1f}"
              f"{percentile(ms, 99):>9.1f}{max(ms):>9.1f}")
    for name, values in stats.late.items():
        # Part of the latencies above: a generator that falls behind its schedule adds to them.
        late = [v * 1000 for v in values]
        print(f"{'  sent late':<16}{len(late):>8}{statistics.median(late):>9.1f}{percentile(late, 95):>9.1f}"
              f"{percentile(late, 99):>9.1f}{max(late):>9.1f}  ({name})")
    print(f"error responses: {dict(stats.errors) or 'none'}")
    if args.timeline:
        t0 = stats.timeline[0][0]
        windows: dict[int, list[float]] = defaultdict(list)
        for start, name, seconds in stats.timeline:
            if name == "thread append":
                windows[int((start - t0) / 2)].append(seconds * 1000)
        for w, ms in sorted(windows.items()):
            print(f"  t={2 * w:>3}s appends {len(ms):>5}  "
                  f"p50 {statistics.median(ms):6.1f}  p99 {percentile(ms, 99):6.1f}")
    print(f"accepted results/s:      {total / result['accepted_seconds']:>10,.0f}")
    print(f"end-to-end results/s:    {e2e_rate:>10,.0f}  (first request to exact counters, "
          f"{result['e2e_seconds']:.1f} s)")
    print(f"raw COPY rows/s:         {copy_rate:>10,.0f}  (the faster of {copy_before:,.0f} before the fleet "
          f"and {copy_after:,.0f} after it)")
    print(f"ratio end-to-end / COPY: {e2e_rate / copy_rate:>10.2f}")
    print(f"bytes per stored result (table + indexes): {per_result:,.0f}, over {stored:,} results"
          + (f" ({args.preload:,} of them preloaded)" if args.preload else ""))
    print(f"runs folded into their cases {folded_after:.1f} s after their counters were exact")
    print(f"lag, last complete to exact final counters: {result['lag']:.2f} s"
          + (" (includes starting the workers)" if args.worker_after else ""))
    print(f"peak RSS MB: shim {[round(x) for x in rss['shim']]}, "
          f"worker processes {[round(x) for x in rss['worker']]}")
    print(sampler.report())
    # Apart: while the fleet sends, and while the backlog drains after its last complete. The drain's shim CPU
    # is mostly this benchmark's own polling of the runs list, not the fleet's requests.
    before, last, after = cpu_at
    for what, start, end, seconds in (("during the fleet", before, after, result["e2e_seconds"]),
                                      ("  while accepting", before, last, result["accepted_seconds"]),
                                      ("  while draining", last, after, result["lag"])):
        print(f"CPU seconds {what}: " + ", ".join(f"{k} {end[k] - start[k]:.1f}" for k in start)
              + f" (wall {seconds:.1f} s, {os.cpu_count()} cores)")
    print(f"shim CPU per result while accepting: {(last['shim'] - before['shim']) / total * 1e6:.2f} µs")
    if wrong:
        print("\nFAILED: not every request was accepted and counted exactly once:", file=sys.stderr)
        for line in wrong:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)
    print("every request accepted, every counter and stored result exact")


if __name__ == "__main__":
    main()
