"""Loaded by pytest before any other plugin (``-p gevent_first`` in pytest.ini): the test process is
an entry point too, and gevent must patch before a plugin (schemathesis) imports ssl."""

from gevent import monkey

monkey.patch_all()
