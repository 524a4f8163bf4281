"""``python -m hie_imaging``: run one hub's imaging gateway (HIE_IMAGING_HUB names the hub)."""

from hie_imaging.app import create_app
from hie_imaging.config import ImagingSettings
from hie_platform.runtime import serve

if __name__ == "__main__":
    settings = ImagingSettings()  # hub and ae_title come from the environment
    serve(create_app(settings), settings)
