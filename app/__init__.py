"""The application layer: the `perennial` command, above flows/ (the only package that imports flows)."""
