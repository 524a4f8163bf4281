from hie_imaging.models import Base
from hie_platform.migrations import run_env

run_env(Base.metadata)
