"""/api/docs that work offline, and an OpenAPI document that tells the truth about errors.

FastAPI's own docs page loads Swagger UI's JavaScript and CSS from a CDN: offline (or behind a firewall) it is a
blank page. Here the same page (FastAPI's get_swagger_ui_html) loads them from this server, out of the
`fastapi-offline` package, which ships Swagger UI 5 (the OpenAPI 3.1 documents FastAPI writes need 5.x).

The document FastAPI generates lists 422 with its own `{"detail": [...]}` body, which prefloop never sends
(app/errors.py answers `{"error": "..."}`), and nothing else. `openapi()` completes each /api operation with the
statuses its dependencies and parameters imply, all with the ErrorBody schema: 401 (a token is needed), 403 (an
admin, or a person's token, is needed), 413 and 422 (a body or parameters), 500; a route adds its own statuses
with `responses=errors({...})` (app/api_models.py). `POST /api/train`'s body, a dict that RoundConfig.from_dict
validates, is shown as RoundConfig's fields, each with its default and the reason written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import MISSING, fields
from functools import cache
from importlib import metadata, resources
from typing import get_type_hints

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from app.api import admin, annotator, current_user
from app.api_models import ErrorBody
from app.errors import ApiError
from app.reasons import field_reasons
from learner.config import RoundConfig

DOCS_URL = "/api/docs"
OPENAPI_URL = "/api/openapi.json"
ASSETS_URL = "/api/docs/assets"
# The files of fastapi_offline/static that the page loads, with their content types.
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}
ASSET_MAX_AGE = 86_400  # seconds: the files change only with the installed package; a day keeps reloads cheap

router = APIRouter(include_in_schema=False)


@router.get(DOCS_URL)
def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL, title="prefloop API",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        # validatorUrl None: Swagger UI would otherwise send the document to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False, "displayRequestDuration": True},
    )


@router.get(ASSETS_URL + "/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"no docs asset {name!r}")
    return Response(_asset_bytes(name), media_type=ASSETS[name],
                    headers={"cache-control": f"public, max-age={ASSET_MAX_AGE}"})


@cache
def _asset_bytes(name: str) -> bytes:
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


# Status -> what it means on any route that can give it (a route's own `responses=` wins).
GENERIC = {
    401: "no token, or an invalid, revoked or disabled one",
    403: "the token's user may not do this (wrong role)",
    413: "request body over the size limit",
    422: "invalid body or parameters (a wrong type, an unknown key, a value out of range); the message names it",
    500: "a bug: the server log has the details",
}


def _calls(dependant: Dependant) -> set:
    """Every dependency callable of a route, however deeply nested."""
    found = set()
    for dep in dependant.dependencies:
        found.add(dep.call)
        found |= _calls(dep)
    return found


def statuses(route: APIRoute) -> list[int]:
    """The error statuses a route can give by its shape: its auth dependency, its body and parameters."""
    calls = _calls(route.dependant)
    codes = []
    if current_user in calls:
        codes.append(401)
    if admin in calls or annotator in calls:
        codes.append(403)
    if route.dependant.body_params:
        codes.append(413)
    if route.dependant.body_params or route.dependant.query_params or route.dependant.path_params:
        codes.append(422)
    return codes + [500]


def api_routes(app: FastAPI) -> Iterator[tuple[str, set[str], APIRoute]]:
    """(path, methods, route) of each operation in the document. FastAPI >= 0.16x keeps an included router whole in
    `app.routes` (iter_route_contexts walks it); older versions list the routes themselves."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        contexts = [(r.path_format, r.methods, r) for r in app.routes]
    else:
        contexts = [(c.path_format, c.methods, c.original_route) for c in iter_route_contexts(app.routes)]
    for path, methods, route in contexts:
        if isinstance(route, APIRoute) and route.include_in_schema:
            yield path, methods, route


def config_schema(cls: type) -> dict:
    """The JSON schema of a frozen config dataclass as a request body: each field's type, default and reason; no
    field is required and an unknown key is refused (as `from_dict` does)."""
    hints, reasons = get_type_hints(cls), field_reasons(cls)
    properties = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        properties[f.name] = {**TypeAdapter(hints[f.name]).json_schema(), "default": default,
                              "description": reasons.get(f.name, "")}
    return {"title": cls.__name__, "description": (cls.__doc__ or "").strip(), "type": "object",
            "properties": properties, "additionalProperties": False}


# POST /api/train takes a dict (RoundConfig.from_dict validates it with messages that name the field): the document
# shows RoundConfig's own fields instead of "any object".
TRAIN_BODY = ("/api/train", "post", RoundConfig)


def openapi(app: FastAPI) -> dict:
    """The OpenAPI document with every /api operation's error statuses and the ErrorBody schema (cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=metadata.version("prefloop"), description=app.description,
                         routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, methods, route in api_routes(app):
        for method in methods:
            responses = schema["paths"][path][method.lower()]["responses"]
            for code in statuses(route):
                given = responses.setdefault(str(code), {"description": GENERIC[code]})
                given["content"] = error_content  # replaces FastAPI's {"detail": [...]}, which we never send
    path, method, config = TRAIN_BODY
    if path in schema["paths"]:
        schemas[config.__name__] = config_schema(config)
        body = {"$ref": f"#/components/schemas/{config.__name__}"}
        schema["paths"][path][method]["requestBody"] = {"content": {"application/json": {"schema": body}}}
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, now referenced nowhere
        if f'"#/components/schemas/{name}"' not in json.dumps(schema["paths"]):
            schemas.pop(name, None)
    app.openapi_schema = schema
    return schema


def install(app: FastAPI) -> None:
    """Serve /api/docs and its assets, and the completed document. Call after every /api router is included."""
    app.include_router(router)
    app.openapi = lambda: openapi(app)
