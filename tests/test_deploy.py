"""deploy/ checked offline (no Docker engine, no cluster): every file parses and validates against the schema of
what will read it, runs the commands the README documents (and the CLI accepts), probes what the services
serve, and uses only metrics the services export.

Schemas come from packages or from tests/schemas/, never from the network:
- Kubernetes: the `kubernetes-validate` package (the API's OpenAPI schemas per version), in strict mode.
- KEDA ScaledObject: tests/schemas/keda-scaledobject.schema.yaml, written for these tests (its header says how).
- Compose: the Compose specification's JSON schema as the `check-jsonschema` package ships it.
"""

import argparse
import ast
import itertools
import json
import re
import shlex
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from ingest.cli import parser
from schema.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.29"

# The metrics the shim and the workers document, by type. tests/test_metrics.py checks that the running services
# export each of them; here, that the dashboard and the alert rules use nothing else.
DOCUMENTED_METRICS: dict[str, str] = {
    # The shim: the installation's figures (read from Redis and PostgreSQL at scrape time), then its own.
    "ingest_queue_messages": "gauge",
    "ingest_queue_depth": "gauge",
    "ingest_queue_oldest_waiting_seconds": "gauge",
    "ingest_queue_oldest_reserved_seconds": "gauge",
    "ingest_appends_accepted_total": "counter",
    "ingest_results_accepted_total": "counter",
    "ingest_operations_applied_total": "counter",
    "ingest_results_applied_total": "counter",
    "ingest_dead_letters": "gauge",
    "ingest_runs_open": "gauge",
    "ingest_runs_stuck": "gauge",
    "ingest_workers_alive": "gauge",
    "ingest_http_requests_total": "counter",
    "ingest_http_request_duration_seconds": "histogram",
    # A worker, on --metrics-port (9101).
    "ingest_worker_batches_applied_total": "counter",
    "ingest_worker_operations_applied_total": "counter",
    "ingest_worker_results_applied_total": "counter",
    "ingest_worker_apply_duration_seconds": "histogram",
    "ingest_worker_retries_total": "counter",
    "ingest_worker_dead_letters_total": "counter",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

SHIM_PATHS = {"health": "/healthz", "ready": "/readyz", "metrics": "/metrics"}
WORKER_PATHS = {"health": "/healthz", "metrics": "/metrics"}
MIN_WORKER_GRACE_SECONDS = 120  # the longest batch takes well under 60 s; twice that, at least


# --- reading the files -------------------------------------------------------------------------------------------

def load_yaml(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in deploy/k8s (the kustomization is kustomize's file, not an object)."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_yaml(path)]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def only_container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(obj)["containers"]
    assert isinstance(container, dict)
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port {port!r} is not a named port of container {container['name']!r}"
    return int(named[port])


def labels_select(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def seconds(duration: str) -> float:
    """A Compose duration: 120s, 2m, 1m30s, 1.5h, 500ms."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity: 500m, 2, 256Mi, 1Gi."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"not a quantity: {value!r}"
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match[2]]
    return float(match[1]) * factor


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


# --- the README's commands ---------------------------------------------------------------------------------------

@dataclass
class Synopsis:
    """One documented command: its subcommand words, the options it shows, and the words outside [brackets]."""

    subcommand: tuple[str, ...]
    options: set[str] = field(default_factory=set)
    required: list[str] = field(default_factory=list)


def parse_synopsis(line: str) -> list[Synopsis]:
    """`ingest api --host 0.0.0.0 --port 8000 [--workers N]` and the like; `dlq list|replay` gives two."""
    words = line.split()
    assert words[0] == "ingest"
    i = 1
    alternatives: list[tuple[str, ...]] = [()]
    while i < len(words) and re.fullmatch(r"[a-z][a-z0-9-]*(\|[a-z][a-z0-9-]*)*", words[i]):
        alternatives = [(*prefix, choice) for prefix in alternatives for choice in words[i].split("|")]
        i += 1
    options: set[str] = set()
    required: list[str] = []
    depth = 0
    for word in words[i:]:
        depth += word.count("[")
        bare = word.strip("[]")
        if bare.startswith("--"):
            options.add(bare.split("=", 1)[0])
        if depth == 0 and bare:
            required.append(bare)
        depth -= word.count("]")
    return [Synopsis(sub, set(options), ["ingest", *sub, *required]) for sub in alternatives]


def readme_synopses() -> dict[tuple[str, ...], Synopsis]:
    """Every line of the README's fenced code blocks that starts with `ingest `, by subcommand."""
    text = (ROOT / "README.md").read_text()
    synopses: dict[tuple[str, ...], Synopsis] = {}
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            if not line.startswith("ingest "):
                continue
            for synopsis in parse_synopsis(re.sub(r"\s+#.*$", "", line)):
                known = synopses.setdefault(synopsis.subcommand, Synopsis(synopsis.subcommand,
                                                                          required=synopsis.required))
                known.options |= synopsis.options
    return synopses


def test_readme_synopsis_parsing() -> None:
    (api,) = parse_synopsis("ingest api --host 0.0.0.0 --port 8000 [--workers N] [--tls-cert F --tls-key F]")
    assert api.subcommand == ("api",)
    assert api.options == {"--host", "--port", "--workers", "--tls-cert", "--tls-key"}
    assert api.required == ["ingest", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert [s.subcommand for s in parse_synopsis("ingest dlq list|replay")] == [("dlq", "list"), ("dlq", "replay")]
    (create,) = parse_synopsis("ingest admin project create NAME")
    assert create.subcommand == ("admin", "project", "create") and create.options == set()
    synopses = readme_synopses()
    assert {("db", "upgrade"), ("api",), ("worker",)} <= set(synopses)


def deploy_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, command) for every process deploy/ starts."""
    services = compose()["services"]
    for name in ("migrate", "api", "worker"):
        yield f"compose.yaml services.{name}", services[name]["command"]
    for kind, name in (("Job", "ingest-migrate"), ("Deployment", "ingest-api"), ("Deployment", "ingest-worker")):
        container = only_container(k8s_object(kind, name))
        yield f"k8s {kind} {name}", container["args"]
    yield "Dockerfile CMD", dockerfile_cmd()


# Where each process is started, and the subcommand it must run.
DEPLOY_COMMANDS: dict[str, tuple[str, ...]] = {
    "compose.yaml services.migrate": ("db", "upgrade"),
    "compose.yaml services.api": ("api",),
    "compose.yaml services.worker": ("worker",),
    "k8s Job ingest-migrate": ("db", "upgrade"),
    "k8s Deployment ingest-api": ("api",),
    "k8s Deployment ingest-worker": ("worker",),
    "Dockerfile CMD": ("api",),
}


def cli_args(command: list[str]) -> argparse.Namespace:
    """What the real `ingest` parser makes of a command (argparse exits on an error: turn that into a failure)."""
    assert command[0] == "ingest", command
    try:
        return parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(command)}` is refused by ingest.cli's parser")


@pytest.mark.parametrize("source", DEPLOY_COMMANDS)
def test_deploy_commands_are_documented_and_accepted(source: str) -> None:
    commands = dict(deploy_commands())
    assert set(commands) == set(DEPLOY_COMMANDS)
    command = commands[source]
    assert all(isinstance(word, str) for word in command), f"{source}: every word must be a string: {command}"
    assert command[0] == "ingest", f"{source} runs `{shlex.join(command)}`"
    subcommand = tuple(itertools.takewhile(lambda word: not word.startswith("-"), command[1:]))
    assert subcommand == DEPLOY_COMMANDS[source], f"{source} runs `{shlex.join(command)}`"
    synopsis = readme_synopses().get(subcommand)
    assert synopsis is not None, f"the README documents no `ingest {' '.join(subcommand)}`"
    used = {word.split("=", 1)[0] for word in command if word.startswith("--")}
    undocumented = used - synopsis.options
    assert not undocumented, (f"{source} runs `{shlex.join(command)}`, whose options {sorted(undocumented)} the "
                              f"README does not show for `ingest {' '.join(subcommand)}`")
    cli_args(command)


def dockerfile_cmd() -> list[str]:
    cmds = [rest for keyword, rest in dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "deploy/Dockerfile has no CMD"
    command = json.loads(cmds[-1])  # exec form: a JSON array, so signals reach the process
    assert isinstance(command, list)
    return command


def test_dockerfile_runs_the_readme_api_command_as_non_root() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    final_stage = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"):]
    assert final_stage[0][1].startswith("python:3.11-slim")
    assert dockerfile_cmd() == readme_synopses()[("api",)].required
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    # Numeric, so that Kubernetes can verify runAsNonRoot; and the same UID the pods ask for.
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}"
    for _, obj in k8s_documents():
        if "template" in obj.get("spec", {}):
            context = pod_spec(obj)["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == int(user), obj["metadata"]["name"]


# --- YAML, and the schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_yaml_parses(path: str) -> None:
    documents = load_yaml(DEPLOY / path)
    assert documents and all(isinstance(doc, dict) for doc in documents), f"{path}: no mapping documents"


def strict(schema: Any) -> Any:
    """A CRD schema that forbids unknown fields where it lists the known ones, as kubectl's strict validation does
    (a structural schema alone would let the API server prune them silently)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def keda_validator() -> jsonschema.protocols.Validator:
    (schema,) = load_yaml(SCHEMAS / "keda-scaledobject.schema.yaml")
    return jsonschema.Draft7Validator(strict(schema))


def validate_k8s(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        keda_validator().validate(doc)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     KUBERNETES_VERSION, strict=True)  # its metadata is a Kubernetes ObjectMeta
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_kubernetes_manifest_validates(path: str) -> None:
    for doc in load_yaml(K8S / path):
        try:
            validate_k8s(doc)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path}: {exc.message}")
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{path}: {doc['kind']} {doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}")


def test_the_validators_reject_unknown_fields() -> None:
    """Strict mode is on: a misspelt field fails, rather than being dropped by the API server."""
    api = k8s_object("Deployment", "ingest-api")
    validate_k8s(api)
    only_container(api)["readinesProbe"] = only_container(api).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate_k8s(api)

    scaled = k8s_object("ScaledObject", "ingest-worker")
    validate_k8s(scaled)
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate_k8s(scaled)
    scaled["spec"]["minReplicaCount"] = "2"
    del scaled["spec"]["minReplicas"]
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        validate_k8s(scaled)

    spec = compose_validator()
    doc = compose()
    spec.validate(doc)
    doc["services"]["worker"]["stop_grace_periods"] = doc["services"]["worker"].pop("stop_grace_period")
    with pytest.raises(jsonschema.ValidationError, match="stop_grace_periods"):
        spec.validate(doc)


def compose_validator() -> jsonschema.protocols.Validator:
    vendored = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(schema)
    return validator


def test_compose_validates_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(map(str, e.absolute_path)))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# --- Compose -----------------------------------------------------------------------------------------------------

def test_compose_services_start_in_order() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    conditions = {name: {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
                  for name, service in services.items()}
    assert conditions["migrate"] == {"postgres": "service_healthy"}
    assert conditions["api"] == {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    assert conditions["worker"]["migrate"] == "service_completed_successfully"
    assert services["migrate"]["restart"] == "no"
    # A dependency's healthy condition needs its healthcheck; its data needs a named volume.
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
        sources = [volume.split(":")[0] for volume in services[name]["volumes"]]
        assert sources and all(source in doc["volumes"] for source in sources), f"{name}: {sources}"
    # One environment block (an x- anchor, so the same object after loading) for every ingest process.
    env = services["migrate"]["environment"]
    assert services["api"]["environment"] is env and services["worker"]["environment"] is env
    assert any(key.startswith("x-") and value is env for key, value in doc.items())


def test_compose_redis_persists_every_write() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options.get("--appendonly") == "yes" and options.get("--appendfsync") == "always", command


def interpolate(value: str, variables: dict[str, str]) -> str:
    """A Compose value with ${NAME}, ${NAME:?message} and ${NAME:-default} filled in, as Compose does."""
    def fill(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2] or "", match[3] or ""
        if variables.get(name):
            return variables[name]
        assert "?" not in operator, f"Compose would refuse to start: {argument}"
        return argument if "-" in operator else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}", fill, value)


# What an operator exports before `docker compose up` (deploy/README.md).
COMPOSE_VARIABLES = {"POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret"}


def test_compose_redis_requires_the_password_every_service_connects_with() -> None:
    services = compose()["services"]
    redis = services["redis"]
    raw = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    # Required (:?): without the variable Compose refuses to start, rather than run Redis without a password.
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", raw.get("--requirepass", "")), redis["command"]
    assert interpolate(raw["--requirepass"], COMPOSE_VARIABLES) == "redis-secret"
    with pytest.raises(AssertionError, match="Compose would refuse"):
        interpolate(raw["--requirepass"], {})
    connecting = {name for name, service in services.items() if "INGEST_REDIS_URL" in service.get("environment", {})}
    assert connecting == {"migrate", "api", "worker"}
    for name in connecting:
        url = urllib.parse.urlsplit(interpolate(services[name]["environment"]["INGEST_REDIS_URL"], COMPOSE_VARIABLES))
        assert (url.hostname, url.password) == ("redis", "redis-secret"), name
    # The health check must log in too, and tell a PONG from a NOAUTH (redis-cli exits 0 on both).
    assert interpolate(redis["environment"]["REDISCLI_AUTH"], COMPOSE_VARIABLES) == "redis-secret"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"]) and "PONG" in redis["healthcheck"]["test"][-1]


def test_compose_publishes_only_the_api_port() -> None:
    """PostgreSQL, Redis and the workers' metrics stay on the project's network; only the API is published."""
    services = compose()["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    api_port = cli_args(services["api"]["command"]).port
    assert published == {"api": [f"{api_port}:{api_port}"]}
    # Host networking would publish every port a container listens on.
    assert [name for name, service in services.items() if "network_mode" in service] == []


def test_make_run_binds_the_worker_metrics_to_loopback() -> None:
    lines = [line.strip().removesuffix("&").strip() for line in (ROOT / "scripts" / "run.sh").read_text().splitlines()
             if line.strip().startswith("ingest worker")]
    assert lines, "scripts/run.sh starts no worker"
    for line in lines:
        assert cli_args(shlex.split(line)).metrics_host == "127.0.0.1", line


def healthcheck_url(service: dict[str, Any]) -> urllib.parse.SplitResult:
    test = service["healthcheck"]["test"]
    text: str = " ".join(test) if isinstance(test, list) else test
    urls: list[str] = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, test
    return urllib.parse.urlsplit(urls[0])


def test_compose_health_checks_ask_the_documented_endpoints() -> None:
    services = compose()["services"]
    api_port = cli_args(services["api"]["command"]).port
    url = healthcheck_url(services["api"])
    assert (url.port, url.path) == (api_port, SHIM_PATHS["ready"])
    assert f"{api_port}:{api_port}" in services["api"]["ports"]
    url = healthcheck_url(services["worker"])
    assert (url.port, url.path) == (cli_args(services["worker"]["command"]).metrics_port, WORKER_PATHS["health"])


# --- settings and grace periods ----------------------------------------------------------------------------------

def settings_keys(env: dict[str, Any]) -> set[str]:
    return {key.removeprefix("INGEST_").lower() for key in env}


def test_environment_names_are_real_settings() -> None:
    """A misspelt INGEST_ variable would be ignored silently (Settings ignores unknown variables)."""
    known = set(Settings.model_fields)
    configmap = k8s_object("ConfigMap", "ingest-config")["data"]
    secret = k8s_object("Secret", "ingest-secrets")["stringData"]
    env = compose()["services"]["api"]["environment"]
    for where, values in (("configmap.yaml", configmap), ("secret.example.yaml", secret), ("compose.yaml", env)):
        assert all(key.startswith("INGEST_") for key in values), where
        assert settings_keys(values) <= known, f"{where}: unknown settings {sorted(settings_keys(values) - known)}"
    # Credentials are in the Secret only, and together the two give every container all it needs.
    assert set(secret) == {"INGEST_DATABASE_URL", "INGEST_REDIS_URL"}
    assert not set(configmap) & set(secret)
    assert set(configmap) | set(secret) == set(env)
    assert "secret store" in (K8S / "secret.example.yaml").read_text()


def test_worker_grace_period_outlasts_a_batch_and_not_the_visibility_timeout() -> None:
    default = Settings.model_fields["visibility_timeout"].default
    assert isinstance(default, int)
    # Kubernetes: the worker's pods load configmap.yaml, whose timeout (or the default) is the one that holds.
    worker = k8s_object("Deployment", "ingest-worker")
    sources = [ref["configMapRef"]["name"] for ref in only_container(worker)["envFrom"] if "configMapRef" in ref]
    assert sources == ["ingest-config"]
    timeout = int(k8s_object("ConfigMap", "ingest-config")["data"].get("INGEST_VISIBILITY_TIMEOUT", default))
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert MIN_WORKER_GRACE_SECONDS <= grace < timeout
    # Compose.
    service = compose()["services"]["worker"]
    timeout = int(service["environment"].get("INGEST_VISIBILITY_TIMEOUT", default))
    assert MIN_WORKER_GRACE_SECONDS <= seconds(service["stop_grace_period"]) < timeout
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_duration_and_quantity_parsing() -> None:
    assert seconds("120s") == 120 and seconds("2m") == 120 and seconds("1m30s") == 90 and seconds("500ms") == 0.5
    with pytest.raises(AssertionError):
        seconds("120")
    assert quantity("500m") == 0.5 and quantity("2") == 2 and quantity("1Gi") == 2**30
    assert quantity("256Mi") < quantity("1Gi")


# --- Kubernetes: probes, resources, selectors, scaling ----------------------------------------------------------

def test_probes_and_scrape_annotations_point_at_what_the_processes_serve() -> None:
    api = k8s_object("Deployment", "ingest-api")
    container = only_container(api)
    port = cli_args(container["args"]).port
    for probe, path in (("readinessProbe", SHIM_PATHS["ready"]), ("livenessProbe", SHIM_PATHS["health"])):
        get = container[probe]["httpGet"]
        assert (get["path"], container_port(container, get["port"])) == (path, port), probe
    assert container["lifecycle"]["preStop"], "the shim must keep serving while the Service drains it"
    assert pod_spec(api)["terminationGracePeriodSeconds"] > int(container["lifecycle"]["preStop"]["exec"]
                                                                ["command"][-1])
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (port,
                                                                                            SHIM_PATHS["metrics"])

    worker = k8s_object("Deployment", "ingest-worker")
    container = only_container(worker)
    port = cli_args(container["args"]).metrics_port
    get = container["livenessProbe"]["httpGet"]
    assert (get["path"], container_port(container, get["port"])) == (WORKER_PATHS["health"], port)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (port,
                                                                                            WORKER_PATHS["metrics"])


def test_every_container_has_requests_and_limits() -> None:
    containers = [(obj["metadata"]["name"], c) for _, obj in k8s_documents() if "template" in obj.get("spec", {})
                  for c in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", [])]
    assert len(containers) == 3
    for name, container in containers:
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request, limit = resources["requests"][resource], resources["limits"][resource]
            assert quantity(request) <= quantity(limit), f"{name}: {resource} request {request} > limit {limit}"
        # Every ingest process reads its settings and credentials the same way.
        refs = {(kind, ref[kind]["name"]) for ref in container["envFrom"] for kind in ref}
        assert refs == {("configMapRef", "ingest-config"), ("secretRef", "ingest-secrets")}, name


def test_selectors_select_the_pods_they_mean() -> None:
    deployments = {obj["metadata"]["name"]: obj for _, obj in k8s_documents() if obj["kind"] == "Deployment"}
    assert set(deployments) == {"ingest-api", "ingest-worker"}
    labels = {name: obj["spec"]["template"]["metadata"]["labels"] for name, obj in deployments.items()}
    for name, obj in deployments.items():
        assert labels_select(obj["spec"]["selector"]["matchLabels"], labels[name]), f"{name} does not select its pods"

    def selected(selector: dict[str, str]) -> set[str]:
        return {name for name, pod_labels in labels.items() if labels_select(selector, pod_labels)}

    service = k8s_object("Service", "ingest-api")
    assert selected(service["spec"]["selector"]) == {"ingest-api"}
    (port,) = service["spec"]["ports"]
    api = only_container(deployments["ingest-api"])
    assert container_port(api, port["targetPort"]) == cli_args(api["args"]).port

    budgets = [obj for _, obj in k8s_documents() if obj["kind"] == "PodDisruptionBudget"]
    protected = []
    for budget in budgets:
        targets = selected(budget["spec"]["selector"]["matchLabels"])
        assert len(targets) == 1, f"PodDisruptionBudget {budget['metadata']['name']} selects {sorted(targets)}"
        (target,) = targets
        protected.append(target)
        assert budget["spec"]["minAvailable"] == 1
        # More pods than the budget keeps, or no node could ever be drained.
        assert minimum_replicas(deployments[target]) > budget["spec"]["minAvailable"], target
    assert sorted(protected) == sorted(deployments)


def minimum_replicas(deployment: dict[str, Any]) -> int:
    """The fewest pods a Deployment runs: its replicas, or the autoscaler's minimum when KEDA owns the count."""
    scalers = [obj for _, obj in k8s_documents() if obj["kind"] == "ScaledObject"
               and obj["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
    if scalers:
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count: re-applying must not reset it"
        return int(scalers[0]["spec"]["minReplicaCount"])
    return int(deployment["spec"].get("replicas", 1))


def test_keda_scales_the_worker_deployment_on_queue_depth() -> None:
    scaled = k8s_object("ScaledObject", "ingest-worker")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"), target["name"]) == (
        "apps/v1", "Deployment", k8s_object("Deployment", "ingest-worker")["metadata"]["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert re.fullmatch(r"(max|sum)\(ingest_queue_depth\)", query.replace(" ", "")), query
    assert metric_names(query) == {"ingest_queue_depth"}
    assert float(trigger["metadata"]["threshold"]) > 0


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert "secret.example.yaml" not in kustomization["resources"]  # it would overwrite the real Secret
    namespace = k8s_object("Namespace", kustomization["namespace"])["metadata"]["name"]
    for path, obj in k8s_documents():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, path
    images = {image["name"] for image in kustomization["images"]}
    for _, obj in k8s_documents():
        if "template" in obj.get("spec", {}):
            assert {c["image"].split(":")[0] for c in pod_spec(obj)["containers"]} <= images


def test_containers_keep_the_image_entrypoint() -> None:
    """`args`, not `command`: the image's ENTRYPOINT (tini) stays PID 1 and forwards SIGTERM to the worker."""
    entrypoints = [rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints and "tini" in json.loads(entrypoints[-1])[0]
    for _, obj in k8s_documents():
        if "template" in obj.get("spec", {}):
            for container in pod_spec(obj)["containers"]:
                assert "command" not in container and container["args"][0] == "ingest", obj["metadata"]["name"]


# --- metric names in PromQL --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>=~|!~|!=|==|<=|>=|[(){}\[\],:@+\-*/%^<>=])
""", re.VERBOSE)
# Followed by a parenthesised list of label names, not of expressions.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"} | _LABEL_LISTS
_CLOSE = {"{": "}", "[": "]", "(": ")"}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}"
        assert match.lastgroup is not None
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def _skip(tokens: list[tuple[str, str]], start: int) -> int:
    """The index of the bracket closing the one at `start`."""
    opening = tokens[start][1]
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i][1] == opening:
            depth += 1
        elif tokens[i][1] == _CLOSE[opening]:
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError(f"unbalanced {opening!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or aggregations (followed
    by `(` or `by`/`without`), keywords, label names (inside {...} or a by/on/... list) or durations ([...])."""
    tokens = _tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text in ("{", "["):
            i = _skip(tokens, i)
        elif kind == "name" and text in _LABEL_LISTS and following == "(":
            i = _skip(tokens, i + 1)
        elif kind == "name" and text not in _KEYWORDS and following != "(" and following not in _LABEL_LISTS:
            names.add(text)
        i += 1
    return names


def test_documented_metrics_are_those_test_metrics_scrapes() -> None:
    """tests/test_metrics.py checks the running services export its sets; they must be this list, or one of the two
    lists has drifted from what the services document."""
    tree = ast.parse((Path(__file__).resolve().parent / "test_metrics.py").read_text())
    scraped: set[str] = set()
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Set)
                and any(isinstance(t, ast.Name) and t.id.endswith("_METRICS") for t in node.targets)):
            scraped |= {ast.literal_eval(element) for element in node.value.elts}
    assert scraped, "tests/test_metrics.py defines no *_METRICS set any more: update this test"
    assert scraped == set(DOCUMENTED_METRICS)


def documented_metric(name: str) -> str | None:
    """The documented metric a series name belongs to: itself, or a histogram's _bucket/_sum/_count series."""
    if name in DOCUMENTED_METRICS:
        return name
    for suffix in HISTOGRAM_SERIES:
        base = name.removesuffix(suffix)
        if base != name and DOCUMENTED_METRICS.get(base) == "histogram":
            return base
    return None


def parsed_metric_names(expr: str) -> set[str]:
    """The same, by a real PromQL parser: the selectors of its syntax tree."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(ingest_http_request_duration_seconds_bucket'
            '{route=~"/api/.*", code!="500"}[5m]))) / on(instance) group_left(job) max without (pod) '
            '(ingest_queue_depth offset 5m) > bool 1e3 and sum(rate(ingest_http_requests_total{code="429"}[1m:15s]))'
            ' unless count(absent(ingest_made_up_metric{le="1"})) or vector(0) atan2 ingest_runs_open')
    expected = {"ingest_http_request_duration_seconds_bucket", "ingest_queue_depth", "ingest_http_requests_total",
                "ingest_made_up_metric", "ingest_runs_open"}
    assert metric_names(expr) == expected
    assert parsed_metric_names(expr) == expected
    assert metric_names('max by (state) (ingest_queue_messages{state="waiting"})') == {"ingest_queue_messages"}
    assert metric_names("sum(rate(x_total[$__rate_interval])) by (code)") == {"x_total"}
    assert documented_metric("ingest_http_request_duration_seconds_bucket") == "ingest_http_request_duration_seconds"
    assert documented_metric("ingest_worker_apply_duration_seconds_count") == "ingest_worker_apply_duration_seconds"
    assert documented_metric("ingest_queue_depth_bucket") is None  # a gauge has no buckets
    assert documented_metric("ingest_made_up_metric") is None
    assert documented_metric("ingest_http_request_duration_seconds") == "ingest_http_request_duration_seconds"


def dashboard() -> dict[str, Any]:
    doc = json.loads((DEPLOY / "grafana" / "ingest-dashboard.json").read_text())
    assert isinstance(doc, dict)
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_use_only_documented_metrics() -> None:
    for where, expressions in (("dashboard", dashboard_expressions()),
                               ("alerts", [rule["expr"] for rule in alert_rules()])):
        assert expressions, where
        for expr in expressions:
            names = metric_names(expr)
            assert names, f"{where}: {expr!r} selects no metric"
            assert names == parsed_metric_names(expr), f"{where}: the tokenizer misreads {expr!r}"
            undocumented = {name for name in names if documented_metric(name) is None}
            assert not undocumented, f"{where}: {expr!r} uses undocumented metrics {sorted(undocumented)}"


def test_dashboard_shows_what_operators_watch() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["type"] == "prometheus", panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    expressions = [" ".join(expr.split()) for expr in dashboard_expressions()]
    shown = {documented_metric(name) for expr in expressions for name in metric_names(expr)}
    missing = set(DOCUMENTED_METRICS) - shown
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"
    assert "sum by (code) (rate(ingest_http_requests_total[1m]))" in expressions
    for q in ("0.5", "0.95", "0.99"):
        assert (f"histogram_quantile({q}, sum by (le) (rate(ingest_worker_apply_duration_seconds_bucket[1m])))"
                in expressions), q
    assert ("histogram_quantile(0.99, sum by (le, route) (rate(ingest_http_request_duration_seconds_bucket[1m])))"
            in expressions)
    for name in ("ingest_appends_accepted_total", "ingest_operations_applied_total", "ingest_results_accepted_total",
                 "ingest_results_applied_total"):
        assert any(f"rate({name}[1m])" in expr for expr in expressions), name
    assert any(re.search(r"by \(state\) \(ingest_queue_messages\)", expr) for expr in expressions)
    # Every range in the dashboard is the one-minute window asked for.
    assert {r for expr in expressions for r in re.findall(r"\[([^\]]+)\]", expr)} == {"1m"}


def test_alert_rules_are_a_valid_rule_file() -> None:
    (doc,) = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")
    assert set(doc) == {"groups"}
    duration = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
    names: list[str] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            promql_parser.parse(rule["expr"])
            assert duration.fullmatch(rule.get("for", "0s")), rule["alert"]
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            names.append(rule["alert"])
    assert len(set(names)) == len(names), "alert names must be unique"
    # The guide explains every alert, and the alerts cover what the guide promises.
    guide = (DEPLOY / "README.md").read_text()
    assert "prometheus/alerts.yaml" in guide
    assert [name for name in DOCUMENTED_METRICS if f"`{name}" not in guide] == [], "deploy/README.md lists every metric"
    assert [name for name in names if f"`{name}`" not in guide] == []
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    used = {documented_metric(name) for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert {"ingest_queue_depth", "ingest_queue_oldest_waiting_seconds", "ingest_dead_letters", "ingest_runs_stuck",
            "ingest_workers_alive", "ingest_http_requests_total"} <= used
    for fragment in ('code="429"', 'code="503"', 'route="readyz"'):
        assert fragment in exprs, fragment
