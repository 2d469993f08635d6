"""The benchmark's verdict: `tests/perf/bench.py` exits 1 on what `problems` reports, so it must report all of it."""

import importlib.util

from support import ROOT

spec = importlib.util.spec_from_file_location("bench", ROOT / "tests" / "perf" / "bench.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SENT = {7: {2: 10, 3: 2}, 8: {2: 5}}


def test_exact_counters_and_no_refused_request_are_no_problem() -> None:
    assert bench.problems({}, SENT, {7: {2: 10, 3: 2}, 8: {2: 5}}, {7: {2: 10, 3: 2}, 8: {2: 5}}) == []


def test_a_refused_request_a_counter_off_or_a_run_missing_is_named() -> None:
    assert bench.problems({"thread append 503": 2}, SENT, {7: {2: 10, 3: 2}}, {7: {2: 9, 3: 2, 6: 1}, 8: {2: 5}}) == [
        "2 thread append 503 responses",
        "run 7 stored results: status 2: 10 expected, 9 found; status 6: 0 expected, 1 found",
        "run 8 counters: status 2: 5 expected, 0 found",
    ]
