"""The worker process's entry point: ``python worker.py`` (the Procfile's worker line; ``python
app.py`` also starts it as its supervised child)."""

if __name__ == "__main__":  # the entry point patches before anything else is imported
    from gevent import monkey

    monkey.patch_all()

import sys

from config import ConfigError, load_from_process_env
from llm_proxy.processes import CONFIG_ERROR


def main() -> int:
    from llm_proxy.observability.logs import setup_logging
    from llm_proxy.worker.process import run_worker

    try:
        config = load_from_process_env()
    except ConfigError as exc:
        print(f"llm-proxy worker: configuration error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    setup_logging(config.log_level)
    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
