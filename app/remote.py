"""The CLI's way to a running server: its URL and local admin token from `server.json` in the data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx


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

    def add_prompts(self, prompts: list[str]) -> dict:
        return self._call("POST", "/api/prompts", json={"prompts": prompts}).json()

    def export(self, fmt: str, out: Path, style: str = "conversational", drop_truncated: bool = False) -> int:
        params = {"format": fmt, "style": style, "drop_truncated": str(drop_truncated).lower()}
        response = self._call("GET", "/api/export", params=params)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_bytes(response.content)
        os.replace(tmp, out)
        return response.content.count(b"\n")
