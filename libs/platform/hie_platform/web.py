"""Server-rendered pages (the agency console, the patient portal): templates, language, cookies,
security headers, and single-use form tokens that are both the CSRF defence and the double-submit guard.

A form token is an HMAC-sealed value naming the form's purpose, the state the page was rendered from
(e.g. the consent version), a random nonce and the hash of a random browser cookie. A POST is accepted
only with a valid, unexpired token for its purpose from the same browser, and its nonce is recorded in
the service's ``processed_events`` table in the same transaction as the change: the same token a
second time changes nothing (409), and a refused change leaves the token unused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import Table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.bus import first_time
from hie_platform.errors import Conflict, Forbidden

LANGUAGES = ("ko", "en")  # Korean first
LANG_COOKIE = "hie_lang"
KST = timezone(timedelta(hours=9), "KST")
# No script at all, styles only from ourselves, forms only to ourselves, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, browsers send "Origin: null" on same-site form posts.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # pages carry personal data or one-time secrets
}


def derive_key(secret: str, purpose: str) -> bytes:
    """A 32-byte key for one purpose, so that one configured secret never signs two kinds of thing."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """JSON values sealed with HMAC-SHA256 (integrity, not secrecy: put nothing secret in them)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def seal(self, payload: Mapping[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(body)}"

    def unseal(self, token: str) -> dict[str, Any] | None:
        body, _, mac = token.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            value = json.loads(_unb64(body))
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None


# --- language -------------------------------------------------------------------------------------


def language(request: Request) -> str:
    """``?lang=`` wins, then the remembered choice, then Korean."""
    asked = request.query_params.get("lang")
    if asked in LANGUAGES:
        return asked
    remembered = request.cookies.get(LANG_COOKIE)
    return remembered if remembered in LANGUAGES else LANGUAGES[0]


def language_url(request: Request, here: str | None, lang: str) -> str:
    """This page in another language: its GET address (``here`` when answering a POST) and query."""
    params = [] if here else [(k, v) for k, v in request.query_params.multi_items() if k != "lang"]
    return f"{here or request.url.path}?{urlencode([*params, ('lang', lang)])}"


class Catalog:
    """The strings of one set of pages, per language; a missing English string falls back to Korean."""

    def __init__(self, strings: Mapping[str, Mapping[str, str]]) -> None:
        self.strings = strings

    def translator(self, lang: str) -> Callable[..., str]:
        table, fallback = self.strings.get(lang, {}), self.strings[LANGUAGES[0]]

        def t(key: str, default: str | None = None, **values: Any) -> str:
            """The string for ``key``; ``default`` (else the key) when there is none, e.g. a new code."""
            text = table.get(key) or fallback.get(key) or (key if default is None else default)
            return text.format(**values) if values else text

        return t


# --- cookies and responses ------------------------------------------------------------------------


def is_https(request: Request, public_url: str | None) -> bool:
    return request.url.scheme == "https" or (public_url or "").startswith("https://")


def set_cookie(
    response: Response,
    request: Request,
    name: str,
    value: str,
    *,
    path: str,
    max_age: int | None = None,
    public_url: str | None = None,
) -> None:
    """HttpOnly, SameSite=Strict, and Secure whenever the page is served over HTTPS."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="strict",
        secure=is_https(request, public_url),
    )


def clear_cookie(response: Response, request: Request, name: str, *, path: str) -> None:
    set_cookie(response, request, name, "", path=path, max_age=0)


def korean_time(value: datetime, pattern: str = "%Y-%m-%d %H:%M") -> str:
    """A stored (UTC) time as people in Korea read it: KST, which has no daylight saving."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(KST).strftime(pattern)


def template_environment(directory: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["kst"] = korean_time
    return env


def render(
    request: Request,
    env: jinja2.Environment,
    name: str,
    context: Mapping[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    html = env.get_template(name).render(**context)
    response = HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})
    if request.query_params.get("lang") in LANGUAGES:
        set_cookie(response, request, LANG_COOKIE, request.query_params["lang"], path="/", max_age=31536000)
    return response


def css(path: Path) -> Response:
    return Response(
        path.read_text(encoding="utf-8"),
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


# --- single-use form tokens -----------------------------------------------------------------------


class FormRejected(Forbidden):
    """A POST without a valid form token from this browser (a forged or stale form)."""


class FormAlreadyUsed(Conflict):
    """The same form was submitted again: the first submission stands, this one changes nothing."""

    def __init__(self) -> None:
        super().__init__("this form was already submitted; nothing was changed the second time")


@dataclass(frozen=True)
class CheckedForm:
    nonce: str
    context: str


class FormGuard:
    """Issues and checks the single-use tokens of one set of pages."""

    def __init__(self, key: bytes, cookie: str, path: str, consumer: str, ttl_seconds: int = 3600) -> None:
        self._sealer = Sealer(key)
        self.cookie = cookie
        self.path = path
        self.consumer = consumer
        self.ttl = ttl_seconds

    def browser(self, request: Request) -> tuple[str, bool]:
        """This browser's random id, and whether it is new (then the page must set the cookie)."""
        current = request.cookies.get(self.cookie, "")
        if len(current) >= 32:
            return current, False
        return secrets.token_urlsafe(24), True

    def remember_browser(self, response: Response, request: Request, browser: str, new: bool) -> None:
        if new:
            set_cookie(response, request, self.cookie, browser, path=self.path)

    @staticmethod
    def _bind(browser: str) -> str:
        return hashlib.sha256(browser.encode()).hexdigest()[:32]

    def issue(self, browser: str, purpose: str, context: str = "") -> str:
        return self._sealer.seal(
            {
                "p": purpose,
                "c": context,
                "n": secrets.token_hex(16),
                "b": self._bind(browser),
                "t": int(time.time()),
            }
        )

    def check(self, request: Request, token: str | None, purpose: str) -> CheckedForm:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise FormRejected("a form from another site was refused")
        browser = request.cookies.get(self.cookie, "")
        value = self._sealer.unseal(token or "")
        if value is None or not browser:
            raise FormRejected("the form is missing its security token (are cookies enabled?)")
        if value.get("p") != purpose or not hmac.compare_digest(str(value.get("b")), self._bind(browser)):
            raise FormRejected("the form's security token does not belong to this page or browser")
        if not isinstance(value.get("t"), int) or time.time() - value["t"] > self.ttl:
            raise FormRejected("the form has expired; open the page again")
        return CheckedForm(nonce=str(value["n"]), context=str(value.get("c", "")))

    async def claim(self, session: AsyncSession, processed: Table, form: CheckedForm) -> None:
        """Mark the token used in the caller's transaction; FormAlreadyUsed if it already was."""
        try:
            fresh = await first_time(session, processed, self.consumer, form.nonce)
        except IntegrityError:  # a concurrent submission of the same token committed first
            raise FormAlreadyUsed from None
        if not fresh:
            raise FormAlreadyUsed
