"""The door in front of both Gradio apps: an ASGI middleware that decides, before Gradio sees a byte, who may in.

Two Gradio apps, two doors (issue 8 item 1): the annotator UI at /ui lets in any enabled user; the Admin UI at /admin
lets in enabled admins only. Every request under a door (pages, config, queue/join and its event stream, upload,
file=, info, heartbeats, assets, websockets) is refused with 401/403 unless its session cookie (or an
`Authorization: Bearer` API token) belongs to such a user, looked up in the store on every request, so disabling or
removing a user closes both doors at once. No annotator request ever reaches an admin component's preprocessing.

The guard also serves the one login form both apps share (POST {door}/login: the password check runs in a worker
thread, never on the event loop, behind `app.login.LoginThrottle`) and {door}/logout, and it adds the frame and
content-type headers to every response (item 7). Gradio learns the user from `gradio_user`, its `auth_dependency`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl

import anyio
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app.context import AppContext
from app.login import TOKEN_ACCEPTED, LockedOut, LoginThrottle
from storage.users import User

SESSION_COOKIE = "prefloop_session"
SCOPE_USER = "prefloop.user"  # the ASGI scope key where the guard leaves the user's name for Gradio


@dataclass(frozen=True)
class Door:
    prefix: str  # where the Gradio app is mounted
    admins_only: bool  # /admin: enabled admins; /ui: any enabled user
    takes_files: bool  # whether Gradio's upload routes are open (the annotator UI has no file inputs)


ANNOTATOR_DOOR = Door("/ui", admins_only=False, takes_files=False)
ADMIN_DOOR = Door("/admin", admins_only=True, takes_files=True)
DOORS = (ANNOTATOR_DOOR, ADMIN_DOOR)


@dataclass(frozen=True)
class UploadPolicy:
    """Sizes and lifetimes of what the browser UI may send and leave on disk."""

    # Gradio's max_file_size for the Admin prompts upload: ~10,000 prompts of 1 kB; the CLI imports bigger files.
    max_file_bytes: int = 10 * 1024 * 1024
    # Any other request to a Gradio app carries a small event payload (text fields, radio values): 1 MiB is plenty.
    max_body_bytes: int = 1024 * 1024
    # A login form is two short fields.
    max_login_bytes: int = 16 * 1024
    # Gradio's delete_cache (every, older than): uploads and exports are used at once, so an hour is generous.
    cache_sweep_s: int = 3600
    cache_age_s: int = 3600


# Gradio routes that take files (multipart bodies written to the upload folder).
UPLOAD_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")
# Item 7: no page of ours may be framed (clickjacking), and no response is sniffed into another content type.
SECURITY_HEADERS = {
    b"x-frame-options": b"DENY",
    b"content-security-policy": b"frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
}
# The login and refusal pages are ours: no script at all, forms post only to us.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def gradio_user(request) -> str | None:
    """Gradio's `auth_dependency` for both apps: the user the guard let in (Gradio never sees anyone else)."""
    return request.scope.get(SCOPE_USER)


