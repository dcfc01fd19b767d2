"""The SSRF guard for webhook targets: which URLs genq may call, checked at submit (the URL as
written) and again at send time (every address its host resolves to, right before connecting).

The sender connects to the very address that was checked, so a DNS answer that changes between
the check and the connection (DNS rebinding) cannot redirect a delivery to a private address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Named here even where `is_global` already excludes them, so a reader sees the policy.
BLOCKED_NETWORKS = [ipaddress.ip_network(net) for net in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",    # carrier-grade NAT
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, includes the cloud metadata address 169.254.169.254
    "224.0.0.0/4",      # multicast
    "::1/128", "::/128",
    "fc00::/7",         # unique local
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated, still routed inside some networks)
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): never global, wherever the IPv4 sits
    "ff00::/8",         # multicast
    "fd00:ec2::254/128",  # AWS metadata over IPv6 (inside fc00::/7, named for the reader)
)]
# Forms that carry an IPv4 address in their last 32 bits; the embedded address is checked too.
EMBEDDING_NETWORKS = [ipaddress.ip_network(net) for net in (
    "::/96",            # IPv4-compatible (deprecated): ::127.0.0.1
    "::ffff:0:0/96",    # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT): ::ffff:0:7f00:1
    "64:ff9b::/96",     # well-known NAT64
)]
# ISATAP interface identifiers (…:0:5efe:a.b.c.d, …:200:5efe:a.b.c.d) under any prefix.
_ISATAP_MARKERS = (0x00005EFE, 0x02005EFE)
# What inet_aton accepts besides dotted quads: 2130706433, 0x7f.1, 0177.0.0.1, 127.1.
# For local development; named in the refusal so a newcomer finds it.
ALLOW_PRIVATE_HINT = "set GENQ_WEBHOOK_ALLOW_PRIVATE=true to allow private targets"
_IPV4_SHORTHAND = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.I)


class WebhookUrlError(ValueError):
    """The URL is malformed or points at an address webhooks may not call."""


@dataclass(frozen=True)
class WebhookTarget:
    """A URL split into what the sender needs: connect to `address`, say `host` in Host/SNI."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    address: str = ""

    @property
    def host_header(self) -> str:
        default_port = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"


def is_forbidden(address: IPAddress) -> bool:
    """True for any address that is not a public unicast one, directly or embedded."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(is_forbidden(embedded) for embedded in _embedded_ipv4(address)):
            return True
        if address.teredo and any(is_forbidden(part) for part in address.teredo):
            return True
    return (any(address in net for net in BLOCKED_NETWORKS if net.version == address.version)
            or not address.is_global or address.is_multicast)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address that this IPv6 address may carry to an IPv4 host."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    embedded = [part for part in (address.sixtofour,) if part is not None]
    if (any(address in net for net in EMBEDDING_NETWORKS)
            or (int(address) >> 32) & 0xFFFFFFFF in _ISATAP_MARKERS):
        embedded.append(low32)
    return embedded


def parse_webhook_url(url: str, allow_private: bool) -> WebhookTarget:
    """Check a URL as written (scheme, shape, literal addresses); no DNS lookup.

    A host name is resolved and checked at send time only (`resolve`): its address may change.
    """
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError("only http and https URLs are allowed")
    if not parts.hostname:
        raise WebhookUrlError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("credentials in the URL are not allowed")
    host = parts.hostname
    literal = literal_address(host)
    if literal is not None:
        host = str(literal)
        if not allow_private and is_forbidden(literal):
            raise WebhookUrlError(f"{parts.hostname} is a private or reserved address "
                                  f"({ALLOW_PRIVATE_HINT})")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookTarget(parts.scheme, host, port or (443 if parts.scheme == "https" else 80),
                         path)


def literal_address(host: str) -> IPAddress | None:
    """The address a host literally is, including the shorthand forms inet_aton accepts."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_SHORTHAND.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise WebhookUrlError(f"{host} is not a valid address") from None
    return None


def resolve(url: str, allow_private: bool) -> WebhookTarget:
    """Check the URL, resolve its host and return the target with the address to connect to.

    Every resolved address must pass: a name with one public and one private record is refused.
    """
    target = parse_webhook_url(url, allow_private)
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookUrlError(f"cannot resolve {target.host}: {exc.strerror}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not allow_private:
        # The message names no address: a tenant must not learn the internal network's layout.
        if any(is_forbidden(address) for address in addresses):
            raise WebhookUrlError(f"{target.host} resolves to a private or reserved address "
                                  f"({ALLOW_PRIVATE_HINT})")
    return WebhookTarget(target.scheme, target.host, target.port, target.path,
                         str(addresses[0]))
