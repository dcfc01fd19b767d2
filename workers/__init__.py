"""Celery workers: take job messages from the broker and run them in one shared engine."""
