"""End to end: the official `testmo` CLI (npm `@testmo/testmo-cli` 1.5.0) against our shim over HTTPS.

The CLI is installed once into `.run/testmo-cli/`. It parses JUnit XML files that this module generates, and
sends them; the expected results are counted here from the XML alone (compat.md sections 1 and 3), never from
what the server says.
"""

import hashlib
import json
import os
import random
import re
import shutil
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from conftest import Pipeline, count_results
from sqlalchemy import Engine, create_engine, text
from support import ROOT, Api, Service, service_env, start_api, unique

from ingest.admin import Admin

pytestmark = pytest.mark.e2e

CLI_VERSION = "1.5.0"
# The CLI pins @testmo/testmo-api 2.7.0, which the registry available here lacks (compat.md section 1).
API_OVERRIDE = "2.4.0"
CLI_DIR = ROOT / ".run" / "testmo-cli"
CLI_TIMEOUT = 120.0
THREADS = 6

# compat.md section 3: the status strings the CLI sends, and the status ids they map to.
STATUS_ID = {"passed": 2, "failure": 3, "error": 3, "skipped": 6}
FOLDER_FALLBACK = "Unnamed folder"


# --- the CLI -----------------------------------------------------------------------------------------------

def decoded(output: str | bytes | None) -> str:
    """A subprocess's output, which `TimeoutExpired` may hold as bytes even in text mode."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def install_cli() -> Path:
    """`.run/testmo-cli/node_modules/.bin/testmo`, installed from the npm registry on first use."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the testmo CLI end-to-end test needs {' and '.join(missing)} on PATH "
                    "(Node.js 18 or later); install Node.js to run it", pytrace=False)
    testmo = CLI_DIR / "node_modules" / ".bin" / "testmo"
    if testmo.exists():
        return testmo
    CLI_DIR.mkdir(parents=True, exist_ok=True)
    package = {
        "name": "testmo-cli-cache",
        "private": True,
        "dependencies": {"@testmo/testmo-cli": CLI_VERSION},
        "overrides": {"@testmo/testmo-api": API_OVERRIDE},
    }
    (CLI_DIR / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=CLI_DIR, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"npm install timed out after {exc.timeout}s:\n{decoded(exc.stdout)}\n{decoded(exc.stderr)}",
                    pytrace=False)
    if done.returncode != 0 or not testmo.exists():
        pytest.fail(f"npm install of @testmo/testmo-cli@{CLI_VERSION} failed ({done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr}", pytrace=False)
    return testmo


@dataclass
class TlsApi:
    url: str
    cert: Path
    service: Service
    pipeline: Pipeline

    def client(self, token: str) -> Api:
        return Api(self.url, token, verify=ssl.create_default_context(cafile=str(self.cert)))

    def logs(self, lines: int = 40) -> str:
        api = "\n".join(self.service.output().splitlines()[-lines:])
        worker = "\n".join(self.pipeline.worker.output().splitlines()[-lines:])
        return f"--- api log (tail) ---\n{api}\n--- worker log (tail) ---\n{worker}"


@dataclass
class Cli:
    testmo: Path
    server: TlsApi
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return [str(self.testmo), *args, "--instance", self.server.url, "--no-ansi"]

    def check(self, args: Sequence[str], returncode: int | None, stdout: str, stderr: str) -> str:
        assert returncode == 0, (
            f"testmo {' '.join(args)} exited {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n"
            f"{self.server.logs()}")
        return stdout

    def run(self, *args: str) -> str:
        command = self.command(*args)
        try:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"testmo {' '.join(args)} timed out after {CLI_TIMEOUT}s\n"
                                 f"--- stdout ---\n{decoded(exc.stdout)}\n--- stderr ---\n{decoded(exc.stderr)}\n"
                                 f"{self.server.logs()}") from None
        return self.check(command, done.returncode, done.stdout, done.stderr)

    def run_parallel(self, commands: list[list[str]], out: Path) -> list[str]:
        """Start every command at once, then wait for all; each must exit 0. Returns their stdouts."""
        started = []
        for i, args in enumerate(commands):
            stdout, stderr = out / f"cli-{i}.out", out / f"cli-{i}.err"
            with stdout.open("wb") as o, stderr.open("wb") as e:
                proc = subprocess.Popen(self.command(*args), env=self.env, stdout=o, stderr=e)
            started.append((args, proc, stdout, stderr))
        deadline = time.monotonic() + CLI_TIMEOUT
        try:
            for args, proc, _, _ in started:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"testmo {' '.join(args)} timed out\n{self.server.logs()}") from None
        finally:
            for _, proc, _, _ in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [self.check(args, proc.returncode, stdout.read_text(), stderr.read_text())
                for args, proc, stdout, stderr in started]


