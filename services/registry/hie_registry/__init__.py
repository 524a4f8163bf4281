"""Registry: the institution directory, the participation lifecycle and institution credentials."""
