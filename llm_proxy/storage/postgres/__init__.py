"""The networked back end: everything in one PostgreSQL database (``DATABASE_URL``), shared by any
number of web and worker processes on any number of machines."""
