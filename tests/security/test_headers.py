"""Issue 8 item 7: no page may be framed by another site, and no other origin may read our answers with the
user's credentials. A real server on a free port."""

from __future__ import annotations

import httpx
import pytest

TIMEOUT_S = 120
EVIL = "https://evil.example"
# Gradio reflects any Origin with credentials allowed unless the Host looks like localhost: ask as a deployed server.
DEPLOYED_HOST = "prefloop.example.org"


@pytest.fixture
def session_cookies(server) -> dict:
    """name -> the cookies of a logged-in browser session."""
    cookies = {}
    for name in ("ann", "boss"):
        r = httpx.post(f"{server.url}/ui/login", data={"username": name, "password": f"{name}-password"},
                       timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text
        cookies[name] = dict(r.cookies)
    return cookies


def pages(session_cookies) -> list[tuple[str, dict]]:
    """(path, cookies): the login page, both UIs logged in, their config, the REST API."""
    ann, boss = session_cookies["ann"], session_cookies["boss"]
    return [("/ui/", {}), ("/admin/", {}), ("/ui/", ann), ("/ui/config", ann), ("/admin/", boss),
            ("/admin/config", boss), ("/ui/gradio_api/info", ann), ("/api/health", {}), ("/api/openapi.json", {})]


def test_no_page_can_be_framed(server, session_cookies):
    for path, cookies in pages(session_cookies):
        r = httpx.get(f"{server.url}{path}", cookies=cookies, timeout=TIMEOUT_S)
        assert r.status_code in (200, 401), (path, r.status_code)
        assert r.headers.get("x-frame-options") == "DENY", path
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), path
        assert r.headers.get("x-content-type-options") == "nosniff", path


@pytest.mark.parametrize("host", [DEPLOYED_HOST, "127.0.0.1"])
def test_no_credentialed_cors_for_other_origins(server, session_cookies, host):
    headers = {"origin": EVIL, "host": host}
    for path, cookies in pages(session_cookies):
        r = httpx.get(f"{server.url}{path}", cookies=cookies, headers=headers, timeout=TIMEOUT_S)
        assert_not_shared(r, path)
    ann = session_cookies["ann"]
    join = {"data": [], "fn_index": 0, "session_hash": "x"}
    for path in ("/ui/gradio_api/queue/join", "/admin/gradio_api/queue/join", "/api/items/1/ranking"):
        preflight = httpx.options(f"{server.url}{path}", timeout=TIMEOUT_S, headers={
            **headers, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
        assert_not_shared(preflight, path)
        assert_not_shared(httpx.post(f"{server.url}{path}", json=join, cookies=ann, headers=headers,
                                     timeout=TIMEOUT_S), path)


def assert_not_shared(response: httpx.Response, path: str) -> None:
    allowed = response.headers.get("access-control-allow-origin")
    assert allowed not in (EVIL, "*", "null"), (path, response.status_code, dict(response.headers))
