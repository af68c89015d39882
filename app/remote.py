"""The CLI's way to a running server: its URL and local admin token from `server.json` in the data dir."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx

# One POST /api/prompts each; under the server's limits (a 2 MiB body, 10,000 prompts: app/server.py MAX_BODY_BYTES,
# app/api.py PromptsBody) with room to spare, and a tested pair (tests/security/test_faults.py).
CHUNK_BYTES = 1024 * 1024
CHUNK_PROMPTS = 5_000


class RemoteError(Exception):
    """The server refused or could not be reached."""


class RemoteServer:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=120)

    @classmethod
    def find(cls, data_dir: Path) -> RemoteServer | None:
        """The server that wrote `server.json`, if that file exists and the server answers."""
        try:
            info = json.loads((data_dir / "server.json").read_text())
        except (OSError, ValueError):
            return None
        remote = cls(info["url"], info["token"])
        try:
            remote.client.get("/api/health").raise_for_status()
        except httpx.HTTPError:
            return None
        return remote

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError):
                message = response.text
            raise RemoteError(f"the server at {self.url} answered {response.status_code}: {message}")
        return response

    def add_user(self, name: str, role: str, password: str | None) -> dict:
        body = {"name": name, "role": role, **({"password": password} if password else {})}
        return self._call("POST", "/api/users", json=body).json()

    def users(self) -> list[dict]:
        return self._call("GET", "/api/users").json()

    def set_password(self, name: str, password: str) -> dict:
        return self._call("POST", f"/api/users/{quote(name, safe='')}/password", json={"password": password}).json()

    def rotate_token(self, name: str) -> str:
        return self._call("POST", f"/api/users/{quote(name, safe='')}/token").json()["token"]

    def set_disabled(self, name: str, disabled: bool) -> dict:
        action = "disable" if disabled else "enable"
        return self._call("POST", f"/api/users/{quote(name, safe='')}/{action}").json()

    def add_prompts(self, prompts: list[str]) -> dict:
        """Add validated prompts in chunks under the server's body and count limits; {"added", "duplicates"} summed.
        A duplicate in a later chunk is already stored, so it counts as a duplicate, as in a local import. The chunks
        are separate transactions: a failure part-way says how far it got, and running the same import again adds
        only the rest (stored prompts are skipped as duplicates)."""
        added = duplicates = 0
        for body in prompt_chunks(prompts):
            try:
                result = self._call("POST", "/api/prompts", content=body,
                                    headers={"content-type": "application/json"}).json()
            except (RemoteError, httpx.HTTPError) as exc:
                if added + duplicates == 0:
                    raise RemoteError(str(exc)) from None
                raise RemoteError(f"{exc} -- {added + duplicates} of {len(prompts)} prompts were sent ({added} "
                                  "added) before this; run the same import again to add the rest") from None
            added, duplicates = added + result["added"], duplicates + result["duplicates"]
        return {"added": added, "duplicates": duplicates}

    def export_bytes(self, fmt: str, style: str = "conversational", drop_truncated: bool = False) -> bytes:
        """The export as the server sends it: JSON lines."""
        params = {"format": fmt, "style": style, "drop_truncated": str(drop_truncated).lower()}
        return self._call("GET", "/api/export", params=params).content

    def export(self, fmt: str, out: Path, style: str = "conversational", drop_truncated: bool = False) -> int:
        content = self.export_bytes(fmt, style, drop_truncated)
        tmp = out.with_name(out.name + ".partial")
        try:
            tmp.write_bytes(content)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return content.count(b"\n")


def prompt_chunks(prompts: list[str], max_bytes: int = CHUNK_BYTES,
                  max_prompts: int = CHUNK_PROMPTS) -> Iterator[bytes]:
    """JSON bodies {"prompts": [...]} in file order, each at most `max_bytes` (unless one prompt alone is bigger:
    it goes alone, and the server judges it) and `max_prompts` prompts."""
    chunk: list[bytes] = []
    size = 0
    for prompt in prompts:
        encoded = json.dumps(prompt, ensure_ascii=False).encode()
        if chunk and (len(chunk) == max_prompts or size + len(encoded) + 1 > max_bytes - len(b'{"prompts":[]}')):
            yield b'{"prompts":[' + b",".join(chunk) + b"]}"
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded) + 1
    if chunk:
        yield b'{"prompts":[' + b",".join(chunk) + b"]}"
