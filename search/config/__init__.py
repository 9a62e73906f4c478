"""Configuration files: the schema of experiment files (study files are :mod:`search.spec`)."""
