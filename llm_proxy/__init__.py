"""llm-proxy: a durable queueing proxy for OpenAI-compatible chat completions.

The sub-packages are layers; imports only ever point downwards in this list:

- ``web``, ``worker``: the two processes (wiring, serving, supervising; dispatching and running jobs).
- ``api``: the HTTP API the web process serves (routes, request handling, auth, validation).
- ``upstream``, ``webhooks``: the outside calls the worker makes.
- ``services``: steps written once against the storage interfaces (finishing a request, draining
  work in batches).
- ``storage``: the interfaces every back end implements, the factory that picks one, and ``sqlite``,
  the embedded back end.
- ``domain``, ``observability``: plain types (jobs, statuses, their JSON) and metrics and logs.
"""
