"""Where requests, statuses and owed webhooks are kept, and how processes signal each other.

``base`` holds the interfaces (the seam), ``factory`` picks a back end from the configuration,
``sqlite`` is the embedded back end (one machine, one worker).
"""
