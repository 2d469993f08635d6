"""Celery workers: take operations off the queue and apply them to PostgreSQL."""
