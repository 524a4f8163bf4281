"""MHD Find Lists (ITI-66): SubmissionSets as FHIR List."""
