"""Webhooks: ``safety`` decides which destinations are allowed (used by the web at submit and by
the sender), ``sender`` makes one signed POST, ``delivery`` drains the outbox in the worker."""
