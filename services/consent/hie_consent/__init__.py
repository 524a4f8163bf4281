"""Consent: consent records, the decision point every data holder asks, the patient's history."""
