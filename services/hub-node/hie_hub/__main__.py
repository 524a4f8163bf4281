"""``python -m hie_hub``: run one hub node under uvicorn (HIE_HUB_HUB names the hub), in
``HIE_HUB_WORKERS`` processes behind its port (PostgreSQL only; docs/operations.md)."""

from hie_hub.app import create_app
from hie_hub.config import HubSettings
from hie_platform.logging import configure_logging
from hie_platform.runtime import serve

if __name__ == "__main__":
    settings = HubSettings()  # hub comes from HIE_HUB_HUB; refuses workers > 1 on SQLite
    if settings.workers > 1:
        # The supervisor builds no app: each worker process calls the factory (its own event loop).
        configure_logging("hub-node", settings.log_level, settings.log_json)
        serve("hie_hub.app:app_from_environment", settings, workers=settings.workers)
    else:
        serve(create_app(settings), settings)
