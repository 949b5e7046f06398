"""The metadata cache: pure policy, SQL tables and store, and the in-process memory tier."""
