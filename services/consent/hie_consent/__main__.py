"""``python -m hie_consent``: run the consent service under uvicorn."""

from hie_consent.app import create_app
from hie_consent.config import ConsentSettings
from hie_platform.runtime import serve

if __name__ == "__main__":
    settings = ConsentSettings()
    serve(create_app(settings), settings)
