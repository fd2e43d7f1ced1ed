"""The FastAPI service: /encode, /retrieve, /items, health and metrics."""
