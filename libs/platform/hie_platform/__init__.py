"""Shared runtime plumbing of the HIE services: settings, database, NATS, outbox, auth, HTTP, audit."""
