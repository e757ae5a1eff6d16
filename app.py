"""The web process's entry point: ``python app.py`` serves the API on gevent and supervises the
worker (the Procfile's web line).

``app`` is a module-level WSGI app for other WSGI servers (``gunicorn -k gevent app:app``): it
reads the configuration and opens the back end on its first request, so importing this module has
no side effects.
"""

if __name__ == "__main__":  # the entry point patches before anything else is imported
    from gevent import monkey

    monkey.patch_all()

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from config import ConfigError, load_from_process_env
from llm_proxy.api.http import StartResponse, WSGIApp
from llm_proxy.processes import CONFIG_ERROR

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"


class LazyApp:
    """A WSGI app built from the environment on first use."""

    def __init__(self) -> None:
        self._app: WSGIApp | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self._app is None:
            from llm_proxy.web.server import build_web

            self._app = build_web(load_from_process_env()).app
        return self._app(environ, start_response)


app = LazyApp()


def main() -> int:
    from llm_proxy.observability.logs import setup_logging
    from llm_proxy.web.server import run_web

    try:
        config = load_from_process_env()
    except ConfigError as exc:
        print(f"llm-proxy: configuration error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    setup_logging(config.log_level)
    return run_web(config, [sys.executable, str(WORKER_SCRIPT)])


if __name__ == "__main__":
    sys.exit(main())
