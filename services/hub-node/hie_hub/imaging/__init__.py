"""Imaging studies delivered in exchanges, as FHIR ImagingStudy, and their progress at the gateway."""
