"""The web process: ``server`` wires and serves the API on gevent, ``supervisor`` runs the embedded
worker as a child process."""
