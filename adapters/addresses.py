"""Address classification for the SSRF guard: which IP addresses are refused, and why.

Holds the blocked ranges, ``blocked_reason``, host normalisation and IPv4-literal parsing;
``adapters.safehttp`` resolves names, pins the checked address and makes the request.

Blocked: loopback, private (RFC 1918, ULA), link-local (169.254/16 incl. the cloud
metadata address, fe80::/10), cloud metadata addresses (169.254.169.254, 169.254.170.2,
fd00:ec2::254, 100.100.100.200, 168.63.129.16), shared (100.64/10), multicast,
unspecified (0.0.0.0, ::), "this network" (0/8), broadcast, reserved (240/4, IPv6 outside
2000::/3), site-local (fec0::/10), benchmarking, documentation and IETF ranges, and IPv6
forms that embed one of those: IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
``::a.b.c.d`` (deprecated; blocked even when the IPv4 is public), IPv4-translated
``::ffff:0:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``,
Teredo ``2001::/32``. The reason names the real category of the embedded address
("127.0.0.1 is loopback (embedded in ::7f00:1)").

Host spellings are normalised before anything is resolved, so every spelling of an address
is judged as that address: percent-encoding, Unicode full-width digits and dots, upper
case and trailing dots are undone; IPv4 literals are parsed as browsers and ``inet_aton``
do (decimal ``2130706433``, hex ``0x7f000001``, octal ``0177.0.0.1``, short ``127.1``,
``0x7f.1``); IPv6 zone ids (``[fe80::1%25eth0]``) are set aside for the check. A host whose
last label is numeric but is no valid IPv4 address is ``source_invalid``. ``localhost`` and
``*.localhost`` are loopback by definition (RFC 6761) and never reach the resolver. Literal
addresses are not resolved at all; names are resolved once and every answer is checked.
Networks in ``allow_networks`` are exempt, whatever the spelling of an address inside them.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from collections.abc import Sequence
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")

#: Cloud metadata services, named before their range so the reason says what they are.
_METADATA: dict[IPAddress, str] = {
    ipaddress.ip_address("169.254.169.254"): "cloud metadata (link-local)",
    ipaddress.ip_address("169.254.170.2"): "cloud metadata (AWS ECS credentials, link-local)",
    ipaddress.ip_address("fd00:ec2::254"): "cloud metadata (AWS IMDS over IPv6, unique-local)",
    ipaddress.ip_address("100.100.100.200"): "cloud metadata (Alibaba Cloud, shared range)",
    ipaddress.ip_address("168.63.129.16"): "cloud metadata (Azure WireServer)",
}

#: Special-purpose ranges (IANA registries), most specific first: the first match names the
#: category. Spelled out rather than taken from ``ipaddress`` flags, whose meaning changed
#: between Python releases (3.11 calls ``::7f00:1``, ``fec0::1`` and ``192.0.0.8`` global).
_CATEGORIES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), name)
    for cidr, name in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", '"this network" (0.0.0.0/8)'),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
        ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("198.18.0.0/15", "benchmarking"),
        ("192.88.99.0/24", "reserved (deprecated 6to4 relay anycast)"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated, private)"),
        ("fc00::/7", "unique-local (private)"),
        ("ff00::/8", "multicast"),
        ("::/96", "IPv4-compatible (deprecated, ::/96)"),
        ("::ffff:0:0:0/96", "IPv4-translated (::ffff:0:0:0/96)"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo (2001::/32)"),
        ("2001:2::/48", "benchmarking"),
        ("2001::/23", "IETF protocol assignments (2001::/23)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
    )
)


def _rfc6052(ip: ipaddress.IPv6Address, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address an RFC 6052 IPv4-embedded IPv6 address holds for a prefix length."""
    n = int(ip)

    def bits(start: int, length: int) -> int:
        return (n >> (128 - start - length)) & ((1 << length) - 1)

    if prefix == 96:
        return ipaddress.IPv4Address(bits(96, 32))
    if prefix == 64:
        return ipaddress.IPv4Address(bits(72, 32))
    if prefix == 56:
        return ipaddress.IPv4Address(bits(56, 8) << 24 | bits(72, 24))
    return ipaddress.IPv4Address(bits(48, 16) << 16 | bits(72, 16))  # /48


