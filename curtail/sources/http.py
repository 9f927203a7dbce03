"""JSON over HTTP for the live sources: timeouts, typed errors, no secret in any message.

Standard library only (``urllib``): the sources stay importable wherever curtail is, and no
retry layer hides a failing API from the poller, which decides what to do (cache, fallback).
Logged at DEBUG: method, URL path and query (never headers, never bodies).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from curtail.sources.base import (
    Secret,
    SourceAuthError,
    SourceDataError,
    SourceRequestError,
    SourceUnavailable,
    register_secret,
    scrub,
)

log = logging.getLogger("curtail.sources")

USER_AGENT = "curtail-carbon-sources/0.1"


class JsonHttp:
    """GET JSON from one API (``base_url``); errors become the :mod:`curtail.sources.base` types."""

    def __init__(
        self, source: str, base_url: str, *, timeout_s: float = 10.0, secrets: Iterable[Secret] = ()
    ):
        self.source = source
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.secrets: list[Secret] = list(secrets)

    def add_secret(self, secret: Secret) -> None:
        """Scrub this value too (e.g. a session token obtained at login)."""
        self.secrets.append(secret)
        register_secret(secret.reveal())

    def _clean(self, text: str) -> str:
        return scrub(text, self.secrets)

    def get(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        basic_auth: tuple[Secret, Secret] | None = None,
    ) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(
            url, headers={"Accept": "application/json", "User-Agent": USER_AGENT}
        )
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        if basic_auth is not None:
            user, password = basic_auth
            pair = Secret(
                base64.b64encode(f"{user.reveal()}:{password.reveal()}".encode()).decode(),
                "basic auth",
            )
            request.add_header("Authorization", f"Basic {pair.reveal()}")
            self.add_secret(pair)
        where = self._clean(f"GET {path}" + (f"?{query}" if query else ""))
        log.debug("%s: %s", self.source, where)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            detail = self._clean(_error_detail(error))
            status = error.code
            if status in (401, 403):
                raise SourceAuthError(
                    self.source,
                    f"{where} was refused (HTTP {status}{detail}): check the credentials",
                ) from None
            if status == 429:
                retry = error.headers.get("Retry-After") if error.headers else None
                raise SourceUnavailable(
                    self.source,
                    f"{where}: rate limited (HTTP 429{detail})"
                    + (f", retry after {retry} s" if retry else ""),
                ) from None
            if status >= 500:
                raise SourceUnavailable(
                    self.source, f"{where}: server error (HTTP {status}{detail})"
                ) from None
            raise SourceRequestError(
                self.source, f"{where} was rejected (HTTP {status}{detail})"
            ) from None
        except TimeoutError:
            raise SourceUnavailable(
                self.source, f"{where}: no answer within {self.timeout_s:g} s"
            ) from None
        except urllib.error.URLError as error:
            reason = self._clean(str(error.reason))
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise SourceUnavailable(
                    self.source, f"{where}: no answer within {self.timeout_s:g} s"
                ) from None
            raise SourceUnavailable(
                self.source, f"{where}: cannot connect to {self.base_url} ({reason})"
            ) from None
        except (ConnectionError, OSError) as error:
            raise SourceUnavailable(
                self.source, f"{where}: connection failed ({self._clean(str(error))})"
            ) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SourceDataError(
                self.source,
                f"{where}: the answer is not JSON ({self._clean(body[:80].decode(errors='replace'))!r})",
            ) from None


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The API's own message (JSON ``message``/``error``/``detail`` or the first 200 characters)."""
    try:
        raw = error.read()[:2000].decode(errors="replace")
    except Exception:  # noqa: BLE001 -- a broken error body must not hide the status
        return ""
    try:
        payload = json.loads(raw)
        if isinstance(payload, dict):
            for key in ("message", "error", "detail"):
                if key in payload:
                    return f": {str(payload[key])[:200]}"
    except json.JSONDecodeError:
        pass
    raw = " ".join(raw.split())
    return f": {raw[:200]}" if raw else ""


def require(source: str, payload: Any, *keys: str) -> Any:
    """``payload[k1][k2]...`` or a :class:`SourceDataError` naming the missing field."""
    value = payload
    path = []
    for key in keys:
        path.append(key)
        if not isinstance(value, dict) or key not in value:
            raise SourceDataError(source, f"the answer has no field {'.'.join(path)!r}")
        value = value[key]
    return value
