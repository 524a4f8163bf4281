"""The agency console: server-rendered pages under /console (applications, lifecycle steps, directory,
statistics), Korean first, no script."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from hie_registry.config import RegistrySettings
from hie_registry.console import pages, views
from hie_registry.console.core import PATH, Console
from hie_registry.console.settings import ConsoleSettings


def router(settings: RegistrySettings) -> APIRouter:
    """The console's routes; refuses a placeholder session secret outside development (at start-up)."""
    console = Console(ConsoleSettings().checked(settings), settings)

    async def bind(request: Request) -> None:
        # Route-level dependencies run before the endpoint's own, so ConsoleDep finds it here.
        request.state.console = console

    built = APIRouter(prefix=PATH, tags=["console"], dependencies=[Depends(bind)])
    built.include_router(pages.router)
    built.include_router(views.router)
    return built
