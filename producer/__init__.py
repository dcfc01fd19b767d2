"""The submit side: validate a request, persist the job with its outbox row, publish it."""