def _embedding(ip: ipaddress.IPv6Address) -> tuple[list[ipaddress.IPv4Address], bool] | None:
    """IPv4 addresses ``ip`` embeds, and whether ``ip`` is only another way to reach them.

    Transparent forms (mapped, 6to4, NAT64) are allowed when what they embed is public;
    the others (IPv4-compatible, IPv4-translated, Teredo) are then judged as IPv6.
    """
    n = int(ip)
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return [ip.ipv4_mapped], True
    if ip in _IPV4_TRANSLATED:  # ::ffff:0:a.b.c.d (SIIT)
        return [ipaddress.IPv4Address(n & 0xFFFFFFFF)], False
    if n >> 32 == 0 and n > 1:  # ::a.b.c.d, IPv4-compatible; not :: and ::1 themselves
        return [ipaddress.IPv4Address(n)], False
    if ip.sixtofour is not None:  # 2002:aabb:ccdd::/48
        return [ip.sixtofour], True
    if ip in _NAT64:  # 64:ff9b::a.b.c.d
        return [_rfc6052(ip, 96)], True
    if ip in _NAT64_LOCAL:  # the operator picks the prefix length: check every one
        return [_rfc6052(ip, length) for length in (96, 64, 56, 48)], True
    if ip.teredo is not None:  # (server, client), the client de-obfuscated
        server, client = ip.teredo
        return [client, server], False
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    embedded = _embedding(ip)
    return embedded[0][0] if embedded else None


def address_reason(ip: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    if any(ip in net for net in allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedding(ip)
        if embedded is not None:
            inner, transparent = embedded
            for v4 in inner:
                reason = address_reason(v4, allow)
                if reason:
                    return f"{reason} (embedded in {ip})"
            if transparent:
                return None
    label = _METADATA.get(ip) or next((name for net, name in _CATEGORIES if ip in net), None)
    if label is None and ip.version == 6 and ip not in _GLOBAL_UNICAST:
        label = "reserved (outside global unicast 2000::/3)"
    if label is None and not ip.is_global:
        label = "not a public address"
    return f"{ip} is {label}" if label else None


# --- host spellings -------------------------------------------------------------------

_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_HEX = frozenset(string.hexdigits)
_OCT = frozenset(string.octdigits)
_DEC = frozenset(string.digits)
_ZONE = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
HOST_NAME = re.compile(
    r"^[a-z0-9_\-\u0080-\U0010ffff]{1,63}(\.[a-z0-9_\-\u0080-\U0010ffff]{1,63})*$"
)


def normalize_host(host: str) -> str:
    """A URL host as it is judged: percent-decoded, NFKC, lower case, without trailing dots.

    Raises ValueError (UnicodeDecodeError) on bad percent-encoding.
    """
    text = unquote(host, errors="strict").translate(_DOTS)
    text = unicodedata.normalize("NFKC", text).translate(_DOTS).lower()
    return text if ":" in text else text.rstrip(".")


def _ipv4_number(part: str) -> int | None:
    """One part of an IPv4 literal as browsers and inet_aton read it: 0x hex, 0 octal, decimal."""
    if part[:2] == "0x":
        digits, base, allowed = part[2:], 16, _HEX
        if not digits:
            return 0
    elif len(part) > 1 and part[0] == "0":
        digits, base, allowed = part[1:], 8, _OCT
    else:
        digits, base, allowed = part, 10, _DEC
    if not digits or not set(digits) <= allowed:  # int() alone takes "1_0" and Unicode digits
        return None
    return int(digits, base)


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as an IPv4 literal in any spelling, None when it is a name.

    A host whose last label is numeric is an IPv4 literal or nothing (the WHATWG URL rule):
    ValueError when it does not parse, so ``1.2.3.4.5`` or ``256.0.0.1`` never reach DNS.
    """
    parts = host.lower().split(".")
    last = parts[-1]
    if not last or not (set(last) <= _DEC or _ipv4_number(last) is not None):
        return None
    numbers = [_ipv4_number(p) if p else None for p in parts]
    if len(parts) > 4 or None in numbers:
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise ValueError(f"{host!r} is out of range for an IPv4 address")
    value = values[-1] + sum(n << (8 * (3 - i)) for i, n in enumerate(values[:-1]))
    return ipaddress.IPv4Address(value)


def ip_literal(host: str) -> tuple[IPAddress, str] | None:
    """(address, IPv6 zone id or "") when the normalised ``host`` is an IP literal, else None.

    Raises ValueError when it looks like one (a colon, a numeric last label) but is not.
    """
    if ":" in host:
        address, _, zone = host.partition("%")
        if zone and not _ZONE.match(zone):
            raise ValueError(f"bad IPv6 zone id in {host!r}")
        return ipaddress.IPv6Address(address), zone
    ipv4 = parse_ipv4(host)
    return (ipv4, "") if ipv4 is not None else None


def blocked_reason(address: str, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is allowed.

    ``address`` is an IP address in any spelling (``0x7f.1``, ``::ffff:7f00:1``,
    ``fe80::1%eth0``); ValueError when it is not an address.
    """
    literal = ip_literal(normalize_host(address))
    if literal is None:
        raise ValueError(f"{address!r} is not an IP address")
    return address_reason(literal[0], allow)


def is_localhost(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]
