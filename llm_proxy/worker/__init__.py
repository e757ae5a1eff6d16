"""The worker process: ``dispatcher`` claims jobs into free slots, ``runner`` runs one job (attempts,
finish, put back), ``retry`` decides what an attempt's outcome leads to, ``process`` wires it up."""
