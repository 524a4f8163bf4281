"""Hub node: the FHIR document repository of one hub hospital and its affiliated clinics."""
