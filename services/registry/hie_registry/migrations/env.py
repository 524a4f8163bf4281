from hie_platform.migrations import run_env
from hie_registry.models import Base

run_env(Base.metadata)
