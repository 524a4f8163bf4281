"""The patient's consent: the state in force, its history, and the forms that change it (consent,
withdraw entirely, exclude institutions or departments with reasons, consent again).

A change goes through ``portal.record_for_patient``, as the API's, so the rules and refusals are the
same. Each form is valid once and only for the consent version it was shown with.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from hie_consent import portal, repository, service
from hie_consent.models import PLATFORM
from hie_consent.portal_web.core import (
    PATH,
    PortalDep,
    RuntimeDep,
    form_fields,
    institution_names,
)
from hie_consent.schemas import ConsentRequest, ConsentVersionView, ExclusionKind
from hie_platform.errors import BadRequest, Conflict, FhirError
from hie_platform.web import FormRejected, language
from hie_schemas import codes
from hie_schemas.consent import ConsentPolicy

router = APIRouter()
BLANK_INSTITUTIONS, BLANK_DEPARTMENTS = 2, 1
Rows = list[tuple[str, str]]  # (code, reason)


def _rows(form: dict[str, str], prefix: str) -> Rows:
    rows = []
    for i in range(100):
        code, reason = form.get(f"{prefix}_code_{i}"), form.get(f"{prefix}_reason_{i}")
        if code is None and reason is None:
            break
        rows.append(((code or "").strip(), (reason or "").strip()))
    return rows


def _exclusions(institutions: Rows, departments: Rows) -> list[dict[str, str]]:
    found = []
    for kind, rows in (("institution", institutions), ("department", departments)):
        for number, (code, reason) in enumerate(rows, start=1):
            if not code and not reason:
                continue
            if not code:
                raise BadRequest(f"{kind} {number}: a reason is given but no {kind} is chosen")
            found.append({kind: code, "reason": reason})
    return found


def _request(policy: ConsentPolicy, exclusions: list[dict[str, str]]) -> ConsentRequest:
    try:
        return ConsentRequest.model_validate({"policy": policy, "exclusions": exclusions})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = [str(p) for p in error.get("loc", ()) if p != "exclusions"]
            if where and where[0].isdigit():
                where[0] = f"exclusion {int(where[0]) + 1}"
            problems.append(f"{' '.join(where)}: {error.get('msg', 'invalid')}")
        raise BadRequest("; ".join(problems) or "invalid consent change") from None


def _shown_rows(request: Request, in_force: ConsentVersionView | None) -> tuple[Rows, Rows]:
    """The exclusions a new form starts with: those in force, and the institution a link asked to
    exclude (``?exclude=<code>`` from the institution finder)."""
    kept = in_force.exclusions if in_force is not None else []
    institutions = [(e.code, e.reason) for e in kept if e.kind is ExclusionKind.INSTITUTION]
    departments = [(e.code, e.reason) for e in kept if e.kind is ExclusionKind.DEPARTMENT]
    asked = request.query_params.get("exclude", "")
    if asked.isdigit() and len(asked) == 8 and asked not in {c for c, _ in institutions}:
        institutions.append((asked, ""))
    return institutions, departments


async def consent_page(
    request: Request,
    web: PortalDep,
    runtime: RuntimeDep,
    patient_key: str,
    *,
    error: FhirError | None = None,
    submitted: tuple[Rows, Rows] | None = None,
    message_key: str | None = None,
) -> Response:
    async with runtime.db.read_sessions() as session:
        versions: list[ConsentVersionView] = await portal.consent_views(session, patient_key)
    current = versions[0] if versions else None
    active = current is not None and current.policy.is_active
    institutions, departments = submitted or _shown_rows(request, current if active else None)
    institutions = institutions + [("", "")] * BLANK_INSTITUTIONS
    departments = departments + [("", "")] * BLANK_DEPARTMENTS
    codes_shown = {e.code for v in versions for e in v.exclusions if e.kind is ExclusionKind.INSTITUTION}
    codes_shown |= {code for code, _ in institutions if code}
    context: dict[str, Any] = {
        "versions": versions,
        "current": current,
        "active": active,
        "version": str(current.version if current else 0),
        "partial_policy": "PARTIAL_WITHDRAWAL" if active else "PARTIAL_CONSENT",
        "institutions": institutions,
        "departments": departments,
        "department_codes": list(codes.DEPARTMENTS),
        "names": await institution_names(runtime, codes_shown, language(request)),
        "message_key": message_key,
    }
    return web.page(request, "consent.html", context, signed_in=True, error=error, here=f"{PATH}/consent")


@router.get("/consent", include_in_schema=False)
async def show(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    patient = await web.patient(request)
    if isinstance(patient, Response):
        return patient
    done = request.query_params.get("done", "")
    message = f"done.{done}" if done in set(ConsentPolicy) else None
    return await consent_page(request, web, runtime, patient.patient_key, message_key=message)


@router.post("/consent", include_in_schema=False)
async def change(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    signed = await web.signed(request)
    if signed.patient is None:
        return web.sign_in_page(request, error=signed.problem)
    key = signed.patient.patient_key
    form = await form_fields(request)
    submitted = (_rows(form, "inst"), _rows(form, "dept"))
    try:
        checked = web.forms.check(request, form.get("form_token"), "consent")
        form_policy, _, based_on = checked.context.partition(":")
        if form.get("policy") != form_policy:
            raise FormRejected("the form does not match the change it was made for")
        body = _request(ConsentPolicy(form_policy), _exclusions(*submitted))
        exclusions = tuple(e.exclusion() for e in body.exclusions)
        # Registry look-ups before the transaction: no database connection is held across them.
        await service.check_targets(runtime, exclusions)
        async with runtime.db.transaction() as session:
            await web.forms.claim(session, PLATFORM.processed, checked)
            history = await repository.versions(session, key)
            if str(history[-1].version if history else 0) != based_on:
                raise Conflict("your consent changed since this page was opened (another window or device)")
            await portal.record_for_patient(session, runtime, web.settings, key, body)
    except FhirError as exc:
        return await consent_page(request, web, runtime, key, error=exc, submitted=submitted)
    return RedirectResponse(f"{PATH}/consent?done={body.policy.value}", status_code=303)
