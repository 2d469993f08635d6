"""A well-behaved CI job in a process of its own, so that what it measures is the server, not the GIL of the
test that drives a hostile client beside it.

    python tests/bystander.py URL TOKEN THREAD_ID

appends 20 tests at a time, one request after another, until its stdin closes; then prints one JSON object:
when each append was sent (time.time()) and its latency in seconds, the count of each status code, and how
many appends were accepted.
"""

import json
import select
import sys
import time

import httpx


def main() -> None:
    url, token, thread_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    latencies: list[tuple[float, float]] = []
    codes: dict[int, int] = {}
    sent = 0
    with httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        print("ready", flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            tests = [{"key": f"b{sent}-{i}", "name": f"b {sent} {i}", "status": "passed"} for i in range(20)]
            sent_at, started = time.time(), time.perf_counter()
            try:
                code = http.post(f"/automation/runs/threads/{thread_id}/append", json={"tests": tests}).status_code
            except httpx.TransportError:
                code = 0
            latencies.append((sent_at, time.perf_counter() - started))
            codes[code] = codes.get(code, 0) + 1
            sent += code == 204
            time.sleep(0.005)
    print(json.dumps({"latencies": latencies, "codes": codes, "sent": sent}), flush=True)


if __name__ == "__main__":
    main()
