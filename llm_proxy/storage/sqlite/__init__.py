"""The embedded back end (the default): SQLite files in DATA_DIR, for one machine and one worker."""
