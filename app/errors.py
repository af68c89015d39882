"""Where errors become HTTP responses: every failure leaves the API as JSON `{"error": "..."}` with its status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.policy import PolicyBusy
from learner.errors import ConfigError, LearnerError, ModelError
from storage.db import disk_full_error, is_disk_full
from storage.errors import (
    Conflict,
    DataDirBusy,
    InvalidValue,
    LabelError,
    NotFound,
    NotHanded,
    PromptFileError,
    RateLimited,
    StorageError,
    StorageFull,
)


class ApiError(Exception):
    """An error with its HTTP status, raised by the API layer itself (auth, roles, bodies)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# The most specific class first: the first match wins.
STATUS = [
    (NotFound, 404),
    (Conflict, 409),
    (NotHanded, 403),  # the item is not this annotator's to label (issue 8 item 4)
    (RateLimited, 429),
    (LabelError, 422),
    (InvalidValue, 422),
    (PromptFileError, 422),
    (ConfigError, 422),
    (DataDirBusy, 503),
    (StorageFull, 507),  # Insufficient Storage: the client did nothing wrong, and a retry after cleanup works
    (ModelError, 503),
    (StorageError, 500),
    (LearnerError, 500),
]


def status_of(exc: Exception) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def describe_validation(exc: RequestValidationError) -> str:
    """One line per problem, naming the field: "body.ranking.2: Input should be a valid integer"."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message)

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, exc: StorageError):
        return _error(status_of(exc), str(exc))

    @app.exception_handler(LearnerError)
    async def _learner_error(request: Request, exc: LearnerError):
        return _error(status_of(exc), str(exc))

    @app.exception_handler(PolicyBusy)
    async def _busy(request: Request, exc: PolicyBusy):
        return JSONResponse({"error": str(exc)}, status_code=429, headers={"retry-after": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _error(422, describe_validation(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if is_disk_full(exc):  # a read that spilled to disk, or a write outside Database.write()
            ctx = getattr(request.app.state, "ctx", None)
            full = disk_full_error(ctx.store.path if ctx else "the database", exc)
            return _error(status_of(full), str(full))
        # A bug, not a refusal: logged with its traceback by the server; the client gets JSON, not a text page.
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if not request.url.path.startswith("/api"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _error(exc.status_code, str(exc.detail))
