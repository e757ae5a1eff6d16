"""Plain types of a request's life, with no I/O: jobs, statuses and their public JSON."""
