"""The hub's shared FHIR REST plumbing: formats, versions, search parameters, Bundles, disclosure."""
