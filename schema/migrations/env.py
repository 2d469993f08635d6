from alembic import context
from sqlalchemy import create_engine, pool

from schema.partitions import PARTITION_NAME
from schema.settings import get_settings
from schema.tables import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _not_a_partition(name: str | None, type_: str, _: object) -> bool:
    # Partitions are made and dropped as days come and go (schema/partitions.py), not by migrations: what
    # `alembic check` compares with schema/tables.py is their tables.
    return not (type_ == "table" and name is not None and PARTITION_NAME.match(name))


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                          include_name=_not_a_partition)
        with context.begin_transaction():
            # A migration must never queue behind live traffic for long, nor hold a lock forever.
            connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            connection.exec_driver_sql("SET LOCAL statement_timeout = '10min'")
            context.run_migrations()


run_migrations_online()
