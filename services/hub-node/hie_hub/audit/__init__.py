"""The hub's hash-chained audit as FHIR AuditEvent: search, verification and checkpoints."""
