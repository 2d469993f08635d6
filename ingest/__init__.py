"""The `ingest` command: serve, work, migrate, administer."""
