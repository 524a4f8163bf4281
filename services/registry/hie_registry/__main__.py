"""``python -m hie_registry``: run the registry under uvicorn."""

from hie_platform.runtime import serve
from hie_registry.app import create_app
from hie_registry.config import RegistrySettings

if __name__ == "__main__":
    settings = RegistrySettings()
    serve(create_app(settings), settings)
