"""Count the instructions a worker spends per result applying thread appends, under valgrind's callgrind.

    .venv/bin/python tests/perf/worker_instructions.py

The worker's side of `shim_instructions.py`: CPU seconds move with this machine's speed, instructions do not.
This runs itself again under callgrind (database `ingest_bench_winstr`, no Redis, no Celery), creates a run of
`--threads` threads, and applies `--batches` batches of `--appends` appends of `--tests` tests, as the shim
queues them (the pair [head, body]), the way a worker's task does: decode the batch, then, in one transaction,
check that its threads are written and apply it. Only that is counted; PostgreSQL's own work is not. It prints the
instructions per result and fails unless every result is stored. About a minute. Not collected by pytest.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "perf"))

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ingest_bench_winstr"
COUNTING = "INGEST_COUNTING_INSTRUCTIONS"


def counted(args: argparse.Namespace) -> None:
    """Under callgrind, instrumentation off: set up, then count only the batches being applied."""
    from bench import make_append
    from sqlalchemy import text

    from schema.db import drop_database, upgrade
    from schema.process import quiet_gc
    from worker import tasks
    from worker.apply import decode_batch
    from worker.db import engine

    drop_database(DATABASE_URL)
    upgrade(DATABASE_URL)
    with engine().begin() as conn:
        project = conn.execute(text("INSERT INTO projects (name) VALUES ('w') RETURNING id")).scalar_one()
        user = conn.execute(text("INSERT INTO users (name) VALUES ('w') RETURNING id")).scalar_one()
        source = conn.execute(text("INSERT INTO automation_sources (project_id, name) VALUES (:p, 's') "
                                   "RETURNING id"), {"p": project}).scalar_one()
        run = conn.execute(text("INSERT INTO automation_runs (project_id, source_id, name, created_by) "
                                "VALUES (:p, :s, 'run', :u) RETURNING id"),
                           {"p": project, "s": source, "u": user}).scalar_one()
        threads = [conn.execute(text("INSERT INTO automation_run_threads (run_id, project_id, created_by) "
                                     "VALUES (:r, :p, :u) RETURNING id"),
                                {"r": run, "p": project, "u": user}).scalar_one() for _ in range(args.threads)]
    rng = random.Random(3)
    bodies = [make_append(rng, t, 0, args.tests, defaultdict(int)) for t in range(args.appends * 2)]

    def payload(batch: int) -> bytes:
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        ops = [b"".join((b"[", orjson.dumps({
            "kind": "thread.append", "id": str(uuid.uuid4()), "run_id": run, "user_id": user, "at": at,
            "request_id": uuid.uuid4().hex[:16], "thread_id": threads[(batch * args.appends + j) % args.threads],
        }), b",", bodies[(batch + j) % len(bodies)], b"]")) for j in range(args.appends)]
        return b"[" + b",".join(ops) + b"]"

    def apply(payload: bytes) -> None:
        tasks.apply_batch(decode_batch(payload), check_ready=True)  # NotReady if its threads were not written

    payloads = [payload(b) for b in range(args.batches)]
    apply(payload(args.batches))  # warm-up: imports, connections, prepared statements
    quiet_gc()  # as a worker process runs (worker/app.py)

    def counting(on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                       capture_output=True)

    counting(True)
    for p in payloads:
        apply(p)
    counting(False)
    with engine().connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM automation_results")).scalar_one()
    expected = (args.batches + 1) * args.appends * args.tests
    if stored != expected:
        raise SystemExit(f"FAILED: {stored:,} results stored, {expected:,} sent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=200)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--appends", type=int, default=50, help="per batch")
    parser.add_argument("--tests", type=int, default=100)
    args = parser.parse_args()
    if os.environ.get(COUNTING):
        counted(args)
        return

    out = Path(tempfile.mkdtemp()) / "callgrind.out"
    env = dict(os.environ) | {COUNTING: "1", "INGEST_DATABASE_URL": DATABASE_URL, "INGEST_LOG_LEVEL": "WARNING"}
    # What turning the counting on and off costs (two callgrind_control calls) is counted too and not taken
    # off: a few hundred thousand instructions, next to nothing against the batches.
    done = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                           sys.executable, *sys.argv], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"FAILED under valgrind:\n{done.stderr[-3000:]}")
    total = sum(int(line.split()[1]) for part in out.parent.glob(out.name + "*")
                for line in part.read_text().splitlines() if line.startswith("totals:"))
    results = args.batches * args.appends * args.tests
    print(f"{args.batches} batches of {args.appends} appends of {args.tests} tests: {total:,} worker instructions, "
          f"{total / results:,.0f} per result")


if __name__ == "__main__":
    main()
