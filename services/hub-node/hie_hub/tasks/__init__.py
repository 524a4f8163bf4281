"""The referral workflow as FHIR Task: the Task resource, its status changes and its REST endpoints."""