def printed_run_id(stdout: str) -> int:
    """The run id the CLI prints on a line of its own (automation:run:create and automation:run:submit)."""
    ids = [int(line) for line in stdout.splitlines() if re.fullmatch(r"\d+", line.strip())]
    assert len(ids) == 1, f"expected one run id in the CLI's output:\n{stdout}"
    return ids[0]


@pytest.fixture(scope="module")
def testmo() -> Path:
    return install_cli()


@pytest.fixture(scope="module")
def tls_api(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsApi]:
    """A dedicated shim serving HTTPS with a self-signed certificate for 127.0.0.1; `pipeline`'s worker
    consumes the same queue."""
    tmp = tmp_path_factory.mktemp("tls-api")
    subprocess.run([str(ROOT / "scripts" / "make-cert.sh"), str(tmp / "cert"), "127.0.0.1"], check=True,
                   capture_output=True, timeout=60)
    cert, key = tmp / "cert" / "cert.pem", tmp / "cert" / "key.pem"
    service, url = start_api(service_env(), tmp / "api.log", tls=(cert, key))
    yield TlsApi(url, cert, service, pipeline)
    service.stop()


@dataclass
class CliProject:
    id: int
    cli: Cli
    api: Api


@pytest.fixture
def cli_project(testmo: Path, admin: Admin, tls_api: TlsApi) -> Iterator[CliProject]:
    project_id = admin.create_project(unique("cli"))
    token = admin.create_token(unique("ci"), [project_id])
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env |= {"TESTMO_TOKEN": token, "NODE_EXTRA_CA_CERTS": str(tls_api.cert), "CI": "true"}
    api = tls_api.client(token)
    yield CliProject(project_id, Cli(testmo, tls_api, env), api)
    api.close()


# --- JUnit XML: generated here, and counted here ----------------------------------------------------------

# Each testcase's outcome elements; the CLI's precedence (error > failure > skipped) decides the status.
OUTCOMES: list[tuple[tuple[str, ...], int]] = [
    ((), 50), (("failure",), 14), (("error",), 8), (("skipped",), 16),
    (("skipped", "failure"), 4), (("failure", "error"), 4), (("skipped", "error"), 4),
]


def _seconds(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}"


