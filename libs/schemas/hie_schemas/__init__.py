"""Pure data contracts shared by every HIE service: events, subjects, identifiers, codes, FHIR shim.

Nothing in this package performs I/O; it may be imported by any service or tool.
"""
