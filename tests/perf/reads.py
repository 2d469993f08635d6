"""Read latencies while a fleet ingests, and how fast completed runs are folded into their cases.

    .venv/bin/python tests/perf/reads.py

It drops and makes again its own database (`ingest_reads`) and uses Redis database 13, starts a shim and
workers, and then:

1. loads one completed run of `--results` results (1,000,000; by COPY, as tests/perf/lifecycle.py loads, ~20 %
   failed) and a project of `--cases` automation cases (100,000);
2. starts a 20-run fleet (tests/perf/bench.py's, in a process of its own) offering `--fleet-rate` results/s
   to the same server, and meanwhile times pages of 1,000 of that run's tests in every sort, filtered by the
   failed statuses, and the cases list sorted by flaky_percent: p50/p95/max of each, on warm caches;
3. submits `--fold-runs` runs (20) of the same `--fold-tests`-test suite (5,000) through the API, completes them
   all at once, and prints the seconds from the last complete's answer until every one is folded;
4. with a webhook on a receiver in this process, completes `--webhook-runs` small runs (100) one after another
   and prints the lag from each complete's answer to its POST's arrival (p50/p99/max): an upper bound of the
   lag from the counters becoming final, which happens in between. Each POST's `run` is checked against
   the run's GET.

Not collected by pytest. It exits 1 if a read answers anything but 200, a fold is missing, or a webhook's run
differs from its GET.
"""

import argparse
import http.server
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "perf"))

from lifecycle import load, psycopg_url  # noqa: E402
from support import Service, start_api, start_worker  # noqa: E402

from ingest.admin import Admin  # noqa: E402
from schema.db import drop_database, upgrade  # noqa: E402
from schema.settings import Settings  # noqa: E402

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_reads"
REDIS_URL = "redis://127.0.0.1:6379/13"
FAILED = "3"  # the failed status ids of the default status table


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def load_cases(database_url: str, project_id: int, cases: int) -> None:
    """`cases` cases of one source, with varied counts and flakiness, as folds would have left them."""
    with psycopg.connect(psycopg_url(database_url), autocommit=True) as conn:
        source = conn.execute("INSERT INTO automation_sources (project_id, name) VALUES (%s, 'suite') "
                              "RETURNING id", (project_id,)).fetchone()
        assert source is not None
        conn.execute(
            "INSERT INTO automation_cases (project_id, source_id, key, name, folder, status, run_count, "
            "result_count, success_count, failure_count, elapsed_total, elapsed_results, elapsed_average, "
            "outcomes, flaky_percent, last_run_id, created_at, updated_at) "
            "SELECT %(p)s, %(s)s, md5(i::text), 'test_case_' || i, 'tests/suite_' || (i %% 40), 1 + i %% 3, 30, 30, "
            "  30 - i %% 7, i %% 7, 30 * (i %% 5000), 30, i %% 5000, '{2,3,2}', ((i * 7919) %% 1000) / 10.0, 1, "
            "  now() - make_interval(secs => %(n)s - i), now() "
            "FROM generate_series(1, %(n)s) i", {"p": project_id, "s": source[0], "n": cases})
        # The totals the folds keep (worker/cases.py).
        conn.execute("INSERT INTO automation_case_totals (project_id, source_id, status, cases) "
                     "SELECT project_id, source_id, status, count(*) FROM automation_cases WHERE project_id = %s "
                     "GROUP BY 1, 2, 3", (project_id,))
        conn.execute("VACUUM ANALYZE automation_cases")


def fleet_process(url: str, token: str, project_id: int, rate: float, stop: Any) -> None:
    """bench.py's 20-run fleet, open loop at `rate` results/s, again and again until `stop` is set."""
    import uvloop
    from bench import fleet, prepare

    args = argparse.Namespace(runs=20, threads=50, appends=10, tests=100, concurrency=50, think_ms=0,
                              worker_delay=None, new_connections=False, open_loop=rate, timeout=300)
    plan = prepare(args)
    while not stop.is_set():
        uvloop.run(fleet(url, token, project_id, args, plan, lambda: None))


def time_reads(client: httpx.Client, path: str, params: dict[str, Any], n: int) -> list[float]:
    seconds = []
    client.get(path, params=params)  # caches warm, plan cached
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path, params=params)
        seconds.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise SystemExit(f"GET {path} {params}: {response.status_code} {response.text[:300]}")
    return seconds