def write_junit(path: Path, rng: random.Random, n: int, tag: str) -> None:
    """A JUnit XML report with `n` named testcases over a few suites, plus one testcase without a name."""
    root = ET.Element("testsuites", name=f"report {tag}")
    suites = [ET.SubElement(root, "testsuite", name=f"suite {tag}.{s}", timestamp="2026-01-02T03:04:05")
              for s in range(rng.randint(2, 4))]
    outcomes, weights = zip(*OUTCOMES, strict=True)
    for i in range(n):
        suite = rng.choice(suites)
        case = ET.SubElement(suite, "testcase", name=f"test_{tag}_{i:04d}" + rng.choice(
            ["", " [param-1]", " (ünïcode ✓)", " <a & b>", " \"quoted\" 'x'"]))
        if rng.random() > 0.06:  # a few testcases without a classname: key and folder fall back to the name
            case.set("classname", f"pkg_{tag}.module{rng.randint(0, 5)}.Test{rng.choice('ABC')}")
        if rng.random() > 0.1:
            case.set("time", _seconds(rng.randint(0, 9999)))
        if rng.random() < 0.2:
            case.set("file", f"tests/test_{tag}.py")
            case.set("line", str(rng.randint(1, 900)))
        if rng.random() < 0.1:
            case.set("assertions", str(rng.randint(0, 12)))
        for element in rng.choices(outcomes, weights)[0]:
            if element == "skipped":
                child = ET.SubElement(case, "skipped")
                if rng.random() < 0.5:
                    child.set("message", "not on this platform")
            else:
                child = ET.SubElement(case, element, message=f"{element} in {i}: expected 1 == 2",
                                      type="AssertionError" if element == "failure" else "RuntimeError")
                child.text = f"Traceback (most recent call last):\n  line {i}\n{element}: 1 != 2 & <x>"
        if rng.random() < 0.25:
            ET.SubElement(case, "system-out").text = f"stdout of {i}\nline two"
        if rng.random() < 0.05:
            ET.SubElement(case, "system-err").text = f"stderr of {i}"
        if rng.random() < 0.05:
            properties = ET.SubElement(case, "properties")
            ET.SubElement(properties, "property", name="owner", value=f"team-{rng.randint(1, 3)}")
    # Dropped by the CLI: no name, and an empty name.
    nameless = ET.SubElement(rng.choice(suites), "testcase", classname=f"pkg_{tag}.Nameless", time="0.001")
    ET.SubElement(nameless, "failure", message="a testcase without a name is not a result")
    ET.SubElement(rng.choice(suites), "testcase", name="", classname=f"pkg_{tag}.Empty", time="0.002")
    for suite in suites:
        cases = suite.findall("testcase")
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
        suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
        suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
        suite.set("time", _seconds(rng.randint(1000, 99999)))
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_reports(directory: Path, seed: int, sizes: Sequence[int]) -> Path:
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    for i, n in enumerate(sizes):
        write_junit(directory / f"report-{i}.xml", rng, n, f"s{seed}f{i}")
    # Not a JUnit report: the CLI must skip it.
    (directory / "coverage.xml").write_text('<?xml version="1.0"?>\n<coverage line-rate="0.9"/>\n')
    return directory


@dataclass(frozen=True)
class Expected:
    key: str
    name: str
    folder: str
    status: str
    elapsed: int | None
    file: str | None
    line: int | None
    assertions: int | None
    fields: str  # canonical JSON


def canonical(fields: list[dict[str, Any]]) -> str:
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def expected_fields(case: ET.Element) -> list[dict[str, Any]]:
    """compat.md section 1: status text, stdout (`Output`), stderr (`Errors`) and properties become fields."""
    fields: list[dict[str, Any]] = []
    for tag in ("skipped", "failure", "error"):
        for element in case.findall(tag):
            # The element's text is the value; else its message, else its type. The other ones are meta.
            value = (element.text or "").strip() or None
            meta = {}
            for attribute in ("message", "type"):
                if attribute_value := element.get(attribute):
                    if value is None:
                        value = attribute_value
                    else:
                        meta[attribute] = attribute_value
            if value is not None:
                fields.append({"type": 4, "name": tag.capitalize(), "value": value, "is_highlight": True}
                              | ({"meta": meta} if meta else {}))
    for tag, name in (("system-out", "Output"), ("system-err", "Errors")):
        stream = case.find(tag)
        if stream is not None and (output := (stream.text or "").strip()):
            fields.append({"type": 4, "name": name, "value": output, "is_highlight": False})
    for prop in case.iterfind("properties/property"):
        fields.append({"type": 1, "name": prop.get("name"), "value": prop.get("value"), "is_highlight": False})
    return fields


