"""Outbound HTTP to untrusted URLs, with an SSRF guard.

Every hop (the URL and each redirect) is resolved once; if *any* address the name
resolves to is not a public unicast address, the request is refused before a connection
is made (``source_blocked``). The connection then goes to the address that was checked
(pinned), with the original name in ``Host`` and in TLS SNI / certificate checks, so a DNS
answer that changes between check and connect cannot redirect it. Redirects are followed
by hand, re-validated and capped. Bodies are read under a byte cap and a total time cap.

Which addresses are refused, and how every spelling of a host is normalised and judged,
is in ``adapters.addresses`` (``blocked_reason``); a name is resolved here once and every
answer it gives is checked there.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import urllib3

from adapters.addresses import (
    HOST_NAME,
    IPNetwork,
    address_reason,
    blocked_reason,
    ip_literal,
    is_localhost,
    normalize_host,
    parse_networks,
)
from worker.errors import SourceError

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Target:
    """A validated URL and the address it will be fetched from."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str


def _blocked(subject: str, reason: str) -> SourceError:
    return SourceError(
        f"{subject}: {reason}; refused (WORKER_HTTP__ALLOW_NETWORKS exempts trusted networks)",
        code="source_blocked",
    )


def _addresses(host: str, hostname: str, port: int, allow: Sequence[IPNetwork]) -> list[str]:
    """The checked addresses for the normalised ``host`` (SourceError when any is blocked)."""
    try:
        literal = ip_literal(host)
    except ValueError as exc:
        raise SourceError(f"bad host {hostname!r}: {exc}", code="source_invalid") from None
    if literal is not None:
        ip, zone = literal
        reason = address_reason(ip, allow)
        if reason:
            raise _blocked(hostname if hostname == str(ip) else f"{hostname} is {ip}", reason)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return [str(ip.ipv4_mapped)]  # the same socket address, reachable without IPv6
        return [f"{ip}%{zone}" if zone else str(ip)]
    if is_localhost(host):  # RFC 6761: loopback by definition, never asked of DNS
        loopback = ["127.0.0.1", "::1"]
        allowed = [a for a in loopback if address_reason(ipaddress.ip_address(a), allow) is None]
        if not allowed:
            reason = address_reason(ipaddress.ip_address(loopback[0]), allow) or "loopback"
            raise _blocked(f"{hostname} is loopback by definition (RFC 6761)", reason)
        return allowed
    if not HOST_NAME.match(host):
        raise SourceError(f"bad host {hostname!r}", code="source_invalid")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceError(f"cannot resolve {hostname}: {exc}", code="source_not_found") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        try:
            reason = blocked_reason(address, allow)
        except ValueError:
            reason = "not an IP address"
        if reason:
            raise _blocked(f"{hostname} resolves to {address}", reason)
    if not addresses:
        raise SourceError(f"cannot resolve {hostname}: no addresses", code="source_not_found")
    return addresses


