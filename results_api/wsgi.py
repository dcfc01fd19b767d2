"""WSGI entry point: `gunicorn results_api.wsgi:app` (settings from GENQ_* env vars)."""

from results_api.app import create_app

app = create_app()
