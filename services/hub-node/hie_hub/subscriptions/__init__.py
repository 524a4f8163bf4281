"""Task notifications: FHIR Subscriptions (R4 Backport), their webhook deliveries and long polls."""
