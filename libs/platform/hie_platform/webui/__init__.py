"""One page renderer, layout and stylesheet for the federation's web front-ends (the patient portal
and the agency console); each app keeps its own pages, navigation, accent colour and strings.

An app's ``base.html`` extends ``layout.html`` (blocks ``nav`` and ``error_note``); its pages extend
``base.html`` as before. Its stylesheet is served after the shared one, at the app's own address.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from hie_platform.errors import FhirError
from hie_platform.web import (
    LANGUAGES,
    Catalog,
    FormGuard,
    css,
    language,
    language_url,
    render,
    template_environment,
)
from hie_platform.webui.strings import STRINGS

HERE = Path(__file__).parent
SHARED_STYLESHEET = HERE / "static" / "site.css"


def error_view(t: Any, error: FhirError) -> dict[str, Any]:
    details: Sequence[str] = [i.diagnostics for i in error.issues] or [error.diagnostics]
    return {"status": error.status, "title": t(f"error.{error.status}"), "details": details}


class Site:
    """One web front-end: where it lives, its templates, strings, stylesheet and form guard."""

    def __init__(
        self,
        path: str,
        templates: Path,
        strings: Mapping[str, Mapping[str, str]],
        stylesheet: Path,
        forms: FormGuard,
    ) -> None:
        self.path = path
        self.env = template_environment(templates)
        self.env.loader = jinja2.ChoiceLoader(
            [jinja2.FileSystemLoader(templates), jinja2.FileSystemLoader(HERE / "templates")]
        )
        self.catalog = Catalog(
            {lang: {**STRINGS.get(lang, {}), **strings.get(lang, {})} for lang in LANGUAGES}
        )
        self.stylesheet = stylesheet
        self.forms = forms

    def stylesheet_response(self) -> Response:
        """The shared stylesheet, then the app's own (its accent and its pages' rules)."""
        response = css(self.stylesheet)
        shared = SHARED_STYLESHEET.read_text(encoding="utf-8")
        response.body = (shared + "\n").encode() + bytes(response.body)
        response.headers["content-length"] = str(len(response.body))
        return response

    def page(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        *,
        signed_in: bool,
        status: int = 200,
        error: FhirError | None = None,
        here: str | None = None,
    ) -> HTMLResponse:
        """Render a page; ``here`` is the page's GET address when it answers a POST."""
        lang = language(request)
        t = self.catalog.translator(lang)
        other = LANGUAGES[1] if lang == LANGUAGES[0] else LANGUAGES[0]
        browser, new = self.forms.browser(request)

        def form_token(purpose: str, context: str = "") -> str:
            return self.forms.issue(browser, purpose, context)

        common = {
            "t": t,
            "lang": lang,
            "other_lang": other,
            "here": here or request.url.path,
            "lang_url": language_url(request, here, other),
            "site_path": self.path,
            "stylesheet_url": f"{self.path}/static/{self.stylesheet.name}",
            "signed_in": signed_in,
            "form_token": form_token,
            "error": error_view(t, error) if error is not None else None,
            "message_key": None,
        }
        status = status if error is None else error.status
        headers = error.headers() if error is not None else None
        response = render(request, self.env, name, {**common, **context}, status=status, headers=headers)
        self.forms.remember_browser(response, request, browser, new)
        return response