def expected_results(directory: Path) -> list[Expected]:
    """The results the CLI should send for the reports in `directory`, read back from the XML alone."""
    results = []
    for report in sorted(directory.glob("*.xml")):
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name")
            if not name:
                continue
            children = {child.tag for child in case}
            status = next((s for s in ("error", "failure", "skipped") if s in children), "passed")
            classname = case.get("classname") or None
            seconds = case.get("time")
            line, assertions = case.get("line"), case.get("assertions")
            results.append(Expected(
                key=hashlib.sha256((f"{classname}.{name}" if classname else name).encode()).hexdigest(),
                name=name, folder=classname or FOLDER_FALLBACK, status=status,
                elapsed=round(float(seconds) * 1_000_000) if seconds else None,
                file=case.get("file"), line=int(line) if line else None,
                assertions=int(assertions) if assertions else None,
                fields=canonical(expected_fields(case))))
    return results


def expected_counters(results: Sequence[Expected]) -> dict[str, int]:
    statuses = Counter(r.status for r in results)
    passed, failed, skipped = statuses["passed"], statuses["failure"] + statuses["error"], statuses["skipped"]
    return {
        "untested_count": 0,
        "status1_count": passed, "success_count": passed,
        "status2_count": failed, "failure_count": failed,
        "status3_count": 0, "status4_count": 0,
        "status5_count": skipped,
        "completed_count": passed + failed + skipped,
        "total_count": len(results),
    }


def computed_elapsed(results: Sequence[Expected]) -> int:
    """The thread's `elapsed_computed` the CLI sends when the reports carry no total time of their own (these
    have several suites and no time on the root): the sum of its tests' times."""
    return sum(r.elapsed or 0 for r in results)


def expected_status_ids(results: Sequence[Expected]) -> dict[int, int]:
    return dict(Counter(STATUS_ID[r.status] for r in results))


def stored_results(engine: Engine, run_id: int) -> dict[int, Counter[Expected]]:
    """The stored results of a run by thread, in the shape of `Expected`."""
    names = {v: k for k, v in STATUS_ID.items() if k != "error"}
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT thread_id, key, name, folder, status_id, elapsed, file, line, assertions, fields "
            "FROM automation_results WHERE run_id = :r"), {"r": run_id}).all()
    by_thread: dict[int, Counter[Expected]] = {}
    for thread_id, key, name, folder, status_id, elapsed, file, line, assertions, fields in rows:
        status = names.get(status_id, str(status_id))
        by_thread.setdefault(thread_id, Counter())[
            Expected(key, name, folder, status, elapsed, file, line, assertions, canonical(fields or []))] += 1
    return by_thread


def as_stored(results: Sequence[Expected]) -> Counter[Expected]:
    """`error` and `failure` are one status once stored."""
    return Counter(Expected(r.key, r.name, r.folder, "failure" if r.status == "error" else r.status,
                            r.elapsed, r.file, r.line, r.assertions, r.fields) for r in results)


def assert_same_results(stored: Counter[Expected], expected: Counter[Expected]) -> None:
    missing, extra = list((expected - stored).elements()), list((stored - expected).elements())
    assert not missing and not extra, (
        f"{len(missing)} expected results not stored, {len(extra)} unexpected ones stored;\n"
        f"first missing: {missing[:3]}\nfirst unexpected: {extra[:3]}")


def dead_letters(engine: Engine, run_id: int) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT kind, error FROM dead_letters WHERE run_id = :r"),
                                 {"r": run_id}).all())


def assert_counters(run: dict[str, Any], expected: dict[str, int]) -> None:
    actual = {name: run[name] for name in expected}
    assert actual == expected
    assert all(run[f"status{n}_count"] == 0 for n in range(6, 25))


# --- the flows ---------------------------------------------------------------------------------------------

