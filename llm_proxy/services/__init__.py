"""Steps written once against the storage interfaces: finishing a request (both processes) and
draining work in batches (the worker's jobs and webhooks)."""
