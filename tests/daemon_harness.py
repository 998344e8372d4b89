"""Running the daemon in-process for tests: a config in a temporary folder, a real port."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import treq
import yaml
from twisted.web.http_headers import Headers

from delivery.daemon import Daemon

from .receiver import HS_TOKEN

INGEST = "ingest-secret-token"
ADMIN = "admin-secret-token"


def auth(token: str, **more: str) -> Headers:
    """Request headers with a bearer token (and any others)."""
    headers = Headers({"Authorization": [f"Bearer {token}"]})
    for name, value in more.items():
        headers.setRawHeaders(name.replace("_", "-"), [value])
    return headers


def write_registration(
    folder: Path, service_id: str, url: str | None, users: str = ".*", **options: Any
) -> Path:
    path = folder / f"{service_id}.yaml"
    data: dict[str, Any] = {
        "id": service_id,
        "url": url,
        "as_token": f"as-{service_id}-secret",
        "hs_token": HS_TOKEN,
        "sender_localpart": f"{service_id}bot",
        "namespaces": {"users": [{"regex": users, "exclusive": False}]},
    }
    if options:
        data["delivery"] = options
    path.write_text(yaml.safe_dump(data))
    return path


def write_config(folder: Path, registrations: list[Path], **extra: Any) -> Path:
    config = {
        "database": "sqlite:///delivery.db",
        "listen": "tcp:0:interface=127.0.0.1",
        "ingest_token": INGEST,
        "admin_token": ADMIN,
        "app_service_config_files": [p.name for p in registrations],
        "poll_interval": 0.05,
        **extra,
    }
    path = folder / "delivery.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@attrs.define
class Running:
    daemon: Daemon
    url: str

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = ADMIN,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """
        One request; the status and the JSON answer (bytes if it is not JSON). A body goes
        as ``application/json`` unless ``headers`` give a Content-Type.
        """
        all_headers = Headers({k: [v] for k, v in (headers or {}).items()})
        if token is not None:
            all_headers.setRawHeaders("Authorization", [f"Bearer {token}"])
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None and not all_headers.hasHeader("Content-Type"):
            all_headers.setRawHeaders("Content-Type", ["application/json"])
        response = await treq.request(
            method, self.url + path, data=data, headers=all_headers, persistent=False
        )
        content = await response.content()
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def ingest(self, events: list[dict[str, Any]]) -> list[int]:
        status, body = await self.request("POST", "/v1/events", {"events": events}, token=INGEST)
        assert status == 200, body
        return list(body["stream_ids"])


async def start_daemon(config: Path, reactor: Any) -> Running:
    daemon = Daemon(config, reactor=reactor)
    daemon.startService()
    assert daemon.web.listening is not None
    port = await daemon.web.listening
    await daemon.delivery.started()
    return Running(daemon, f"http://127.0.0.1:{port.getHost().port}")  # type: ignore[attr-defined]