def test_run_submit(cli_project: CliProject, engine: Engine, tmp_path: Path) -> None:
    """`automation:run:submit`: one run, one thread, appends of at most 250 tests, then complete."""
    reports = write_reports(tmp_path / "reports", seed=1, sizes=[230, 260, 120])
    results = expected_results(reports)
    assert len(results) == 610 and Counter(r.status for r in results).keys() == STATUS_ID.keys()
    assert sum(r.folder == FOLDER_FALLBACK for r in results) > 0

    stdout = cli_project.cli.run(
        "automation:run:submit", "--project-id", str(cli_project.id), "--name", "CLI submit ✓",
        "--source", "unit", "--tags", "cli", "e2e", "--results", f"{reports}/*.xml")
    run_id = printed_run_id(stdout)

    listed = cli_project.api.get(f"/projects/{cli_project.id}/automation/runs")
    assert listed.status_code == 200, listed.text
    assert [r["id"] for r in listed.json()["result"]] == [run_id]

    run = cli_project.api.wait_completed(run_id, timeout=60)
    expected = expected_counters(results)
    assert_counters(run, expected)
    assert run["name"] == "CLI submit ✓" and sorted(run["tags"]) == ["cli", "e2e"]
    assert run["status"] == (3 if expected["failure_count"] else 2)
    assert run["thread_count"] == 1 and run["thread_completed_count"] == 1 and run["thread_active_count"] == 0
    [thread] = run["threads"]
    assert thread["is_completed"] and thread["total_count"] == len(results)
    # measure_elapsed is false for submit: the run takes its longest (only) thread's elapsed.
    assert thread["elapsed"] == run["elapsed"] == computed_elapsed(results)

    assert count_results(engine, run_id) == expected_status_ids(results)
    [stored] = stored_results(engine, run_id).values()
    assert_same_results(stored, as_stored(results))
    assert dead_letters(engine, run_id) == []


