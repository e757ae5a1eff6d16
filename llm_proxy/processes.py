"""What the web process and the worker process agree on: exit codes, the supervisor's variable and
the signal that hurries a stopping worker."""

import signal

CONFIG_ERROR = 2
"""A configuration variable has a value the service cannot run with."""
LOCKED = 3
"""The worker's exit code when another worker already consumes the same embedded back end."""
SUPERVISOR_PID_ENV = "LLM_PROXY_SUPERVISOR_PID"
"""Set by the web process for the worker it starts, so the worker can tell when it is orphaned."""
HURRY_SIGNAL = signal.SIGUSR1
"""Sent by the web process to its worker on a second Ctrl-C: put the calls in flight back now. (A
supervised worker ignores SIGINT itself: a terminal sends it to both processes, and the web process
decides what it means.)"""
