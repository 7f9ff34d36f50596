"""The checks of a server without tokens (loopback only) against pages in the operator's browser.

Without a token any local program may use the server, which is the point; but a web page the operator
opens could too: a cross-site "simple" POST (text/plain, no preflight) or a DNS-rebinding page whose host
name resolves to 127.0.0.1. So such a server takes only requests addressed to a loopback host, from no
web origin other than a loopback one, and JSON only with its JSON content type (which no page can send
to another origin without a CORS preflight, which this server never grants).
"""

from __future__ import annotations

import ipaddress
from typing import Mapping
from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("localhost",)


def is_loopback_host(host: str) -> bool:
    """Whether a host name (without port; IPv6 in brackets or not) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def browser_problem(headers: Mapping[str, str]) -> str:
    """Why a request to a tokenless server looks like it comes from another site's page ("" if it does not)."""
    host = urlsplit(f"//{headers.get('host', '')}").hostname or ""
    if not is_loopback_host(host):
        return f"this server (no token, loopback only) takes requests for a loopback host only, not {host!r}"
    origin = headers.get("origin")
    if origin is not None and not is_loopback_host(urlsplit(origin).hostname or ""):
        return f"this server (no token, loopback only) takes no requests from web pages of {origin!r}"
    return ""


def is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "application/json"
