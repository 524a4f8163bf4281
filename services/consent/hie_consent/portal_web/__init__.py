"""The patient portal's pages under /portal (sign-in with a one-time code, consent, history, finding
institutions), Korean first, no script; beside the JSON API under /portal/identity and /portal/me."""

from __future__ import annotations

from fastapi import APIRouter

from hie_consent.portal_web import consent_pages, history_pages, sign_in
from hie_consent.portal_web.core import PATH

router = APIRouter(prefix=PATH, tags=["portal pages"])
router.include_router(sign_in.router)
router.include_router(consent_pages.router)
router.include_router(history_pages.router)
