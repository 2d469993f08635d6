"""Count the instructions the shim spends per result of thread appends, under valgrind's callgrind.

    .venv/bin/python tests/perf/shim_instructions.py

CPU seconds move with this machine's speed (by 15 % between runs, by more from one day to the next), so a
change to the accept path is hard to judge from them. Instructions do not move: the same code and requests give
the same count to within a fraction of a percent, whatever else the machine is doing. This starts a shim under
callgrind (database `ingest_bench_instr`, Redis database 13, no worker), creates a run of `--threads` threads,
sends each one append of `--tests` tests as warm-up, then counts only while `--threads` x `--appends` appends
go in, `--concurrency` at a time, and prints the instructions per result. It fails if any append is not 204.
About a minute. Not collected by pytest.
"""

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import redis
import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "perf"))

from bench import Connection, make_append  # noqa: E402
from support import free_port  # noqa: E402

from ingest.admin import Admin  # noqa: E402
from schema.db import drop_database, upgrade  # noqa: E402
from schema.settings import Settings  # noqa: E402

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_bench_instr"
REDIS_URL = "redis://127.0.0.1:6379/13"


async def fleet(port: int, token: str, project_id: int, args: argparse.Namespace, bodies: list[bytes],
                counting: Callable[[bool], None]) -> Counter[int]:
    conns = [Connection("127.0.0.1", port, token) for _ in range(args.concurrency)]
    status, body = await conns[0].request("POST", f"/api/v1/projects/{project_id}/automation/runs",
                                          orjson.dumps({"name": "instructions", "source": "bench"}))
    assert status == 201, body
    run_id = orjson.loads(body)["id"]
    threads = []
    for _ in range(args.threads):
        status, body = await conns[0].request("POST", f"/api/v1/automation/runs/{run_id}/threads", b"{}")
        assert status == 201, body
        threads.append(orjson.loads(body)["id"])
    for thread_id in threads:  # warm-up: every thread known, every code path run once
        await conns[0].request("POST", f"/api/v1/automation/runs/threads/{thread_id}/append", bodies[0])
    loop = asyncio.get_running_loop()
    answers: Counter[int] = Counter()
    work = iter([(t, a) for a in range(args.appends) for t in threads])

    async def job(conn: Connection) -> None:
        for thread_id, a in work:
            status, _ = await conn.request("POST", f"/api/v1/automation/runs/threads/{thread_id}/append",
                                           bodies[(thread_id + a) % len(bodies)])
            answers[status] += 1

    await loop.run_in_executor(None, counting, True)
    await asyncio.gather(*(job(c) for c in conns))
    await loop.run_in_executor(None, counting, False)
    for c in conns:
        c.close()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=100)
    parser.add_argument("--appends", type=int, default=10)
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()

    drop_database(DATABASE_URL)
    upgrade(DATABASE_URL)
    with redis.Redis.from_url(REDIS_URL) as client:
        client.flushdb()
    admin = Admin(Settings(database_url=DATABASE_URL, redis_url=REDIS_URL))
    project_id = admin.create_project("instructions")
    token = admin.create_token("instructions", [project_id])
    admin.close()
    rng = random.Random(1)
    bodies = [make_append(rng, i, 0, args.tests, defaultdict(int)) for i in range(100)]

    out = Path(tempfile.mkdtemp()) / "callgrind.out"
    port = free_port()
    env = dict(os.environ) | {"INGEST_DATABASE_URL": DATABASE_URL, "INGEST_REDIS_URL": REDIS_URL,
                              "INGEST_LOG_LEVEL": "WARNING"}
    # Not instrumented until the appends start: start-up runs at near native speed.
    shim = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, "-m", "ingest.cli", "api", "--port", str(port)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.TransportError:
                if shim.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the shim did not start under valgrind") from None
                time.sleep(0.5)

        def counting(on: bool) -> None:
            subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(shim.pid)], check=True,
                           capture_output=True)

        answers = uvloop.run(fleet(port, token, project_id, args, bodies, counting))
    finally:
        os.killpg(shim.pid, signal.SIGTERM)
        shim.wait(timeout=120)
    total = 0
    for part in out.parent.glob(out.name + "*"):
        for line in part.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    results = args.threads * args.appends * args.tests
    print(f"{args.threads * args.appends:,} appends of {args.tests} tests, {args.concurrency} in flight: "
          f"{total:,} shim instructions, {total / results:,.0f} per result")
    if answers != Counter({204: args.threads * args.appends}):
        raise SystemExit(f"FAILED: not every append was accepted: {dict(answers)}")


if __name__ == "__main__":
    main()
