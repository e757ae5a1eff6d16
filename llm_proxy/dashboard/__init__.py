"""The dashboard: server-rendered pages under ``/dashboard`` for looking at the queue and one's
own requests (``app``), signed sessions and CSRF tokens (``sessions``), and what the pages show
(``views``)."""
