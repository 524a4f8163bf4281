"""``python -m hie_hub``: run one hub node under uvicorn (HIE_HUB_HUB names the hub)."""

from hie_hub.app import create_app
from hie_hub.config import HubSettings
from hie_platform.runtime import serve

if __name__ == "__main__":
    settings = HubSettings()  # hub comes from HIE_HUB_HUB
    serve(create_app(settings), settings)
