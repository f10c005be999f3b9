"""The durable OpenAI Batch API: store (tables, statuses, the recovery essay), files,
lease, validate, worker, finalize, and service (the facade the routes and app.py use)."""
