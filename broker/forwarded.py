"""The API user's real address behind reverse proxies: X-Forwarded-For from trusted hops only.

Anyone can send an ``X-Forwarded-For`` header, so it is believed only as far as the hops
that wrote it are trusted (``--trusted-proxies``): walking from the connection's peer
back along the header, the first address that is not a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: ``peer``, or what trusted proxies say in X-Forwarded-For."""
    if not trusted or not forwarded_for or peer is None or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    # Every hop is a trusted proxy: the first one is as close to the client as we know.
    return hops[0] if hops else peer