def submit_suite(client: httpx.Client, project_id: int, tests: int, threads: int) -> int:
    run_id = client.post(f"/projects/{project_id}/automation/runs",
                         json={"name": "fold", "source": "fold-suite"}).json()["id"]
    per_thread = tests // threads
    for t in range(threads):
        thread_id = client.post(f"/automation/runs/{run_id}/threads", json={}).json()["id"]
        for start in range(0, per_thread, 100):
            batch = [{"key": f"k{t}-{i}", "name": f"test {t}-{i}", "status": "failed" if i % 17 == 0 else "passed",
                      "elapsed": 1000 + i} for i in range(start, min(per_thread, start + 100))]
            response = client.post(f"/automation/runs/threads/{thread_id}/append", json={"tests": batch})
            assert response.status_code == 204, response.text
        client.post(f"/automation/runs/threads/{thread_id}/complete", json={})
    return int(run_id)


class Receiver(http.server.ThreadingHTTPServer):
    """Records each POST's arrival time and body, by run id."""

    def __init__(self) -> None:
        self.arrived: dict[int, tuple[float, dict[str, Any]]] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.arrived[body["run"]["id"]] = (time.perf_counter(), body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def webhook_lag(client: httpx.Client, admin: Admin, project_id: int, runs: int) -> tuple[list[float], int]:
    """(seconds from each complete's answer to its POST, runs whose POSTed run differs from their GET)."""
    receiver = Receiver()
    admin.create_webhook(project_id, f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    answered: dict[int, float] = {}
    for n in range(runs):
        run_id = client.post(f"/projects/{project_id}/automation/runs", json={"name": f"hook {n}",
                                                                           "source": "hooks"}).json()["id"]
        thread_id = client.post(f"/automation/runs/{run_id}/threads", json={}).json()["id"]
        client.post(f"/automation/runs/threads/{thread_id}/append",
                    json={"tests": [{"key": f"h{i}", "name": f"hook {i}", "status": "passed"} for i in range(10)]})
        client.post(f"/automation/runs/{run_id}/complete", json={})
        answered[run_id] = time.perf_counter()
        time.sleep(0.05)
    deadline = time.perf_counter() + 60
    while len(receiver.arrived) < runs and time.perf_counter() < deadline:
        time.sleep(0.05)
    receiver.shutdown()
    lags = [receiver.arrived[r][0] - at for r, at in answered.items() if r in receiver.arrived]
    differ = sum(1 for r in answered if r not in receiver.arrived
                 or receiver.arrived[r][1]["run"] != client.get(f"/automation/runs/{r}").json()["result"])
    return lags, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--fleet-rate", type=float, default=50_000, help="results/s the fleet offers meanwhile")
    parser.add_argument("--samples", type=int, default=40, help="timed reads per query")
    parser.add_argument("--fold-runs", type=int, default=20)
    parser.add_argument("--fold-tests", type=int, default=5000)
    parser.add_argument("--webhook-runs", type=int, default=100)
    parser.add_argument("--logs", type=Path, default=ROOT / ".run" / "reads")
    args = parser.parse_args()

    settings = Settings(database_url=DATABASE_URL, redis_url=REDIS_URL)
    drop_database(DATABASE_URL)
    upgrade(DATABASE_URL)
    with redis.Redis.from_url(REDIS_URL) as client:
        client.flushdb()
    print(f"loading a run of {args.results:,} results ...", file=sys.stderr, flush=True)
    [big] = load(DATABASE_URL, args.results, days=1, runs_per_day=1, threads=1000)
    admin = Admin(settings)
    with psycopg.connect(psycopg_url(DATABASE_URL), autocommit=True) as conn:
        history = conn.execute("SELECT project_id FROM automation_runs WHERE id = %s", (big.id,)).fetchone()
        conn.execute("VACUUM ANALYZE automation_results")
    assert history is not None
    cases_project = admin.create_project("cases")
    print(f"loading {args.cases:,} cases ...", file=sys.stderr, flush=True)
    load_cases(DATABASE_URL, cases_project, args.cases)
    fleet_project = admin.create_project("fleet")
    hooks_project = admin.create_project("hooks")
    token = admin.create_token("reader", [history[0], cases_project, fleet_project, hooks_project])

    args.logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | {"INGEST_DATABASE_URL": DATABASE_URL, "INGEST_REDIS_URL": REDIS_URL,
                              "INGEST_LOG_LEVEL": "WARNING"}
    api, url = start_api(env, args.logs / "api.log")
    workers: list[Service] = [start_worker(env, args.logs / "worker.log")]
    headers = {"Authorization": f"Bearer {token}"}
    stop = multiprocessing.Event()
    fleet = multiprocessing.Process(target=fleet_process, args=(url, token, fleet_project, args.fleet_rate, stop))
    failed = False
    try:
        with httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=60) as client:
            fleet.start()
            time.sleep(8)  # the fleet under way (its plan is made first)
            tests = f"/automation/runs/{big.id}/tests"
            queries: list[tuple[str, str, dict[str, Any], float]] = [
                ("tests, default sort (id desc)", tests, {"per_page": 1000}, 0.1),
                ("tests, failed only", tests, {"per_page": 1000, "status_id": FAILED}, 0.1),
                ("tests, page 500 of 1000", tests, {"per_page": 1000, "page": 500}, 1.0),
                *((f"tests by {sort} {order}", tests,
                   {"per_page": 1000, "sort": f"automation_run_tests:{sort}", "order": order}, 1.0)
                  for sort in ("name", "status", "elapsed", "created_at") for order in ("asc", "desc")),
                ("cases by flaky_percent desc", f"/projects/{cases_project}/automation/cases",
                 {"sort": "automation_cases:flaky_percent", "order": "desc"}, 0.1),
                ("cases, default sort", f"/projects/{cases_project}/automation/cases", {}, 0.1),
            ]
            print(f"\nreads of a {args.results:,}-result run and a {args.cases:,}-case project, while a 20-run "
                  f"fleet offers {args.fleet_rate:,.0f} results/s")
            print(f"{'query':<34}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'target ms':>11}")
            for name, path, params, target in queries:
                if path.endswith("/cases"):
                    with psycopg.connect(psycopg_url(DATABASE_URL), autocommit=True) as conn:
                        # Statistics as autovacuum keeps them: the fleet folds a million cases of its own in
                        # seconds, and a plan made for the table as it was counts them all.
                        conn.execute("ANALYZE automation_cases")
                seconds = time_reads(client, path, params, args.samples)
                ms = [s * 1000 for s in seconds]
                p95 = percentile(ms, 95)
                verdict = "" if p95 <= target * 1000 else "  OVER"
                print(f"{name:<34}{len(ms):>5}{statistics.median(ms):>9.1f}{p95:>9.1f}{max(ms):>9.1f}"
                      f"{target * 1000:>11.0f}{verdict}", flush=True)
            stop.set()
            fleet.join(timeout=300)
            with psycopg.connect(psycopg_url(DATABASE_URL), autocommit=True) as conn:
                # The fleet's own folds first (each of its runs has 50,000 tests of their own): the 20 runs
                # below are timed on their own.
                drained = time.perf_counter()
                while conn.execute("SELECT count(*) FROM case_folds").fetchone() != (0,):
                    time.sleep(0.1)
                print(f"the fleet's last folds done {time.perf_counter() - drained:.1f} s after it stopped",
                      file=sys.stderr, flush=True)

            print(f"\nsubmitting {args.fold_runs} runs of a {args.fold_tests:,}-test suite ...", file=sys.stderr)
            with ThreadPoolExecutor(args.fold_runs) as pool:
                runs = list(pool.map(lambda _: submit_suite(client, fleet_project, args.fold_tests, 5),
                                     range(args.fold_runs)))
                list(pool.map(lambda run_id: client.post(f"/automation/runs/{run_id}/complete", json={}), runs))
            last_complete = time.perf_counter()
            with psycopg.connect(psycopg_url(DATABASE_URL), autocommit=True) as conn:
                while True:
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE r.is_completed AND f.run_id IS NULL), "
                        "  count(*) FILTER (WHERE r.is_completed) FROM automation_runs r "
                        "LEFT JOIN case_folds f ON f.run_id = r.id WHERE r.id = ANY(%s)", (runs,)).fetchone()
                    assert row is not None
                    if row[0] == len(runs):
                        break
                    if time.perf_counter() - last_complete > 120:
                        failed = True
                        print(f"FAILED: {len(runs) - row[0]} runs not folded after 120 s", file=sys.stderr)
                        break
                    time.sleep(0.02)
                folded_after = time.perf_counter() - last_complete
                counted = conn.execute(
                    "SELECT count(*), min(run_count), max(run_count) FROM automation_cases c "
                    "JOIN automation_sources s ON s.id = c.source_id WHERE s.name = 'fold-suite'").fetchone()
            print(f"{args.fold_runs} runs of {args.fold_tests:,} tests completed at once: folded "
                  f"{folded_after:.2f} s after the last complete's answer (target 5 s); cases {counted}")
            if counted is None or counted[1] != args.fold_runs or counted[2] != args.fold_runs:
                failed = True
                print("FAILED: not every case counts every run exactly once", file=sys.stderr)

            lags, differ = webhook_lag(client, admin, hooks_project, args.webhook_runs)
            ms = [lag * 1000 for lag in lags]
            print(f"webhooks: {len(ms)} of {args.webhook_runs} runs' POSTs arrived; from the complete's answer: "
                  f"p50 {statistics.median(ms):.0f} ms, p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms "
                  f"(target p99 1000 ms from the counters final); runs differing from their GET: {differ}")
            if differ or len(ms) < args.webhook_runs:
                failed = True
                print("FAILED: a webhook was missing or its run differed from the run's GET", file=sys.stderr)
    finally:
        admin.close()
        stop.set()
        if fleet.is_alive():
            fleet.terminate()
        api.stop()
        for worker in workers:
            worker.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