def resolve_target(url: str, allow: Sequence[IPNetwork]) -> Target:
    """Validate ``url`` and resolve it to one checked address (SourceError otherwise)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:
        raise SourceError(f"bad URL {url!r}: {exc}", code="source_invalid") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise SourceError(f"only http and https URLs can be fetched: {url}", code="source_invalid")
    if parts.username is not None or parts.password is not None:
        raise SourceError("URLs with credentials are not fetched", code="source_invalid")
    if not hostname:
        raise SourceError(f"URL has no host: {url}", code="source_invalid")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise SourceError(f"bad port in {url}", code="source_invalid") from None
    try:
        host = normalize_host(hostname)
    except ValueError:
        raise SourceError(f"bad host {hostname!r}", code="source_invalid") from None
    if not host:
        raise SourceError(f"URL has no host: {url}", code="source_invalid")
    addresses = _addresses(host, hostname, port, allow)
    try:  # the name sent in Host and SNI: the IP without its zone, or the IDNA name
        literal = ip_literal(host)
        sent_host = str(literal[0]) if literal else host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise SourceError(f"bad host {hostname!r}", code="source_invalid") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, sent_host, port, path, addresses[0])


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    hops: list[str] = field(default_factory=list)


def _pool(target: Target, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            timeout=timeout,
            retries=False,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
        )
    return urllib3.HTTPConnectionPool(target.address, target.port, timeout=timeout, retries=False)


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


@dataclass(frozen=True)
class HttpLimits:
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    max_bytes: int
    allow: tuple[IPNetwork, ...] = ()
    user_agent: str = "moderation-worker"


def _read_capped(
    resp: urllib3.BaseHTTPResponse, limits: HttpLimits, deadline: float, url: str
) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise SourceError(
            f"{url} is {declared} bytes, over the cap of {limits.max_bytes} "
            "(WORKER_IMAGE__MAX_BYTES)",
            code="image_too_large",
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise SourceError(
                f"{url} took longer than {limits.total_timeout_s:g} s "
                "(WORKER_HTTP__TOTAL_TIMEOUT_S)",
                code="source_timeout",
            )
        chunk = resp.read1(65536)  # returns as soon as some bytes arrive: the deadline holds
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limits.max_bytes:
            raise SourceError(
                f"{url} sent more than {limits.max_bytes} bytes (WORKER_IMAGE__MAX_BYTES)",
                code="image_too_large",
            )
        chunks.append(chunk)


def request(
    method: str,
    url: str,
    limits: HttpLimits,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    follow_redirects: bool = True,
) -> Response:
    """One guarded request. Network failures are SourceError with a stable code."""
    deadline = time.monotonic() + limits.total_timeout_s
    hops: list[str] = []
    current = url
    for _ in range(limits.max_redirects + 1):
        target = resolve_target(current, limits.allow)
        remaining = max(deadline - time.monotonic(), 0.001)
        timeout = urllib3.Timeout(
            connect=min(limits.connect_timeout_s, remaining),
            read=min(limits.read_timeout_s, remaining),
        )
        sent = {"Host": _host_header(target), "User-Agent": limits.user_agent, **(headers or {})}
        pool = _pool(target, timeout)
        try:
            resp = pool.urlopen(
                method,
                target.path,
                body=body,
                headers=sent,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
            location = resp.headers.get("Location")
            if follow_redirects and resp.status in REDIRECT_CODES and location:
                resp.drain_conn()
                hops.append(current)
                current = urljoin(current, location)
                if resp.status == 303:
                    method, body = "GET", None
                continue
            data = _read_capped(resp, limits, deadline, url)
            return Response(resp.status, dict(resp.headers), data, current, hops)
        except urllib3.exceptions.NewConnectionError as exc:  # refused, unreachable (urllib3
            # 2.x derives it from ConnectTimeoutError, so it must come before timeouts)
            raise SourceError(f"{url}: cannot connect ({exc})", code="source_unavailable") from None
        except urllib3.exceptions.TimeoutError as exc:
            raise SourceError(f"{url}: timed out ({exc})", code="source_timeout") from None
        except urllib3.exceptions.SSLError as exc:
            raise SourceError(f"{url}: TLS failed ({exc})", code="source_unavailable") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SourceError(f"{url}: {exc}", code="source_unavailable") from None
        finally:
            pool.close()
    raise SourceError(
        f"{url}: more than {limits.max_redirects} redirects (WORKER_HTTP__MAX_REDIRECTS)",
        code="source_invalid",
    )


def limits_from(
    settings: object, max_bytes: int, total_timeout_s: float | None = None
) -> HttpLimits:
    """HttpLimits from ``Settings.http`` (typed loosely: plugins import this alone)."""
    http = settings.http  # type: ignore[attr-defined]
    return HttpLimits(
        connect_timeout_s=http.connect_timeout_s,
        read_timeout_s=http.read_timeout_s,
        total_timeout_s=total_timeout_s or http.total_timeout_s,
        max_redirects=http.max_redirects,
        max_bytes=max_bytes,
        allow=tuple(parse_networks(http.allow_networks)),
        user_agent=http.user_agent,
    )
