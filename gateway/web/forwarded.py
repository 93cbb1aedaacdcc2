"""Forwarded headers, believed only from trusted peers.

Behind a load balancer that terminates TLS, the gateway sees plain HTTP from the
balancer's address; the balancer says what the client used in
``X-Forwarded-Proto``/``X-Forwarded-Host``/``X-Forwarded-For`` (or RFC 7239
``Forwarded``). Anyone could send those headers, so they count only when the
connection comes from an address in ``DS_FORWARDED_ALLOW_IPS``
(``--forwarded-allow-ips``: addresses or networks, comma-separated, ``*`` for any;
default ``127.0.0.1``). From anyone else they are ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from .request import Request

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A Forwarded element's pairs: token=token or token="quoted".
_FORWARDED_PAIR = re.compile(r'\s*([A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')
# What a forwarded host may be: a reg-name or IP literal, optional port.
_HOST = re.compile(r"\A(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~%]+)(:[0-9]{1,5})?\Z")


class TrustedProxies:
    """The peers whose forwarded headers are believed."""

    def __init__(self, spec: str) -> None:
        items = [item.strip() for item in spec.split(",") if item.strip()]
        self.any = "*" in items
        networks: list[_Network] = []
        for item in items:
            if item == "*":
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise ValueError(
                    f"DS_FORWARDED_ALLOW_IPS: {item!r} is not an IP address or network"
                ) from exc
        self.networks = tuple(networks)
        self.trusts = functools.lru_cache(maxsize=1024)(self._trusts)

    def _trusts(self, peer: str | None) -> bool:
        if self.any:
            return True
        if not peer or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False  # a unix socket path, say
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def _first_forwarded(value: str) -> dict[str, str]:
    """The parameters of the first element of a ``Forwarded`` header: the
    element the client-facing proxy wrote (later proxies append theirs)."""
    element = value.split(",", 1)[0]
    params: dict[str, str] = {}
    for match in _FORWARDED_PAIR.finditer(element):
        name, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(name, raw)
    return params


def _first(value: str | None) -> str | None:
    """The first of a comma-separated list (proxies append)."""
    if value is None:
        return None
    first = value.split(",", 1)[0].strip()
    return first or None


def base_url(req: Request, trusted: TrustedProxies) -> str:
    """``scheme://host`` as the client addressed the gateway."""
    scheme, host = req.scheme, req.authority()
    if trusted.trusts(req.peer):
        forwarded = req.header("forwarded")
        params = _first_forwarded(forwarded) if forwarded else {}
        proto = params.get("proto") or _first(req.header("x-forwarded-proto"))
        if proto and proto.lower() in ("http", "https"):
            scheme = proto.lower()
        forwarded_host = params.get("host") or _first(req.header("x-forwarded-host"))
        if forwarded_host and _HOST.match(forwarded_host):
            host = forwarded_host
    return f"{scheme}://{host}"


def client_address(req: Request, trusted: TrustedProxies) -> str | None:
    """The client's address: the peer, or, when the peer is a trusted proxy,
    the nearest address in ``X-Forwarded-For``/``Forwarded: for=`` that is not
    itself a trusted proxy."""
    peer = req.peer
    if not trusted.trusts(peer):
        return peer
    chain: list[str] = []
    forwarded = req.header("forwarded")
    if forwarded:
        for element in forwarded.split(","):
            found = _first_forwarded(element).get("for")
            if found:
                chain.append(found.strip("[]"))
    else:
        xff = req.header("x-forwarded-for")
        if xff:
            chain = [item.strip() for item in xff.split(",") if item.strip()]
    for address in reversed(chain):
        if not trusted.trusts(address):
            return address
    return chain[0] if chain else peer
