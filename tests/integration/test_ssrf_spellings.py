"""Every spelling of a forbidden address is refused the same way, before any connection.

Each URL goes through the real ``HttpSource.fetch`` → ``safehttp.request`` path while TCP
listeners on 127.0.0.1 and ::1 (the same port number on both) count the connections they
accept: it must stay zero. Two guards keep the test on loopback even if the SSRF guard
regressed: urllib3's ``create_connection`` refuses any address that is not loopback, and
``socket.getaddrinfo`` answers numeric hosts only, so no DNS query leaves the machine.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import urllib3.util.connection

from adapters.addresses import blocked_reason, parse_networks
from adapters.http import HttpSource
from worker.errors import SourceError
from worker.plugins import PluginContext
from worker.settings import Settings

pytestmark = [pytest.mark.fault, pytest.mark.integration]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


class CountingServer:
    """A TCP listener on a loopback address that counts the connections it accepts.

    With ``answer`` it reads one request head and writes ``answer(head)`` back.
    """

    def __init__(
        self, host: str, port: int = 0, answer: Callable[[bytes], bytes] | None = None
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(64)
        self.sock.settimeout(0.02)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.answer = answer
        self.connections = 0
        self.heads: list[bytes] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                if self.answer is None:
                    continue
                conn.settimeout(1.0)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.heads.append(head)
                    conn.sendall(self.answer(head))
                except OSError:
                    pass

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self._stop.set()
        self.thread.join(1)
        self.sock.close()


@dataclass
class Traffic:
    """What left the guard: connection attempts (urllib3) and name lookups."""

    connects: list[tuple[str, int]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    #: Fake DNS answers for names (tests only; nothing is ever asked of a real resolver).
    names: dict[str, list[str]] = field(default_factory=dict)


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Traffic:
    seen = Traffic()
    real_connect = urllib3.util.connection.create_connection
    real_getaddrinfo = socket.getaddrinfo

    def connect(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.connects.append(address)
        if not _is_loopback(address[0]):  # never send a packet off this machine
            raise AssertionError(f"the guard let a connection to {address} through")
        return real_connect(address, *args, **kwargs)

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        seen.lookups.append(str(host))
        if isinstance(host, str) and host in seen.names:
            return [
                (
                    socket.AF_INET6 if ":" in a else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (a, port, 0, 0) if ":" in a else (a, port),
                )
                for a in seen.names[host]
            ]
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.fixture
def listeners() -> Iterator[tuple[CountingServer, CountingServer]]:
    """Listeners on 127.0.0.1:P and [::1]:P — the same P, so every spelling can aim at it."""
    for _ in range(50):
        v4 = CountingServer("127.0.0.1", answer=lambda head: OK)
        try:
            v6 = CountingServer("::1", v4.port, answer=lambda head: OK)
        except OSError as exc:
            v4.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        break
    else:
        pytest.fail("no port free on both 127.0.0.1 and ::1")
    yield v4, v6
    v4.close()
    v6.close()


def source(**http: Any) -> HttpSource:
    settings = Settings(http={"total_timeout_s": 2, "read_timeout_s": 1, **http})
    return HttpSource(PluginContext(settings=settings, service=True))


#: (host as written in the URL, what the refusal must say).
SPELLINGS: list[tuple[str, str]] = [
    # 127.0.0.1 in every IPv4 spelling
    ("127.0.0.1", "127.0.0.1 is loopback"),
    ("127.0.0.2", "127.0.0.2 is loopback"),
    ("2130706433", "127.0.0.1 is loopback"),  # decimal
    ("0x7f000001", "127.0.0.1 is loopback"),  # hex
    ("0X7F000001", "127.0.0.1 is loopback"),
    ("017700000001", "127.0.0.1 is loopback"),  # octal, one number
    ("0177.0.0.1", "127.0.0.1 is loopback"),  # octal
    ("0177.0000.0000.0001", "127.0.0.1 is loopback"),
    ("127.000.000.001", "127.0.0.1 is loopback"),
    ("0x7f.0.0.1", "127.0.0.1 is loopback"),
    ("0x7f.1", "127.0.0.1 is loopback"),  # hex, short
    ("127.1", "127.0.0.1 is loopback"),  # short
    ("127.0.1", "127.0.0.1 is loopback"),
    ("127.0.0.1.", "127.0.0.1 is loopback"),  # trailing dot
    ("%31%32%37.0.0.1", "127.0.0.1 is loopback"),  # percent-encoded
    ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1 is loopback"),  # full-width digits
    ("127\u30020\u30020\u30021", "127.0.0.1 is loopback"),  # ideographic full stops
    # names that are loopback by definition (never asked of DNS)
    ("localhost", "loopback"),
    ("LOCALHOST", "loopback"),
    ("localhost.", "loopback"),
    ("LocalHost..", "loopback"),
    ("images.localhost", "loopback"),
    # unspecified: connecting to it reaches this host
    ("0.0.0.0", "0.0.0.0 is unspecified"),
    ("0", "0.0.0.0 is unspecified"),
    ("0x0", "0.0.0.0 is unspecified"),
    ("[::]", ":: is unspecified"),
    ("[::ffff:0.0.0.0]", "0.0.0.0 is unspecified (embedded in ::ffff:0:0)"),
    # IPv6 loopback
    ("[::1]", "::1 is loopback"),
    ("[0:0:0:0:0:0:0:1]", "::1 is loopback"),
    ("[0000::0001]", "::1 is loopback"),
    ("[::1%25lo]", "::1 is loopback"),  # with a zone id
    # IPv4 embedded in IPv6: mapped, compatible, translated, NAT64, 6to4, Teredo
    ("[::127.0.0.1]", "127.0.0.1 is loopback (embedded in ::7f00:1)"),
    ("[::7f00:1]", "127.0.0.1 is loopback (embedded in ::7f00:1)"),
    ("[::ffff:127.0.0.1]", "127.0.0.1 is loopback (embedded in ::ffff:"),
    ("[::ffff:7f00:1]", "127.0.0.1 is loopback (embedded in ::ffff:"),
    ("[0:0:0:0:0:ffff:7f00:1]", "127.0.0.1 is loopback (embedded in ::ffff:"),
    ("[::FFFF:7F00:1]", "127.0.0.1 is loopback (embedded in ::ffff:"),
    ("[::ffff:0:127.0.0.1]", "127.0.0.1 is loopback (embedded in ::ffff:0:7f00:1)"),
    ("[64:ff9b::127.0.0.1]", "127.0.0.1 is loopback (embedded in 64:ff9b::7f00:1)"),
    ("[64:ff9b:1::7f00:1]", "127.0.0.1 is loopback (embedded in 64:ff9b:1::7f00:1)"),
    ("[2002:7f00:1::1]", "127.0.0.1 is loopback (embedded in 2002:7f00:1::1)"),
    ("[2002:7f00:0001::]", "127.0.0.1 is loopback (embedded in 2002:7f00:1::)"),
    ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "127.0.0.1 is loopback (embedded in 2001:0:"),
    ("[::2]", '0.0.0.2 is "this network"'),
    # cloud metadata, every spelling
    ("169.254.169.254", "169.254.169.254 is cloud metadata"),
    ("2852039166", "169.254.169.254 is cloud metadata"),
    ("0xa9fea9fe", "169.254.169.254 is cloud metadata"),
    ("0251.0376.0251.0376", "169.254.169.254 is cloud metadata"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254 is cloud metadata"),
    ("169.254.43518", "169.254.169.254 is cloud metadata"),
    ("[::ffff:169.254.169.254]", "169.254.169.254 is cloud metadata (link-local) (embedded in"),
    ("[::a9fe:a9fe]", "169.254.169.254 is cloud metadata (link-local) (embedded in ::a9fe:a9fe)"),
    ("[64:ff9b::a9fe:a9fe]", "169.254.169.254 is cloud metadata (link-local) (embedded in 64:"),
    ("[2002:a9fe:a9fe::]", "169.254.169.254 is cloud metadata (link-local) (embedded in 2002:"),
    ("[fd00:ec2::254]", "fd00:ec2::254 is cloud metadata"),
    ("[FD00:EC2:0:0:0:0:0:254]", "fd00:ec2::254 is cloud metadata"),
    ("169.254.170.2", "169.254.170.2 is cloud metadata"),
    ("100.100.100.200", "100.100.100.200 is cloud metadata"),
    ("168.63.129.16", "168.63.129.16 is cloud metadata"),
    # link-local, zone ids
    ("[fe80::1%25eth0]", "fe80::1 is link-local"),
    ("[fe80::1%eth0]", "fe80::1 is link-local"),
    ("[fe80::1]", "fe80::1 is link-local"),
    ("169.254.0.1", "169.254.0.1 is link-local"),
    # private, shared, multicast, reserved, documentation
    ("10.0.0.1", "10.0.0.1 is private"),
    ("012.0.0.1", "10.0.0.1 is private"),  # octal
    ("167772161", "10.0.0.1 is private"),  # decimal
    ("[::ffff:10.0.0.1]", "10.0.0.1 is private (RFC 1918) (embedded in ::ffff:"),
    ("172.16.0.1", "172.16.0.1 is private"),
    ("0xc0a80101", "192.168.1.1 is private"),
    ("[fd12:3456::1]", "fd12:3456::1 is unique-local"),
    ("[fec0::1]", "fec0::1 is site-local"),
    ("100.64.0.1", "100.64.0.1 is shared address space"),
    ("224.0.0.1", "224.0.0.1 is multicast"),
    ("[ff02::1]", "ff02::1 is multicast"),
    ("255.255.255.255", "255.255.255.255 is broadcast"),
    ("240.0.0.1", "240.0.0.1 is reserved"),
    ("192.0.0.8", "192.0.0.8 is IETF protocol assignments"),
    ("192.0.2.1", "192.0.2.1 is documentation"),
    ("[2001:db8::1]", "2001:db8::1 is documentation"),
    ("[::8.8.8.8]", "::808:808 is IPv4-compatible"),  # deprecated form, even of a public one
    ("[5f00::1]", "5f00::1 is reserved"),
]


def test_every_spelling_is_blocked_without_a_connection(
    listeners: tuple[CountingServer, CountingServer], traffic: Traffic
) -> None:
    v4, v6 = listeners
    guarded = source()
    assert len(SPELLINGS) >= 30
    for host, expected in SPELLINGS:
        url = f"http://{host}:{v4.port}/latest/meta-data/"
        started = time.monotonic()
        with pytest.raises(SourceError) as info:
            guarded.fetch(url)
        assert info.value.code == "source_blocked", (host, str(info.value))
        assert expected in str(info.value), (host, str(info.value))
        assert time.monotonic() - started < 0.5, host
    assert traffic.connects == []
    assert traffic.lookups == []  # literals and localhost never reach the resolver
    time.sleep(0.05)  # a connection that slipped through would be accepted by now
    assert (v4.connections, v6.connections) == (0, 0)


def test_names_resolving_to_forbidden_addresses(
    listeners: tuple[CountingServer, CountingServer], traffic: Traffic
) -> None:
    v4, v6 = listeners
    traffic.names.update(
        {
            "rebind.example": ["8.8.8.8", "127.0.0.1"],  # one bad answer refuses them all
            "mapped.example": ["::ffff:127.0.0.1"],
            "compat.example": ["::127.0.0.1"],
            "scoped.example": ["fe80::1%1"],
            "metadata.example": ["169.254.169.254"],
            "v6.example": ["::1"],
        }
    )
    expected = {
        "rebind.example": "resolves to 127.0.0.1: 127.0.0.1 is loopback",
        "mapped.example": "127.0.0.1 is loopback (embedded in ::ffff:",
        "compat.example": "127.0.0.1 is loopback (embedded in ::7f00:1)",
        "scoped.example": "fe80::1 is link-local",
        "metadata.example": "169.254.169.254 is cloud metadata",
        "v6.example": "::1 is loopback",
    }
    guarded = source()
    for name, reason in expected.items():
        for spelled in (name, name.upper(), name + "."):
            with pytest.raises(SourceError) as info:
                guarded.fetch(f"http://{spelled}:{v4.port}/")
            assert info.value.code == "source_blocked", (spelled, str(info.value))
            assert reason in str(info.value), (spelled, str(info.value))
    assert set(traffic.lookups) == set(expected)  # normalised before the lookup
    assert traffic.connects == []
    assert (v4.connections, v6.connections) == (0, 0)


def test_redirects_to_other_spellings_are_refused(
    listeners: tuple[CountingServer, CountingServer], traffic: Traffic
) -> None:
    v4, v6 = listeners
    p = v4.port
    hops = [
        f"http://0x7f.1:{p}/secret",
        f"http://[::ffff:7f00:1]:{p}/secret",
        f"http://[::127.0.0.1]:{p}/secret",
        f"http://localhost.:{p}/secret",
        f"http://[::1]:{p}/secret",
        "http://0xa9fea9fe/latest/meta-data/",
        f"http://[fe80::1%25eth0]:{p}/",
    ]
    queue = list(hops)

    def redirect(head: bytes) -> bytes:
        location = queue.pop(0)
        return (
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        ).encode()

    redirector = CountingServer("127.0.0.2", answer=redirect)
    try:
        guarded = source(allow_networks=["127.0.0.2/32"])
        for hop in hops:
            with pytest.raises(SourceError) as info:
                guarded.fetch(redirector.url("/img.png"))
            assert info.value.code == "source_blocked", (hop, str(info.value))
        assert redirector.connections == len(hops)  # the allowed hop itself was fetched
        assert {host for host, _ in traffic.connects} == {"127.0.0.2"}
        assert (v4.connections, v6.connections) == (0, 0)
    finally:
        redirector.close()


def test_allowlisted_network_works_for_its_exact_range_only(
    listeners: tuple[CountingServer, CountingServer], traffic: Traffic
) -> None:
    v4, v6 = listeners
    p = v4.port
    only_one = source(allow_networks=["127.0.0.1/32"])
    # Any spelling of the allowed address is that address: fetched, pinned to 127.0.0.1.
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]", "localhost"):
        assert only_one.fetch(f"http://{host}:{p}/a.png") == b"hello", host
    assert v4.connections == 6
    assert {host for host, _ in traffic.connects} == {"127.0.0.1"}
    assert b"Host: 127.0.0.1:" in v4.heads[1]  # the canonical address, not the spelling
    assert b"Host: localhost:" in v4.heads[-1]
    # Its neighbours, other families and the deprecated compatible form stay blocked.
    for host, reason in (
        ("127.0.0.2", "127.0.0.2 is loopback"),
        ("127.0.0.0", "127.0.0.0 is loopback"),
        ("0x7f000002", "127.0.0.2 is loopback"),
        ("[::1]", "::1 is loopback"),
        ("[::127.0.0.1]", "::7f00:1 is IPv4-compatible"),
        ("10.0.0.1", "10.0.0.1 is private"),
        ("169.254.169.254", "cloud metadata"),
    ):
        with pytest.raises(SourceError) as info:
            only_one.fetch(f"http://{host}:{p}/a.png")
        assert info.value.code == "source_blocked", host
        assert reason in str(info.value), (host, str(info.value))
    assert v4.connections == 6
    assert v6.connections == 0

    only_v6 = source(allow_networks=["::1/128"])
    assert only_v6.fetch(f"http://[::1]:{p}/") == b"hello"
    assert only_v6.fetch(f"http://localhost:{p}/") == b"hello"  # the allowed loopback: ::1
    assert v6.connections == 2
    for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::2]"):
        with pytest.raises(SourceError) as info:
            only_v6.fetch(f"http://{host}:{p}/")
        assert info.value.code == "source_blocked", host
    assert v4.connections == 6


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::7f00:1", "127.0.0.1 is loopback (embedded in ::7f00:1)"),
        ("::127.0.0.1", "127.0.0.1 is loopback (embedded in ::7f00:1)"),
        ("::ffff:7f00:1", "127.0.0.1 is loopback (embedded in ::ffff:7f00:1)"),
        ("::ffff:0:7f00:1", "127.0.0.1 is loopback (embedded in ::ffff:0:7f00:1)"),
        ("64:ff9b::7f00:1", "127.0.0.1 is loopback (embedded in 64:ff9b::7f00:1)"),
        ("2002:7f00:1::", "127.0.0.1 is loopback (embedded in 2002:7f00:1::)"),
        ("::a9fe:a9fe", "169.254.169.254 is cloud metadata (link-local) (embedded in ::a9fe:a9fe)"),
        ("::a00:1", "10.0.0.1 is private (RFC 1918) (embedded in ::a00:1)"),
        ("::2", '0.0.0.2 is "this network" (0.0.0.0/8) (embedded in ::2)'),
        ("2130706433", "127.0.0.1 is loopback"),
        ("0x7f.1", "127.0.0.1 is loopback"),
        ("0177.0.0.1", "127.0.0.1 is loopback"),
        ("127.1", "127.0.0.1 is loopback"),
        ("::1", "::1 is loopback"),
        ("::", ":: is unspecified"),
        ("0.0.0.0", "0.0.0.0 is unspecified"),
        ("fe80::1%eth0", "fe80::1 is link-local"),
        ("fe80::1%25eth0", "fe80::1 is link-local"),
        ("169.254.169.254", "169.254.169.254 is cloud metadata (link-local)"),
        ("169.254.1.1", "169.254.1.1 is link-local (cloud metadata lives here)"),
        ("fd00:ec2::254", "fd00:ec2::254 is cloud metadata (AWS IMDS over IPv6, unique-local)"),
        ("fd00::1", "fd00::1 is unique-local (private)"),
        ("fec0::1", "fec0::1 is site-local (deprecated, private)"),
        ("100.64.0.1", "100.64.0.1 is shared address space (carrier-grade NAT)"),
        ("::808:808", "::808:808 is IPv4-compatible (deprecated, ::/96)"),
        ("5f00::1", "5f00::1 is reserved (outside global unicast 2000::/3)"),
        ("2001:db8::1", "2001:db8::1 is documentation"),
        ("255.255.255.255", "255.255.255.255 is broadcast"),
    ],
)
def test_blocked_reason_names_the_real_category(address: str, reason: str) -> None:
    assert blocked_reason(address) == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808", "2606:4700::1111"],
)
def test_blocked_reason_passes_public_addresses(address: str) -> None:
    assert blocked_reason(address) is None


def test_blocked_reason_is_the_same_for_every_spelling() -> None:
    loopback = ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1"]
    assert {blocked_reason(s) for s in loopback} == {"127.0.0.1 is loopback"}
    embedded = ["::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1", "::FFFF:7F00:1"]
    assert {blocked_reason(s) for s in embedded} == {
        "127.0.0.1 is loopback (embedded in ::ffff:7f00:1)"
    }
    allow = parse_networks(["127.0.0.1/32"])
    assert {blocked_reason(s, allow) for s in [*loopback, *embedded]} == {None}
    assert blocked_reason("::7f00:1", allow) == "::7f00:1 is IPv4-compatible (deprecated, ::/96)"
    assert blocked_reason("127.0.0.2", allow) == "127.0.0.2 is loopback"


@pytest.mark.parametrize("address", ["example.com", "256.0.0.1", "1.2.3.4.5", "0x1g.1", "::g"])
def test_blocked_reason_refuses_what_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError, match=r"address|permitted"):
        blocked_reason(address)


@pytest.mark.parametrize(
    "host", ["256.0.0.1", "1.2.3.4.5", "0x1g.0.0.1", "127.0.0.1%20x", "a..b", "[fe80::1%25a%25b]"]
)
def test_malformed_hosts_are_invalid_not_resolved(host: str, traffic: Traffic) -> None:
    with pytest.raises(SourceError) as info:
        source().fetch(f"http://{host}/")
    assert info.value.code == "source_invalid", str(info.value)
    assert traffic.lookups == []
    assert traffic.connects == []
