"""The HTTP API: ``app`` holds the routes (thin), ``service`` the request handling as plain Python,
``streams`` wait-mode event streams, ``auth`` API keys, ``validation`` bodies, ``http`` the JSON
error shape and headers every answer carries, ``waiters`` clients waiting for a final state."""
