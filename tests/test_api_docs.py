"""/api/docs offline (Swagger UI's files served by prefloop itself) and an OpenAPI document that declares the bearer
scheme, the {"error"} body and the statuses each route gives; the page rendered in a real Chromium that may not reach
any other origin."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from app.api_models import ErrorBody

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 60_000


@pytest.fixture
def docs_server(ctx, accounts):
    """The real app without the Gradio UI (the docs do not need it) on a free loopback port."""
    from app.server import RunningServer, create_app

    running = RunningServer(create_app(ctx, with_ui=False), "127.0.0.1", 0).start()
    yield running
    running.stop()


@pytest.fixture
def client(docs_server):
    with httpx.Client(base_url=docs_server.url, timeout=60) as c:
        yield c


@pytest.fixture
def spec(client) -> dict:
    r = client.get("/api/openapi.json")
    assert r.status_code == 200
    return r.json()


def references(html: str) -> list[str]:
    """Every URL the page loads: src/href attributes and the spec's `url:`."""
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"url: '([^']*)'", html)


def test_docs_page_loads_only_same_origin_assets(client):
    r = client.get("/api/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = references(r.text)
    assert len(urls) == 4  # css, favicon, js, the OpenAPI document
    assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "http://" not in r.text and "https://" not in r.text
    expected = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(expected[Path(url).suffix]), (url, asset.headers)
        assert len(asset.content) > 1000, url
    assert b"SwaggerUIBundle" in client.get("/api/docs/assets/swagger-ui-bundle.js").content


def test_unknown_docs_asset_is_a_json_404(client):
    for name in ("nope.js", "..%2F..%2Fapp%2Fapi.py", "__init__.py"):
        r = client.get(f"/api/docs/assets/{name}")
        assert r.status_code == 404 and "error" in r.json(), name


def test_spec_declares_the_bearer_scheme(spec):
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API token: `prefloop users add` prints one"}
    assert spec["paths"]["/api/items/next"]["get"]["security"] == [{"HTTPBearer": []}]
    assert spec["paths"]["/api/export"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/api/health"]["get"]
    assert "/api/docs" not in spec["paths"] and not any(p.startswith("/api/docs/") for p in spec["paths"])


def test_spec_documents_the_error_body_and_each_routes_statuses(spec):
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert "HTTPValidationError" not in str(spec)  # FastAPI's {"detail"} body, which prefloop never sends
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    operations = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert len(operations) > 15
    for path, method, op in operations:
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == error_ref, (path, method, status)
        assert "500" in op["responses"], (path, method)
        if op.get("security"):
            assert "401" in op["responses"], (path, method)
    ranking = spec["paths"]["/api/items/{item_id}/ranking"]["post"]["responses"]
    assert set(ranking) >= {"201", "401", "403", "404", "409", "413", "422", "500"}
    assert "already ranked" in ranking["409"]["description"]
    assert set(spec["paths"]["/api/users"]["post"]["responses"]) >= {"201", "401", "403", "409", "422"}
    assert "429" in spec["paths"]["/api/generate"]["post"]["responses"]
    assert {"403", "429"} <= set(spec["paths"]["/api/generate/batch"]["post"]["responses"])  # admins; shared slots
    assert "401" not in spec["paths"]["/api/health"]["get"]["responses"]
    assert "403" in spec["paths"]["/api/versions"]["get"]["responses"]  # admin only
    assert "403" not in spec["paths"]["/api/me"]["get"]["responses"]  # any token


def test_spec_has_typed_answers(spec):
    def schema_of(path, method, status):
        return spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert schema_of("/api/health", "get", "200") == {"$ref": "#/components/schemas/Health"}
    assert schema_of("/api/items/next", "get", "200") == {"$ref": "#/components/schemas/ItemToLabel"}
    assert schema_of("/api/versions", "get", "200")["items"] == {"$ref": "#/components/schemas/VersionInfo"}
    item = spec["components"]["schemas"]["ItemToLabel"]
    assert set(item["required"]) == {"item_id", "prompt", "answers"}


def test_real_errors_match_the_documented_body(client, accounts):
    ann = {"authorization": f"Bearer {accounts['ann'][1]}"}
    refusals = [
        client.get("/api/items/next"),  # 401: no token
        client.get("/api/items/next", headers={"authorization": "Basic YWxpY2U6eA=="}),  # 401: not a bearer token
        client.get("/api/items/next", headers={"authorization": "Bearer nonsense"}),  # 401
        client.get("/api/users", headers=ann),  # 403: an annotator
        client.post("/api/items/1/ranking", json={"ranking": ["a"]}, headers=ann),  # 422
    ]
    assert [r.status_code for r in refusals] == [401, 401, 401, 403, 422]
    for r in refusals:
        ErrorBody.model_validate(r.json(), strict=True)
        assert set(r.json()) == {"error"}
    assert "missing token" in refusals[1].json()["error"]
    lower = client.get("/api/me", headers={"authorization": f"bearer {accounts['ann'][1]}"})
    assert lower.status_code == 200 and lower.json() == {"name": "ann", "role": "annotator"}


@pytest.fixture
def page(docs_server, request):
    """A Chromium page that can reach the server's origin only: every other request is aborted and recorded."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1300, "height": 1000})
        context.blocked = []

        def only_same_origin(route):
            if route.request.url.startswith(docs_server.url + "/"):
                return route.continue_()
            context.blocked.append(route.request.url)
            return route.abort()

        context.route("**/*", only_same_origin)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        browser.close()


def test_docs_render_offline_with_authorize(page, docs_server, accounts):
    page.goto(f"{docs_server.url}/api/docs")
    page.locator(".swagger-ui .info .title").get_by_text("prefloop").wait_for()
    page.locator(".opblock-summary-path", has_text="/api/items/{item_id}/ranking").first.wait_for()
    assert page.locator(".opblock").count() > 15
    page.get_by_role("button", name=re.compile("Authorize")).first.click()
    dialog = page.locator(".dialog-ux")
    dialog.get_by_text("HTTPBearer").wait_for()
    dialog.locator("input").first.fill(accounts["ann"][1])
    dialog.locator("button.modal-btn.authorize").click()
    dialog.get_by_text("Logout").wait_for()  # Swagger UI now holds the token for "Try it out"
    dialog.locator("button.btn-done").click()
    page.locator(".opblock-summary-path", has_text="/api/items/{item_id}/ranking").first.click()
    page.locator(".opblock.is-open .responses-table").get_by_text("409").first.wait_for()
    assert page.context.blocked == []  # the page asked no other origin for anything


def test_train_body_is_round_configs_schema(spec):
    from dataclasses import fields

    from learner.config import RoundConfig

    body = spec["paths"]["/api/train"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RoundConfig"}
    schema = spec["components"]["schemas"]["RoundConfig"]
    assert schema["additionalProperties"] is False and "required" not in schema
    assert list(schema["properties"]) == [f.name for f in fields(RoundConfig)]
    defaults = RoundConfig()
    for name, prop in schema["properties"].items():
        assert prop["default"] == getattr(defaults, name), name
        assert len(prop["description"]) > 10, name  # the reason written beside the default
    assert schema["properties"]["beta"]["type"] == "number"
    assert "2506.21495" in schema["properties"]["sync_every"]["description"]  # a reason continued over lines


def test_field_reasons_read_the_comment_beside_each_default():
    from dataclasses import dataclass

    from app.reasons import field_reasons

    @dataclass(frozen=True)
    class Example:
        # --- a section heading, not a reason
        size: int = 4  # four fits
        ratio: float = 0.5  # half, because
        #   the other half stays
        name: str = "x"
        # --- another section
        last: bool = False  # off by default

    assert field_reasons(Example) == {"size": "four fits", "ratio": "half, because the other half stays",
                                      "last": "off by default"}