class WebGuard:
    """ASGI middleware around the whole app (see the module docstring)."""

    def __init__(self, app, ctx: AppContext, throttle: LoginThrottle, doors: tuple[Door, ...] = DOORS,
                 uploads: UploadPolicy = UploadPolicy()):
        self.app = app
        self.ctx = ctx
        self.throttle = throttle
        self.doors = doors
        self.uploads = uploads

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            send = _with_security_headers(send)
        door = next((d for d in self.doors if _under(scope["path"], d.prefix)), None)
        if door is not None:
            return await self._through_door(door, scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith("/api") and _header(scope, b"authorization"):
            return await self._api_with_token(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _through_door(self, door: Door, scope, receive, send):
        rest = scope["path"][len(door.prefix):]
        method = scope.get("method", "GET")
        if rest == "":
            return await RedirectResponse(door.prefix + "/", status_code=307)(scope, receive, send)
        if scope["type"] == "http" and rest in ("/login", "/login/") and method == "POST":
            return await self._login(door, scope, receive, send)
        if scope["type"] == "http" and rest in ("/logout", "/logout/"):
            return await self._logout(scope, receive, send)
        user = await anyio.to_thread.run_sync(self._user_of, scope)  # a store read: never on the event loop
        refusal = self._refusal(door, user, scope, rest)
        if refusal is not None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await refusal(scope, receive, send)
        scope[SCOPE_USER] = user.name
        return await self.app(scope, receive, send)

    def _refusal(self, door: Door, user: User | None, scope, rest: str) -> Response | None:
        """Why this request may not pass, as the response to send; None when it may."""
        page = scope["type"] == "http" and rest == "/" and scope.get("method") in ("GET", "HEAD")
        if user is None:
            if page:
                return login_page(door, status=401 if door.admins_only else 200)
            return _error(401, "log in first (POST your name and password to /ui/login)")
        if door.admins_only and user.role != "admin":
            message = f"admins only: {user.name!r} is an {user.role}"
            return refusal_page(message) if page else _error(403, message)
        if rest.startswith(UPLOAD_ROUTES) and not door.takes_files:
            return _error(403, f"{door.prefix} takes no files")
        if rest.lower().startswith(("/gradio_api/file=http", "/gradio_api/proxy=")):
            return _error(403, "the UI serves no remote files")
        return self._body_refusal(scope, rest)

    def _body_refusal(self, scope, rest: str) -> Response | None:
        if scope["type"] != "http":
            return None
        # An upload's multipart envelope adds a little to the file; Gradio itself enforces max_file_size exactly.
        takes_file = rest.startswith(UPLOAD_ROUTES)
        limit = self.uploads.max_file_bytes + 64 * 1024 if takes_file else self.uploads.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"request body of {int(declared)} bytes; the limit is {limit}")
        if not declared and b"chunked" in _header(scope, b"transfer-encoding").encode().lower():
            return _error(411, "send a Content-Length with the request body")  # so the limit above always applies
        return None

    def _user_of(self, scope) -> User | None:
        """The enabled user behind the session cookie or Bearer token, looked up in the store now; a session whose
        user is gone or disabled is ended."""
        token = _cookie(scope, SESSION_COOKIE)
        if token:
            user_id = self.ctx.sessions.user_id(token)
            user = self.ctx.store.users.get_by_id(user_id) if user_id is not None else None
            if user is not None and not user.disabled:
                return user
            self.ctx.sessions.end(token)
        scheme, _, bearer = _header(scope, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and bearer.strip():
            return self.ctx.store.users.by_token(bearer.strip())  # None when disabled
        return None

    async def _login(self, door: Door, scope, receive, send):
        try:
            form = await _read_form(scope, receive, self.uploads.max_login_bytes)
        except ValueError as exc:
            return await _error(400, str(exc))(scope, receive, send)
        name, password = form.get("username", "").strip()[:200], form.get("password", "")
        browser = "next" in form  # our login page; gradio_client and scripts get JSON
        target = form["next"] if form.get("next") in {d.prefix + "/" for d in self.doors} else door.prefix + "/"
        address = _address(scope)
        try:
            self.throttle.begin_login(name, address)
        except LockedOut as exc:
            response = (login_page(door, exc.args[0], name, target, status=429) if browser
                        else _error(429, exc.args[0]))
            response.headers["retry-after"] = str(exc.retry_after_s)
            return await response(scope, receive, send)
        user = await anyio.to_thread.run_sync(self.ctx.authenticate_password, name, password)  # scrypt + DuckDB
        if user is None:
            message = "wrong user name or password (or the account is disabled)"
            response = login_page(door, message, name, target, status=401) if browser else _error(401, message)
            return await response(scope, receive, send)
        self.throttle.login_succeeded(name, address)
        response = RedirectResponse(target, status_code=303) if browser else JSONResponse({"success": True})
        response.set_cookie(SESSION_COOKIE, self.ctx.sessions.create(user), max_age=int(self.ctx.sessions.lifetime_s),
                            path="/", httponly=True, samesite="lax", secure=scope.get("scheme") == "https")
        return await response(scope, receive, send)

    async def _logout(self, scope, receive, send):
        """Ends this browser's session only (other devices stay logged in); back to the login form."""
        token = _cookie(scope, SESSION_COOKIE)
        if token:
            self.ctx.sessions.end(token)
        response = RedirectResponse(ANNOTATOR_DOOR.prefix + "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
        return await response(scope, receive, send)

    async def _api_with_token(self, scope, receive, send):
        """Invalid API tokens from one address are throttled like passwords (the API answers the 401 itself); a
        token the API accepted before passes a lockout (`LoginThrottle.check_token`)."""
        address = _address(scope)
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            self.throttle.check_token(address, token)
        except LockedOut as exc:
            response = _error(429, exc.args[0])
            response.headers["retry-after"] = str(exc.retry_after_s)
            return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                if message["status"] == 401:
                    self.throttle.token_failed(address, token)
                elif scope.get(TOKEN_ACCEPTED):
                    self.throttle.token_accepted(token)
            await send(message)

        return await self.app(scope, receive, counting_send)


# -- pages -------------------------------------------------------------------------------------------------------------
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>prefloop</title>
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:10vh auto;padding:0 1rem;line-height:1.4}}
label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;padding:.5rem;box-sizing:border-box;font-size:1rem}}
button{{margin-top:1.2rem;padding:.5rem 1.5rem;font-size:1rem}}.error{{color:#b00020;font-weight:600}}</style>
</head><body><h1>prefloop</h1>{body}</body></html>"""

_LOGIN_FORM = """<p>{intro}</p>{error}
<form method="post" action="{action}"><input type="hidden" name="next" value="{target}">
<label for="username">username</label>
<input id="username" name="username" value="{name}" autocomplete="username" required autofocus>
<label for="password">password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Login</button></form>"""


def login_page(door: Door, error: str = "", name: str = "", target: str = "", status: int = 200) -> HTMLResponse:
    intro = ("The Admin UI: log in as an admin." if door.admins_only
             else "Log in with the name and password your admin gave you.")
    body = _LOGIN_FORM.format(
        intro=intro, error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
        action=html.escape(door.prefix + "/login"), target=html.escape(target or door.prefix + "/"),
        name=html.escape(name))
    return HTMLResponse(_PAGE.format(body=body), status_code=status,
                        headers={"content-security-policy": PAGE_CSP, "cache-control": "no-store"})


def refusal_page(message: str) -> HTMLResponse:
    body = (f'<p class="error" role="alert">{html.escape(message)}</p>'
            f'<p><a href="{ANNOTATOR_DOOR.prefix}/">Back to annotating</a> · '
            f'<a href="{ANNOTATOR_DOOR.prefix}/logout">Log out</a></p>')
    return HTMLResponse(_PAGE.format(body=body), status_code=403,
                        headers={"content-security-policy": PAGE_CSP, "cache-control": "no-store"})


# -- ASGI helpers ------------------------------------------------------------------------------------------------------
def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _cookie(scope, name: str) -> str | None:
    jar = SimpleCookie()
    try:
        jar.load(_header(scope, b"cookie"))
    except Exception:  # noqa: BLE001 - a malformed Cookie header is no session, not an error
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _address(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _with_security_headers(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-frame-options"]
            present = {k.lower() for k, _ in headers}
            headers += [(k, v) for k, v in SECURITY_HEADERS.items() if k not in present]
            message = {**message, "headers": headers}
        await send(message)
    return sending


async def _read_form(scope, receive, limit: int) -> dict[str, str]:
    """The login form's fields (urlencoded or multipart, text only), read up to `limit` bytes. ValueError otherwise."""
    from starlette.requests import Request

    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ValueError("the request ended before its body")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise ValueError(f"a login form over {limit} bytes")
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    kind = _header(scope, b"content-type").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    if kind == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            form = await Request(scope, replay).form(max_files=0, max_fields=10)
        except Exception as exc:  # noqa: BLE001 - starlette's multipart errors: a bad form, said plainly
            raise ValueError(f"cannot read the login form: {exc}") from None
        return {key: value for key, value in form.items() if isinstance(value, str)}
    raise ValueError("send the login as a form: username=...&password=...")


def mount_door(app, blocks, door: Door, ctx: AppContext, uploads: UploadPolicy = UploadPolicy(), **gradio_kwargs):
    """Mount a Gradio app at `door.prefix` (the guard in front lets in only that door's users), with Gradio's own
    file rules switched on."""
    import gradio as gr

    # Gradio confines FileData paths in event payloads to its upload folder only once the app "has launched"
    # (processing_utils._check_allowed returns early otherwise), and mount_gradio_app never launches: without this,
    # a queue/join payload naming /dev/zero or /etc/shadow is copied into the cache before any handler runs.
    blocks.has_launched = True
    # Uploads and exports are swept from the cache after an hour (and all of them at shutdown).
    blocks.delete_cache = (uploads.cache_sweep_s, uploads.cache_age_s)
    private = sorted({str(ctx.config.data_dir.resolve()), str(ctx.config.models_dir.resolve())})
    return gr.mount_gradio_app(app, blocks, path=door.prefix, auth_dependency=gradio_user,
                               max_file_size=uploads.max_file_bytes, blocked_paths=private, **gradio_kwargs)
