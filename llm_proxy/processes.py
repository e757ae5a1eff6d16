"""What the web process and the worker process agree on: exit codes and the supervisor's variable."""

CONFIG_ERROR = 2
"""A configuration variable has a value the service cannot run with."""
LOCKED = 3
"""The worker's exit code when another worker already consumes the same embedded back end."""
SUPERVISOR_PID_ENV = "LLM_PROXY_SUPERVISOR_PID"
"""Set by the web process for the worker it starts, so the worker can tell when it is orphaned."""
