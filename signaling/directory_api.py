"""The directory's HTTP admin API (JSON), over ``signaling.directory_admin.DirectoryAdmin``.

``GET /api/directory/sites?q=&region=&active=&page=&per_page=``,
``GET /api/directory/clinicians?q=&site=&role=&region=&active=&page=&per_page=`` (with each
clinician's ``online`` flag), ``GET /api/directory/regions`` (``PUT .../regions/{code}``
``{name}`` names a province), ``POST`` to create, ``PATCH
/api/directory/{sites|clinicians}/{id}`` to edit, ``POST .../{id}/deactivate`` and
``.../reactivate``, ``GET /api/directory/export`` (CSV) and ``POST /api/directory/import``
(a CSV body, or the TOML directory file as ``application/toml``; ``?dry_run=1``). Errors
are the usual 4xx JSON ``{"error": {"code", "message"}}`` (``duplicate_id``,
``unknown_site``, ``role_not_grantable``, ``forbidden``, ``not_found``, ``invalid_payload``,
``import_invalid`` with ``problems``). See docs/protocol.md.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from signaling import permissions
from signaling.directory import describe
from signaling.directory_admin import (
    TOML_TYPE,
    DirectoryAdmin,
    SearchQuery,
    export_csv,
    parse_csv,
    parse_toml,
)
from signaling.errors import Forbidden, InvalidPayload
from signaling.http_api import principal_of

DIRECTORY_ADMIN: web.AppKey[DirectoryAdmin] = web.AppKey("directory_admin", DirectoryAdmin)

_ID = r"{id:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}}"


def _query(request: web.Request, allowed: set[str]) -> SearchQuery:
    raw = dict(request.query)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise InvalidPayload(f"unknown query parameters {unknown}; known: {sorted(allowed)}")
    try:
        return SearchQuery.model_validate(raw)
    except ValidationError as exc:
        raise InvalidPayload("; ".join(describe(exc))) from None


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"the body is not JSON: {exc}") from None


def add_directory_routes(app: web.Application, admin: DirectoryAdmin) -> None:
    app[DIRECTORY_ADMIN] = admin

    async def sites(request: web.Request) -> web.Response:
        q = _query(request, {"q", "region", "active", "page", "per_page"})
        return web.json_response(admin.search_sites(
            principal_of(request), q=q.q, region=q.region, active=q.active, page=q.page,
            per_page=q.per_page))

    async def clinicians(request: web.Request) -> web.Response:
        q = _query(request, {"q", "site", "role", "region", "active", "page", "per_page"})
        return web.json_response(admin.search_clinicians(
            principal_of(request), q=q.q, site=q.site, role=q.role, region=q.region,
            active=q.active, page=q.page, per_page=q.per_page))

    async def regions(request: web.Request) -> web.Response:
        if not permissions.may_view_directory(principal_of(request)):
            raise Forbidden("the directory is for admins and site admins")
        return web.json_response({"regions": admin.regions()})

    async def set_region(request: web.Request) -> web.Response:
        region = await admin.set_region(principal_of(request), request.match_info["code"],
                                        await _body(request))
        return web.json_response({"region": region})

    async def create_site(request: web.Request) -> web.Response:
        site = await admin.create_site(principal_of(request), await _body(request))
        return web.json_response({"site": site}, status=201)

    async def edit_site(request: web.Request) -> web.Response:
        site = await admin.edit_site(principal_of(request), request.match_info["id"],
                                     await _body(request))
        return web.json_response({"site": site})

    async def create_clinician(request: web.Request) -> web.Response:
        clinician = await admin.create_clinician(principal_of(request), await _body(request))
        return web.json_response({"clinician": clinician}, status=201)

    async def edit_clinician(request: web.Request) -> web.Response:
        clinician = await admin.edit_clinician(principal_of(request), request.match_info["id"],
                                               await _body(request))
        return web.json_response({"clinician": clinician})

    def activation(kind: str, active: bool) -> Any:
        async def handler(request: web.Request) -> web.Response:
            p, ident = principal_of(request), request.match_info["id"]
            if kind == "site":
                return web.json_response({"site": await admin.set_site_active(p, ident,
                                                                              active)})
            return web.json_response({"clinician": await admin.set_clinician_active(
                p, ident, active)})

        return handler

    async def export(request: web.Request) -> web.Response:
        if not permissions.may_manage_sites(principal_of(request)):
            raise Forbidden("exporting the directory needs the role admin")
        return web.Response(text=export_csv(admin.directory), content_type="text/csv",
                            charset="utf-8", headers={
                                "Content-Disposition": 'attachment; filename="directory.csv"',
                                "Cache-Control": "no-store"})

    async def import_(request: web.Request) -> web.Response:
        p = principal_of(request)
        if not permissions.may_manage_sites(p):
            raise Forbidden("importing a directory needs the role admin")
        flag = request.query.get("dry_run", "0").casefold()
        if flag not in ("0", "1", "true", "false"):
            raise InvalidPayload(f"dry_run = {flag!r}: expected 1 or 0")
        try:
            text = (await request.read()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidPayload(f"the file is not UTF-8: {exc}") from None
        batch = parse_toml(text, "the TOML file") if request.content_type == TOML_TYPE \
            else parse_csv(text)
        report = await admin.import_batch(p.id, batch, dry_run=flag in ("1", "true"))
        return web.json_response({"import": report.to_wire()})

    base = "/api/directory"
    app.router.add_get(f"{base}/sites", sites)
    app.router.add_post(f"{base}/sites", create_site)
    app.router.add_patch(f"{base}/sites/{_ID}", edit_site)
    app.router.add_post(f"{base}/sites/{_ID}/deactivate", activation("site", False))
    app.router.add_post(f"{base}/sites/{_ID}/reactivate", activation("site", True))
    app.router.add_get(f"{base}/clinicians", clinicians)
    app.router.add_post(f"{base}/clinicians", create_clinician)
    app.router.add_patch(f"{base}/clinicians/{_ID}", edit_clinician)
    app.router.add_post(f"{base}/clinicians/{_ID}/deactivate", activation("clinician", False))
    app.router.add_post(f"{base}/clinicians/{_ID}/reactivate", activation("clinician", True))
    app.router.add_get(f"{base}/regions", regions)
    app.router.add_put(base + "/regions/{code:[A-Za-z0-9_.-]{1,16}}", set_region)
    app.router.add_get(f"{base}/export", export)
    app.router.add_post(f"{base}/import", import_)
