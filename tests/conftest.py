"""Fixtures: a migrated test database, a clean Redis database, and a running shim with its workers."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from support import (
    TEST_DATABASE_URL,
    TEST_REDIS_URL,
    Api,
    Service,
    service_env,
    start_api,
    start_worker,
    unique,
)

from ingest.admin import Admin
from schema.db import drop_database, upgrade
from schema.settings import Settings


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh test database, and a flushed test Redis: ids start again, so Redis state of earlier sessions
    (closed runs, cached tokens) must go with the old database."""
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        client.flushdb()
    drop_database(TEST_DATABASE_URL)
    upgrade(TEST_DATABASE_URL)
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def redis_client(database_url: str) -> Iterator["redis.Redis[bytes]"]:
    client: redis.Redis[bytes] = redis.Redis.from_url(TEST_REDIS_URL)
    yield client
    client.close()


@pytest.fixture(scope="session")
def admin(database_url: str, redis_client: "redis.Redis[bytes]") -> Iterator[Admin]:
    admin = Admin(Settings(database_url=database_url, redis_url=TEST_REDIS_URL))
    yield admin
    admin.close()


@dataclass
class Pipeline:
    url: str
    api: Service
    worker: Service
    queue: str


@pytest.fixture(scope="session")
def pipeline(database_url: str, redis_client: "redis.Redis[bytes]",
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The shim and two worker processes, as `make run` starts them, on the test database."""
    logs = tmp_path_factory.mktemp("pipeline")
    env = service_env()
    api, url = start_api(env, logs / "api.log")
    worker = start_worker(env, logs / "worker.log")
    yield Pipeline(url, api, worker, env["INGEST_QUEUE"])
    api.stop()
    worker.stop()


@dataclass
class Project:
    id: int
    token: str
    api: Api


def new_project(admin: Admin, url: str, transport: httpx.BaseTransport | None = None) -> Project:
    project_id = admin.create_project(unique("project"))
    token = admin.create_token(unique("user"), [project_id])
    return Project(project_id, token, Api(url, token, transport=transport))


@pytest.fixture
def project(admin: Admin, pipeline: Pipeline) -> Iterator[Project]:
    """A fresh project, and a client whose token may reach it (and nothing else)."""
    project = new_project(admin, pipeline.url)
    yield project
    project.api.close()


@pytest.fixture
def other_project(admin: Admin, pipeline: Pipeline) -> Iterator[Project]:
    project = new_project(admin, pipeline.url)
    yield project
    project.api.close()


def count_results(engine: Engine, run_id: int) -> dict[int, int]:
    """Stored results of a run by status id, counted from the results table itself."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT status_id, count(*) FROM automation_results WHERE run_id = :r GROUP BY status_id"),
            {"r": run_id}).all()
    return {int(status): int(n) for status, n in rows}


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path
