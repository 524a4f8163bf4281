"""Console views that change nothing: the directory (search and paging) and the statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Select, func, select

from hie_platform.errors import BadRequest
from hie_platform.web import css, language
from hie_registry import locator
from hie_registry.console.chart import bar_chart, series
from hie_registry.console.core import CATALOG, PATH, AgencyDep, ConsoleDep
from hie_registry.models import Hub, Institution
from hie_schemas.directory import InstitutionKind, InstitutionState

router = APIRouter()
STYLESHEET = Path(__file__).parent / "static" / "console.css"
FILTERS = ("name", "region", "kind", "hub", "state")


@router.get("/static/console.css", include_in_schema=False)
async def stylesheet() -> Response:
    return css(STYLESHEET)


def _page_number(raw: str | None) -> int:
    if raw is None or raw == "":
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise BadRequest("page must be a positive whole number", expression=["page"])
    return int(raw)


def _filtered(query: Select[Any], params: dict[str, str]) -> Select[Any]:
    if params["name"]:
        pattern = f"%{params['name'].lower()}%"
        query = query.where(
            func.lower(Institution.name).like(pattern) | func.lower(Institution.name_en).like(pattern)
        )
    for column, key in (
        (Institution.region, "region"),
        (Institution.kind, "kind"),
        (Institution.hub, "hub"),
        (Institution.state, "state"),
    ):
        if params[key]:
            query = query.where(column == params[key])
    return query


@router.get("/directory", include_in_schema=False)
async def directory(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is None:
        return console.sign_in_required(request)
    params = {k: request.query_params.get(k, "").strip() for k in FILTERS}
    size = console.settings.page_size
    async with request.app.state.runtime.db.read_sessions() as session:
        regions = [r for r in (await session.scalars(select(Institution.region).distinct())).all() if r]
        hubs = list((await session.scalars(select(Hub.slug).order_by(Hub.slug))).all())
        context: dict[str, Any] = {
            "query": params,
            "regions": sorted(regions),
            "hubs": hubs,
            "kinds": [k.value for k in InstitutionKind],
            "states": [s.value for s in InstitutionState],
            "rows": [],
            "total": 0,
            "first": 0,
            "last": 0,
            "prev_url": None,
            "next_url": None,
        }
        try:
            page = _page_number(request.query_params.get("page"))
        except BadRequest as exc:
            return console.page(request, "directory.html", context, agency=agency, error=exc)
        query = _filtered(select(Institution), params)
        total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        rows = list(
            (
                await session.scalars(
                    query.order_by(Institution.name, Institution.code).limit(size).offset((page - 1) * size)
                )
            ).all()
        )

    def link(number: int) -> str:
        kept = [(k, v) for k, v in params.items() if v]
        return f"{PATH}/directory?{urlencode([*kept, ('page', str(number))])}"

    context |= {
        "rows": rows,
        "total": total,
        "first": (page - 1) * size + 1,
        "last": (page - 1) * size + len(rows),
        "prev_url": link(page - 1) if page > 1 else None,
        "next_url": link(page + 1) if page * size < total else None,
    }
    return console.page(request, "directory.html", context, agency=agency)


@router.get("/statistics", include_in_schema=False)
async def statistics(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is None:
        return console.sign_in_required(request)
    async with request.app.state.runtime.db.read_sessions() as session:
        stats = await locator.statistics(session)
        hubs = (
            await session.execute(
                select(Hub.slug, Institution.name)
                .join(Institution, Hub.institution_code == Institution.code)
                .order_by(Hub.slug)
            )
        ).all()
    rows = stats["exchanges_per_month"]
    data = series(rows if isinstance(rows, list) else [])
    t = CATALOG.translator(language(request))
    chart = bar_chart(data, t("stats.chart_title"), t("stats.chart_desc"), lambda k: t(f"exchange.{k}"))
    context = {
        "stats": stats,
        "series": data,
        "chart": chart,
        # No hub reports the verification of its audit chain to the centre yet: shown as not reported.
        "hubs": [{"slug": slug, "name": name} for slug, name in hubs],
    }
    return console.page(request, "statistics.html", context, agency=agency)
