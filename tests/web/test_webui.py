"""The shared renderer (hie_platform.webui): one layout and stylesheet, each app's pages, accent and words."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

import hie_consent.portal_web as portal_web
import hie_registry.console as console
from hie_consent.portal_web.i18n import STRINGS as PORTAL_STRINGS
from hie_platform.errors import Conflict
from hie_platform.web import FormGuard, derive_key
from hie_platform.webui import SHARED_STYLESHEET, Site
from hie_registry.console.i18n import STRINGS as CONSOLE_STRINGS

PORTAL = Path(portal_web.__file__).parent
CONSOLE = Path(console.__file__).parent


def _site(path: str, folder: Path, strings: dict[str, dict[str, str]], css: str) -> Site:
    forms = FormGuard(derive_key("test-secret-of-32-characters-long", path), "browser", path, consumer=path)
    return Site(path, folder / "templates", strings, folder / "static" / css, forms)


def _accent(stylesheet: str) -> str:
    """The accent a browser applies: the last declaration of --accent wins."""
    return re.findall(r"--accent:\s*(#[0-9a-f]{6})", stylesheet)[-1]


def test_each_app_is_served_the_shared_stylesheet_then_its_own_accent() -> None:
    shared = SHARED_STYLESHEET.read_text(encoding="utf-8")
    portal = _site("/portal", PORTAL, PORTAL_STRINGS, "portal.css").stylesheet_response()
    agency = _site("/console", CONSOLE, CONSOLE_STRINGS, "console.css").stylesheet_response()
    for response in (portal, agency):
        body = bytes(response.body).decode()
        assert body.startswith(shared)
        assert response.media_type == "text/css"
        assert response.headers["content-length"] == str(len(response.body))
    assert _accent(bytes(portal.body).decode()) == "#005f73"
    assert _accent(bytes(agency.body).decode()) == "#0b4f9c"
    assert ".choices" in bytes(portal.body).decode()  # the portal's own rules come along
    assert ".choices" not in bytes(agency.body).decode()


def test_an_apps_word_overrides_a_shared_one_and_the_shared_ones_fill_in() -> None:
    portal = _site("/portal", PORTAL, PORTAL_STRINGS, "portal.css").catalog
    agency = _site("/console", CONSOLE, CONSOLE_STRINGS, "console.css").catalog
    for catalog in (portal, agency):
        assert catalog.translator("ko")("skip") == "본문 바로가기"
        assert catalog.translator("en")("error.404") == "Not found"
    assert portal.translator("en")("error.409") != agency.translator("en")("error.409")
    assert agency.translator("en")("error.409") == CONSOLE_STRINGS["en"]["error.409"]


async def _render(site: Site, page: str, signed_in: bool) -> httpx.Response:
    app = FastAPI()

    @app.get("/page")
    async def render(request: Request) -> HTMLResponse:
        error = Conflict("the state changed meanwhile")
        context = {"agency": None} if site.path == "/console" else {}
        return site.page(request, page, context, signed_in=signed_in, error=error, here=f"{site.path}/")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        return await client.get("/page", params={"lang": "en"})


async def test_a_page_has_the_shared_layout_with_the_apps_menu_stylesheet_and_refusal() -> None:
    site = _site("/portal", PORTAL, PORTAL_STRINGS, "portal.css")
    answer = await _render(site, "error.html", signed_in=True)
    html = answer.text
    assert answer.status_code == 409
    assert '<html lang="en">' in html
    assert 'href="/portal/static/portal.css"' in html
    assert 'href="/portal/consent"' in html  # the portal's own menu, signed in
    assert 'action="/portal/sign-out"' in html
    assert "the state changed meanwhile" in html
    assert PORTAL_STRINGS["en"]["error.409"] in html
    assert "hie_lang=en" in answer.headers["set-cookie"]


async def test_the_console_signed_out_shows_no_menu_and_no_sign_out() -> None:
    site = _site("/console", CONSOLE, CONSOLE_STRINGS, "console.css")
    html = (await _render(site, "error.html", signed_in=False)).text
    assert 'href="/console/static/console.css"' in html
    assert 'href="/console/directory"' not in html
    assert "sign-out" not in html
    assert CONSOLE_STRINGS["en"]["error.nothing_changed"] in html
