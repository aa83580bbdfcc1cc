"""Who may open a session: the access token (`--token`) and the browser Origin of a WebSocket; who
may read the page, `/healthz` and `/metrics`: a request whose Host header names this server."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from lsd_serve.options import ServerOptions


def authorised(request: web.Request, token: str | None) -> bool:
    """No token set, or the request carries it (`?token=...` or `Authorization: Bearer ...`)."""
    if token is None:
        return True
    bearer = request.headers.get("Authorization", "")
    return request.query.get("token") == token or bearer == f"Bearer {token}"


def _bracketed(host: str) -> str:
    """An IPv6 address as a URL writes it (`[::1]`); other hosts as they are."""
    return f"[{host}]" if ":" in host else host


def own_hosts(request: web.Request, bound_host: str) -> tuple[set[str], int]:
    """The names of this server as it serves the page, and its port: the address it was bound
    to (`--host`) and the local address the connection arrived at; for a loopback address also
    localhost, 127.0.0.1 and ::1. Never the request's Host header, which the client chooses (a
    DNS-rebinding page sends its own name there)."""
    local_ip, port = request.transport.get_extra_info("sockname")[:2]
    hosts = {local_ip}
    if bound_host not in ("", "0.0.0.0", "::"):
        hosts.add(bound_host)
    loopback = bound_host == "localhost"
    for host in list(hosts):
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
    if loopback:
        hosts |= {"localhost", "127.0.0.1", "::1"}
    return hosts, port


def own_origins(request: web.Request, bound_host: str) -> set[str]:
    """The origins of the page as this server serves it (`own_hosts` with the port it listens
    on)."""
    hosts, port = own_hosts(request, bound_host)
    return {f"{request.scheme}://{_bracketed(h)}:{port}" for h in hosts}


def origin_allowed(request: web.Request, options: ServerOptions) -> bool:
    """No Origin (a non-browser client), the page's own origin (`own_origins`) or one given by
    --allow-origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in options.allowed_origins or origin in own_origins(request, options.host)


def host_allowed(request: web.Request, options: ServerOptions) -> bool:
    """The request's Host header names this server (`own_hosts` with its port; the bare name
    too on port 80) or the host of an --allow-origin (a proxy in front of it), or the request
    carries the --token: what a DNS-rebinding page, whose requests carry its own name as Host,
    cannot do."""
    if options.token is not None and authorised(request, options.token):
        return True
    host = request.headers.get("Host", "").lower()
    hosts, port = own_hosts(request, options.host)
    names = {f"{_bracketed(h)}:{port}" for h in hosts}
    if port == 80:
        names |= {_bracketed(h) for h in hosts}
    names |= {urlsplit(origin).netloc.lower() for origin in options.allowed_origins}
    return host in names
