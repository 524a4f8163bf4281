"""The base of the federation's value models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """A value that never changes once made (an event, a reply, a view): pydantic's frozen model,
    hashable, compared by value. A subclass adds to its config (``extra``), never undoes ``frozen``."""

    model_config = ConfigDict(frozen=True)
