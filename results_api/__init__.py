"""The HTTP API (Flask): submit, read, list and cancel jobs; health checks; OpenAPI and docs."""
