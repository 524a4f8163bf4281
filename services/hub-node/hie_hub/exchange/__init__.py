"""Exchanges: ITI-65 publish addressed to recipients (service), the Task rows sent with it (sending),
its one-INSERT-per-table write (repository) and the delivery inbox of another hub (inbox)."""