def test_parallel_threads(cli_project: CliProject, engine: Engine, tmp_path: Path) -> None:
    """`automation:run:create`, then several `automation:run:submit-thread` at once, then
    `automation:run:complete`."""
    cli = cli_project.cli
    started = time.monotonic()
    stdout = cli.run("automation:run:create", "--project-id", str(cli_project.id), "--name", "CLI parallel",
                     "--source", "integration")
    run_id = printed_run_id(stdout)

    dirs = [write_reports(tmp_path / f"thread-{i}", seed=100 + i, sizes=[90 + 20 * i, 40]) for i in range(THREADS)]
    per_thread = [expected_results(d) for d in dirs]
    commands = [["automation:run:submit-thread", "--run-id", str(run_id), "--results", f"{d}/*.xml"]
                for d in dirs]
    cli.run_parallel(commands, tmp_path)
    cli.run("automation:run:complete", "--run-id", str(run_id))

    run = cli_project.api.wait_completed(run_id, timeout=60)
    results = [r for thread in per_thread for r in thread]
    expected = expected_counters(results)
    assert_counters(run, expected)
    assert run["status"] == (3 if expected["failure_count"] else 2)
    assert run["thread_count"] == THREADS and run["thread_completed_count"] == THREADS
    assert run["thread_active_count"] == 0
    assert all(t["is_completed"] for t in run["threads"])
    assert sorted((t["total_count"], t["elapsed"]) for t in run["threads"]) == sorted(
        (len(t), computed_elapsed(t)) for t in per_thread)
    assert 0 < run["elapsed"] < (time.monotonic() - started) * 1_000_000  # measured: complete minus create

    assert count_results(engine, run_id) == expected_status_ids(results)
    # Each thread holds exactly the results of one CLI process (keys differ between report directories).
    directory_of = {r.key: i for i, thread in enumerate(per_thread) for r in thread}
    stored = list(stored_results(engine, run_id).values())
    matched = [directory_of[next(iter(thread)).key] for thread in stored]
    assert sorted(matched) == list(range(THREADS))
    for thread, i in zip(stored, matched, strict=True):
        assert_same_results(thread, as_stored(per_thread[i]))
    assert dead_letters(engine, run_id) == []

    # The run is closed: another thread is refused by the CLI with the server's message.
    late = cli.command("automation:run:submit-thread", "--run-id", str(run_id), "--results", f"{dirs[0]}/*.xml")
    done = subprocess.run(late, env=cli.env, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert done.returncode != 0, done.stdout
    assert "already completed" in done.stdout + done.stderr, done.stdout + done.stderr
    assert cli_project.api.run(run_id)["thread_count"] == THREADS


# --- what the CLI cuts, and numbers beyond a column -----------------------------------------------------------

# The CLI's own limits (compat.md section 1), counted as JavaScript counts: in UTF-16 code units.
CLI_STRING, CLI_TEXT = 750, 16 * 1024


def js_cut(s: str, start: int, end: int | None = None) -> str:
    """JavaScript's `s.substring(start, end)`: by UTF-16 code unit, so it can split a surrogate pair."""
    units = s.encode("utf-16-le", "surrogatepass")
    return units[2 * start: None if end is None else 2 * end].decode("utf-16-le", "surrogatepass")


def cli_text(s: str) -> str:
    """The CLI's cut of a text or console value: its head and tail around a marker."""
    length = len(s.encode("utf-16-le", "surrogatepass")) // 2
    if length <= CLI_TEXT:
        return s
    part = CLI_TEXT // 2 - 10
    return js_cut(s, 0, part) + "...\n\n[...]\n\n..." + js_cut(s, length - part)


def as_stored_text(s: str) -> str:
    """What the server stores for a string with lone surrogates: U+FFFD in place of each."""
    return re.sub("[\ud800-\udfff]", "\ufffd", s)


def test_values_the_cli_cuts_inside_an_emoji_are_stored(cli_project: CliProject, engine: Engine,
                                                          tmp_path: Path) -> None:
    """A JUnit file whose long values the CLI cuts in the middle of an emoji (it sends half of the surrogate
    pair), with numbers past what their columns hold and fields with empty names, beside ordinary tests in the
    same batch of 250: every test is stored, with U+FFFD where the half character was."""
    from xml.sax.saxutils import escape as xml_text
    from xml.sax.saxutils import quoteattr

    emoji = "😀"
    cut_name = "n" * (CLI_STRING - 1) + emoji + " and the rest"  # cut after the emoji's first half
    message = "m" * (CLI_STRING - 1) + emoji + "!"
    # The head of a long text ends inside an emoji, and its tail starts inside another one.
    failure = "t" * (CLI_TEXT // 2 - 11) + emoji + "x" * 9000 + emoji + "y" * (CLI_TEXT // 2 - 11)
    output = "o" * (CLI_TEXT // 2 - 11) + emoji + "p" * 9000
    html = "h" * (CLI_TEXT - 1) + emoji + "z"
    url = "https://ci.example.com/" + "p" * 726 + emoji + "/shot-{i}.png"
    fillers = [f"test_{i:03d} {emoji}" for i in range(296)]

    cases = [f'<testcase classname="emoji.Fillers" name={quoteattr(name)} time="0.001"/>' for name in fillers]
    cases.insert(10, (
        f'<testcase classname="emoji.Cuts" name={quoteattr(cut_name)} time="0.5">'
        f'<failure message={quoteattr(message)} type="AssertionError">{xml_text(failure)}</failure>'
        f'<system-out>[[PROPERTY| =blank]]\n{xml_text(output)}</system-out>'
        f'<properties><property name="html:Report" value={quoteattr(html)}/>'
        '<property name="string:" value="empty name"/></properties>'
        '</testcase>'))
    # 10^20 seconds is 1e+26 microseconds as JavaScript prints it; line and assertions past 32 bits.
    cases.insert(100, '<testcase classname="emoji.Numbers" name="huge" time="100000000000000000000" '
                      'line="99999999999" assertions="99999999999999999999999"/>')
    # A literal NUL, which XML forbids but the CLI's parser passes on, as `\u0000`.
    nul_name = "nul\x00inside"
    cases.insert(150, f'<testcase classname="emoji.Nul" name={quoteattr(nul_name)}>'
                      '<system-out>a\x00b</system-out></testcase>')
    # More properties and attachments than the CLI sends for one test: it keeps 24 of each.
    attachments = "\n".join(f"[[ATTACHMENT|{url.format(i=i)}]]" for i in range(30))
    properties = "".join(f'<property name="prop-{i}" value="v{i}"/>' for i in range(30))
    cases.insert(200, f'<testcase classname="emoji.Many" name="many"><system-out>{xml_text(attachments)}'
                      f'</system-out><properties>{properties}</properties></testcase>')
    report = tmp_path / "emoji.xml"
    report.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="emoji">'
                      + "".join(cases) + "</testsuite>\n", encoding="utf-8")

    stdout = cli_project.cli.run("automation:run:submit", "--project-id", str(cli_project.id),
                                 "--name", "Cut inside an emoji", "--source", "unicode", "--results", str(report))
    run_id = printed_run_id(stdout)
    run = cli_project.api.wait_completed(run_id, timeout=60)
    assert (run["total_count"], run["failure_count"], run["success_count"]) == (300, 1, 299)
    assert run["status1_count"] == 299 and run["status2_count"] == 1 and run["completed_count"] == 300
    assert run["elapsed"] == run["threads"][0]["elapsed"] == 2**63 - 1  # the sum of times includes 1e+26
    assert dead_letters(engine, run_id) == []

    with engine.connect() as conn:
        rows = {r.key: r for r in conn.execute(text(
            "SELECT key, name, folder, status_id, elapsed, line, assertions, fields, artifacts "
            "FROM automation_results WHERE run_id = :r"), {"r": run_id})}

    def key(folder: str, name: str) -> str:
        return hashlib.sha256(f"{folder}.{name}".encode()).hexdigest()  # of the whole name, before the cut

    assert len(rows) == 300
    for name in fillers:
        assert rows[key("emoji.Fillers", name)].name == name

    cut = rows[key("emoji.Cuts", cut_name)]
    assert cut.name == "n" * (CLI_STRING - 1) + "\ufffd"
    assert (cut.folder, cut.status_id, cut.elapsed) == ("emoji.Cuts", 3, 500_000)
    assert cut.fields == [
        {"type": 4, "name": "Failure", "value": as_stored_text(cli_text(failure)), "is_highlight": True,
         "meta": {"message": "m" * (CLI_STRING - 1) + "\ufffd", "type": "AssertionError"}},
        {"type": 4, "name": "Output", "value": as_stored_text(cli_text(output)), "is_highlight": False},
        {"type": 1, "name": "", "value": "blank", "is_highlight": False},
        {"type": 3, "name": "Report", "value": "h" * (CLI_TEXT - 1) + "\ufffd", "is_highlight": False},
        {"type": 1, "name": "", "value": "empty name", "is_highlight": False},
    ]
    # Both ends of the failure text were cut inside an emoji.
    assert cut.fields[0]["value"].startswith("t" * (CLI_TEXT // 2 - 11) + "\ufffd...")
    assert cut.fields[0]["value"].endswith("...\ufffd" + "y" * (CLI_TEXT // 2 - 11))

    nul = rows[key("emoji.Nul", nul_name)]
    assert nul.name == "nul\ufffdinside"
    assert nul.fields == [{"type": 4, "name": "Output", "value": "a\ufffdb", "is_highlight": False}]

    huge = rows[key("emoji.Numbers", "huge")]
    assert (huge.elapsed, huge.line, huge.assertions) == (2**63 - 1, 2**31 - 1, 2**31 - 1)

    many = rows[key("emoji.Many", "many")]
    assert many.fields == [{"type": 1, "name": f"prop-{i}", "value": f"v{i}", "is_highlight": False}
                           for i in range(24)]
    assert many.artifacts == [{"name": f"shot-{i}.png", "url": as_stored_text(js_cut(url.format(i=i), 0, 750)),
                               "mime_type": "image/png"} for i in range(24)]
    assert all(a["url"].endswith("p\ufffd") for a in many.artifacts)


# --- the database down while CI jobs start --------------------------------------------------------------------

OUTAGE_SECONDS = 60
SUBMITS = 25
SUBMIT_THREADS = 23  # with the create and the complete around them: 25 more CLI jobs


def test_jobs_that_start_while_the_database_is_down_all_succeed(testmo: Path, tmp_path: Path) -> None:
    """PostgreSQL stopped for a minute; 50 official-CLI jobs start during it, in both flows (`submit`, and
    `create` + parallel `submit-thread` + `complete`). Every one succeeds, and once the database is back
    every result is applied once and every counter is exact."""
    from support import PrivatePostgres, PrivateRedis, start_worker

    from schema.db import upgrade
    from schema.settings import Settings

    pg, redis_server = PrivatePostgres(), PrivateRedis(tmp_path)
    services: list[Service] = []
    try:
        upgrade(pg.url)
        subprocess.run([str(ROOT / "scripts" / "make-cert.sh"), str(tmp_path / "cert"), "127.0.0.1"], check=True,
                       capture_output=True, timeout=60)
        cert = tmp_path / "cert" / "cert.pem"
        env = service_env(database_url=pg.url, redis_url=redis_server.url, queue=unique("outage"))
        api_service, url = start_api(env, tmp_path / "api.log", tls=(cert, tmp_path / "cert" / "key.pem"))
        services.append(api_service)
        services.append(start_worker(env, tmp_path / "worker.log"))
        admin = Admin(Settings(database_url=pg.url, redis_url=redis_server.url))
        project_id = admin.create_project("outage")
        token = admin.create_token("ci", [project_id])
        admin.close()
        cli_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        cli_env |= {"TESTMO_TOKEN": token, "NODE_EXTRA_CA_CERTS": str(cert), "CI": "true"}
        tls = TlsApi(url, cert, api_service, cast(Pipeline, SimpleNamespace(worker=services[1])))
        cli = Cli(testmo, tls, cli_env)

        # Before the outage, a job as every fleet has run: the shim has seen the token and the project.
        warm = write_reports(tmp_path / "warm", seed=900, sizes=[20])
        cli.run("automation:run:submit", "--project-id", str(project_id), "--name", "before", "--source", "unit",
                "--results", f"{warm}/*.xml")

        pg.stop()
        down_at = time.monotonic()
        submits = [write_reports(tmp_path / f"submit-{i}", seed=1000 + i, sizes=[30]) for i in range(SUBMITS)]
        threads = [write_reports(tmp_path / f"thread-{i}", seed=2000 + i, sizes=[30]) for i in range(SUBMIT_THREADS)]
        stdouts = cli.run_parallel([["automation:run:submit", "--project-id", str(project_id), "--name",
                                     f"during {i}", "--source", "unit", "--results", f"{d}/*.xml"]
                                    for i, d in enumerate(submits)], tmp_path)
        submitted = [printed_run_id(out) for out in stdouts]
        parallel = printed_run_id(cli.run("automation:run:create", "--project-id", str(project_id), "--name",
                                          "parallel during", "--source", "integration"))
        cli.run_parallel([["automation:run:submit-thread", "--run-id", str(parallel), "--results", f"{d}/*.xml"]
                          for d in threads], tmp_path)
        cli.run("automation:run:complete", "--run-id", str(parallel))
        assert time.monotonic() - down_at < OUTAGE_SECONDS, "the jobs should all have run during the outage"
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        pg.start()

        engine = create_engine(pg.url)
        client = tls.client(token)
        try:
            for run_id, directory in [*zip(submitted, submits, strict=True), (parallel, None)]:
                run = client.wait_completed(run_id, timeout=120)
                results = (expected_results(directory) if directory is not None
                           else [r for d in threads for r in expected_results(d)])
                assert_counters(run, expected_counters(results))
                assert count_results(engine, run_id) == expected_status_ids(results)
                assert dead_letters(engine, run_id) == []
            assert client.run(parallel)["thread_count"] == SUBMIT_THREADS
        finally:
            client.close()
            engine.dispose()
    finally:
        for service in services:
            service.stop()
        redis_server.stop()
        pg.close()
