"""The FHIR document profiles of the Korean exchange: pure checks and builders of complete examples."""
