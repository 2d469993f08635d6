"""Creating the database and migrating it."""

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url, text

from schema.partitions import ensure_ahead
from schema.settings import get_settings


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "schema:migrations")
    cfg.set_main_option("sqlalchemy.url", (database_url or get_settings().database_url).replace("%", "%%"))
    return cfg


def create_database_if_missing(database_url: str) -> bool:
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database})
            if exists.scalar() is not None:
                return False
            conn.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
            return True
    finally:
        admin.dispose()


def drop_database(database_url: str) -> None:
    """Drop the database, ending its sessions (for tests and benchmarks that start from nothing)."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
    finally:
        admin.dispose()


def upgrade(database_url: str | None = None) -> None:
    """Create the database if missing, migrate it, and make the partitions the configured dedupe window needs
    (the migrations make those of the default window; workers keep them coming)."""
    url = database_url or get_settings().database_url
    create_database_if_missing(url)
    command.upgrade(alembic_config(url), "head")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            ensure_ahead(conn, get_settings().dedupe_days)
    finally:
        engine.dispose()
