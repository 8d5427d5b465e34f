"""modula."""
