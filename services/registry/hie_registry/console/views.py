"""Console views that change nothing: the directory (search and paging) and the statistics."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from hie_platform.errors import BadRequest
from hie_platform.web import language
from hie_registry import repository
from hie_registry.console.chart import bar_chart, series
from hie_registry.console.core import PATH, AgencyDep, ConsoleDep
from hie_schemas.directory import InstitutionKind, InstitutionState

router = APIRouter()
FILTERS = ("name", "region", "kind", "hub", "state")


@router.get("/static/console.css", include_in_schema=False)
async def stylesheet(console: ConsoleDep) -> Response:
    return console.site.stylesheet_response()


def _page_number(raw: str | None) -> int:
    if raw is None or raw == "":
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise BadRequest("page must be a positive whole number", expression=["page"])
    return int(raw)


@router.get("/directory", include_in_schema=False)
async def directory(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is None:
        return console.sign_in_required(request)
    params = {k: request.query_params.get(k, "").strip() for k in FILTERS}
    size = console.settings.page_size
    async with request.app.state.runtime.db.read_sessions() as session:
        context: dict[str, Any] = {
            "query": params,
            "regions": await repository.regions(session),
            "hubs": await repository.hub_slugs(session),
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
        total, rows = await repository.directory_page(session, params, size, page)

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
        stats = await repository.statistics(session)
        hubs = [(hub.slug, inst.name) for hub, inst in await repository.hubs(session)]
    rows = stats["exchanges_per_month"]
    data = series(rows if isinstance(rows, list) else [])
    t = console.site.catalog.translator(language(request))
    chart = bar_chart(data, t("stats.chart_title"), t("stats.chart_desc"), lambda k: t(f"exchange.{k}"))
    context = {
        "stats": stats,
        "series": data,
        "chart": chart,
        # No hub reports the verification of its audit chain to the centre yet: shown as not reported.
        "hubs": [{"slug": slug, "name": name} for slug, name in hubs],
    }
    return console.page(request, "statistics.html", context, agency=agency)
