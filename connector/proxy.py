"""Which proxy the connector uses to reach the broker, and where that choice came from.

httpx applies the same rules itself (``--proxy`` wins; otherwise HTTPS_PROXY / HTTP_PROXY /
ALL_PROXY with NO_PROXY, as curl reads them); this module mirrors them so ``check`` and the
logs can say what is in use without reaching into httpx's private helpers.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit


@dataclass(frozen=True)
class ProxyChoice:
    url: str | None  # None: a direct connection
    source: str  # "--proxy", "HTTPS_PROXY", "NO_PROXY", "none"

    @property
    def shown(self) -> str:
        """The proxy URL with any password masked, for logs and ``check``."""
        return redact(self.url) if self.url else "direct"


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def choose_proxy(broker_url: str, explicit: str | None) -> ProxyChoice:
    if explicit:
        return ProxyChoice(explicit, "--proxy")
    target = urlsplit(broker_url)
    env = urllib.request.getproxies()
    scheme = target.scheme
    if env.get(scheme):
        url, source = env[scheme], f"{scheme.upper()}_PROXY"
    elif env.get("all"):
        url, source = env["all"], "ALL_PROXY"
    else:
        return ProxyChoice(None, "none")
    if _bypassed(target.hostname or "", env.get("no", "")):
        return ProxyChoice(None, "NO_PROXY")
    return ProxyChoice(url if "://" in url else f"http://{url}", source)


def _bypassed(host: str, no_proxy: str) -> bool:
    """NO_PROXY as httpx reads it: ``*``, exact IPs and ``localhost``, domain suffixes."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if "://" in entry:
            entry = urlsplit(entry).hostname or ""
        entry = entry.strip("[]")
        if _is_ip(entry) or entry == "localhost":
            if host == entry:
                return True
            continue
        if entry.startswith("."):
            if host.endswith(entry):  # ".corp.example": its subdomains only
                return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class TunnelError(OSError):
    """The proxy refused or broke a CONNECT tunnel (``status`` is its HTTP answer, or 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def open_tunnel(
    proxy_url: str, host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel to ``host:port`` through an http:// proxy (``check`` and diagnostics).

    The connector's own traffic goes through httpx; this is the same request made by hand,
    so a refusal can be reported with the proxy's own status line.
    """
    proxy = urlsplit(proxy_url)
    if proxy.scheme != "http":
        raise TunnelError(0, f"only http:// proxies can be diagnosed here, not {proxy.scheme}://")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(proxy.hostname, proxy.port or 80), timeout
    )
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username is not None:
        user = unquote(proxy.username)
        password = unquote(proxy.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise TunnelError(
            0, "the proxy closed the connection instead of answering CONNECT"
        ) from exc
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status != 200:
        writer.close()
        raise TunnelError(status, f"the proxy answered CONNECT {authority} with {status_line!r}")
    return reader, writer
