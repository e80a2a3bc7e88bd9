"""URI inputs, off by default: http(s) only from allow-listed hosts, file paths only under a
configured root (resolved, so '..' and symlinks cannot escape it). No SSRF, no traversal."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from .config import Settings
from .errors import InputTooLarge, InvalidInput, UriNotAllowed

_TIMEOUT_S = 10.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could point at a host outside the allowlist: refuse to follow it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise UriNotAllowed(f"{req.full_url} redirects to {newurl}; redirects are not followed")


def fetch(uri: str, settings: Settings, max_bytes: int) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return _fetch_http(uri, parsed.hostname or "", settings, max_bytes)
    if parsed.scheme == "file":
        return _read_file(Path(unquote(parsed.path)), settings, max_bytes)
    raise UriNotAllowed(f"URI scheme {parsed.scheme or '(none)'!r} is not supported; use http(s):// or file://")


def _fetch_http(uri: str, host: str, settings: Settings, max_bytes: int) -> bytes:
    if host.lower() not in {h.lower() for h in settings.uri_http_hosts}:
        raise UriNotAllowed(f"host {host!r} is not in the server's URI allowlist")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(uri, timeout=_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.URLError as exc:
        raise InvalidInput(f"could not fetch {uri}: {exc.reason}", reason="URI_FETCH_FAILED") from None
    if len(data) > max_bytes:
        raise InputTooLarge(f"{uri} is larger than the {max_bytes} byte limit")
    return data


def _read_file(path: Path, settings: Settings, max_bytes: int) -> bytes:
    if not settings.uri_file_root:
        raise UriNotAllowed("file:// URIs are disabled on this server (no uri_file_root configured)")
    root = Path(settings.uri_file_root).resolve()
    target = path.resolve()
    if not target.is_relative_to(root):
        raise UriNotAllowed(f"{path} is outside the allowed root")
    if not target.is_file():
        raise InvalidInput(f"{path} does not exist", reason="URI_FETCH_FAILED")
    if target.stat().st_size > max_bytes:
        raise InputTooLarge(f"{path} is larger than the {max_bytes} byte limit")
    return target.read_bytes()
