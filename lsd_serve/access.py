"""Who may open a session: the access token (`--token`) and the browser Origin of a WebSocket."""

from __future__ import annotations

import ipaddress

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


def own_origins(request: web.Request, bound_host: str) -> set[str]:
    """The origins of the page as this server serves it: the address it was bound to (`--host`)
    and the local address the connection arrived at, with the port it is listening on; for a
    loopback address also localhost, 127.0.0.1 and [::1]. Never the request's Host header, which
    the client chooses (a DNS-rebinding page sends its own name there)."""
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
    return {f"{request.scheme}://{_bracketed(h)}:{port}" for h in hosts}


def origin_allowed(request: web.Request, options: ServerOptions) -> bool:
    """No Origin (a non-browser client), the page's own origin (`own_origins`) or one given by
    --allow-origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in options.allowed_origins or origin in own_origins(request, options.host)
