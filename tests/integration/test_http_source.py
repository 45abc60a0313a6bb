"""The http(s) source against real servers on loopback: SSRF guard, caps, timeouts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from adapters.http import HttpSource
from tests.helpers import image_bytes, shape_image
from tests.integration.servers import HttpServer, Route, endless_body, slow_drip
from worker.documents import ImageRef
from worker.engine import Engine, WorkItem
from worker.errors import SourceError
from worker.model import LoadedModel
from worker.plugins import PluginContext
from worker.runtime import build_engine
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def target() -> Iterator[HttpServer]:
    """The server an attacker wants reached, on 127.0.0.1; it must never see a request."""
    server = HttpServer("127.0.0.1", default=(200, {}, image_bytes(shape_image("circle", "red"))))
    yield server
    server.close()


@pytest.fixture
def target6() -> Iterator[HttpServer]:
    server = HttpServer("::1")
    yield server
    server.close()


def source(make_settings: Callable[..., Settings], **http: Any) -> HttpSource:
    settings = make_settings(http={"total_timeout_s": 3, "read_timeout_s": 2, **http})
    return HttpSource(PluginContext(settings=settings, service=True))


def test_ssrf_table_is_blocked_without_a_connection(
    make_settings: Callable[..., Settings], target: HttpServer, target6: HttpServer
) -> None:
    p, p6 = target.port, target6.port
    redirector = HttpServer("127.0.0.2", default=(302, {"Location": target.url("/secret")}, b""))
    urls = [
        f"http://127.0.0.1:{p}/",
        f"http://localhost:{p}/",  # a name that resolves to loopback
        f"http://[::1]:{p6}/",
        f"http://0.0.0.0:{p}/",
        f"http://2130706433:{p}/",  # decimal 127.0.0.1
        f"http://0177.0.0.1:{p}/",  # octal
        f"http://0x7f.0.0.1:{p}/",  # hex
        f"http://127.1:{p}/",  # short form
        f"http://[::ffff:127.0.0.1]:{p}/",  # IPv4-mapped IPv6
        f"http://[2002:7f00:1::1]:{p}/",  # 6to4 wrapping 127.0.0.1
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fd00:ec2::254]/latest/meta-data/",  # AWS IPv6 metadata
        "http://100.64.0.1/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
    ]
    guarded = source(make_settings)
    for url in urls:
        started = time.monotonic()
        with pytest.raises(SourceError) as info:
            guarded.fetch(url)
        assert info.value.code == "source_blocked", (url, info.value)
        assert time.monotonic() - started < 1.0, url  # refused before any connect attempt
    # A redirect from an allowed host to a blocked one is re-validated and refused.
    via_redirect = source(make_settings, allow_networks=["127.0.0.2/32"])
    with pytest.raises(SourceError) as info:
        via_redirect.fetch(redirector.url("/img.png"))
    assert info.value.code == "source_blocked"
    assert len(redirector.requests) == 1  # the allowed hop was fetched
    assert target.requests == []
    assert target6.requests == []
    redirector.close()


def test_allowlisted_network_is_fetched(
    make_settings: Callable[..., Settings], target: HttpServer
) -> None:
    data = source(make_settings, allow_networks=["127.0.0.0/8"]).fetch(target.url("/cat.png"))
    assert Image.open(__import__("io").BytesIO(data)).size == (96, 96)
    assert target.requests[0].headers["Host"] == f"127.0.0.1:{target.port}"


def test_redirects_are_capped(make_settings: Callable[..., Settings]) -> None:
    loop = HttpServer("127.0.0.1")
    loop.default = (302, {"Location": loop.url("/again")}, b"")
    with pytest.raises(SourceError) as info:
        source(make_settings, allow_networks=["127.0.0.0/8"], max_redirects=2).fetch(loop.url("/"))
    assert info.value.code == "source_invalid"
    assert len(loop.requests) == 3
    loop.close()


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, "source_not_found"),
        (403, "source_denied"),
        (503, "source_unavailable"),
        (400, "source_invalid"),
    ],
)
def test_http_status_codes(make_settings: Callable[..., Settings], status: int, code: str) -> None:
    server = HttpServer("127.0.0.1", default=(status, {}, b"no"))
    with pytest.raises(SourceError) as info:
        source(make_settings, allow_networks=["127.0.0.1/32"]).fetch(server.url())
    assert info.value.code == code
    server.close()


@pytest.fixture
def engine(make_settings: Callable[..., Settings], tiny_model: LoadedModel) -> Iterator[Engine]:
    settings = make_settings(
        http={"allow_networks": ["127.0.0.1/32"], "total_timeout_s": 3, "read_timeout_s": 1},
        image={"max_bytes": 25 * 1024 * 1024, "max_pixels": 64_000_000},
    )
    eng = build_engine(settings, model=tiny_model, service=True)
    yield eng
    eng.close()


def test_hostile_images_are_errors_and_the_batch_survives(engine: Engine) -> None:
    big = Image.new("1", (20000, 20000))  # 400 megapixels, a tiny PNG
    big_png = image_bytes(big, "PNG")
    sent: list[int] = []
    routes: dict[str, Route] = {
        "/bomb.png": (200, {"Content-Type": "image/png"}, big_png),
        "/claims-100mb.png": (200, {"Content-Length": str(100 * 1024 * 1024)}, b""),
        "/streams-100mb.png": endless_body(sent=sent),  # 100 MB without a Content-Length
        "/slow.png": slow_drip(total=10_000, interval=0.2),
        "/good.png": (
            200,
            {"Content-Type": "image/png"},
            image_bytes(shape_image("square", "blue")),
        ),
    }
    server = HttpServer("127.0.0.1", routes=routes)
    paths = list(routes)
    items = [WorkItem(f"j{i}", ImageRef(uri=server.url(p))) for i, p in enumerate(paths)]
    started = time.monotonic()
    results = {r.job_id: r for r in engine.process(items)}
    elapsed = time.monotonic() - started
    codes = [r.error.code if r.error else "ok" for r in (results[f"j{i}"] for i in range(5))]
    assert codes == [
        "image_too_large",
        "image_too_large",
        "image_too_large",
        "source_timeout",
        "ok",
    ]
    assert len(big_png) < 1_000_000
    assert sum(sent) < 40 * 1024 * 1024  # stopped reading near the 25 MiB cap, not at 100 MB
    assert elapsed < 3 + 1 + 2  # total cap + one read timeout + slack
    server.close()


def test_queue_worker_stays_up_on_hostile_urls(
    tmp_path: Any, queue_env: dict[str, str], start_worker: Callable[..., Any]
) -> None:
    import json

    from tests.helpers import wait_until
    from tests.processes import run_python

    routes: dict[str, Route] = {
        "/bomb.png": (200, {}, image_bytes(Image.new("1", (20000, 20000)), "PNG")),
        "/claims-100mb.png": (200, {"Content-Length": str(100 * 1024 * 1024)}, b""),
        "/slow.png": slow_drip(total=10_000, interval=0.2),
        "/good.png": (200, {}, image_bytes(shape_image("square", "blue"))),
    }
    server = HttpServer("127.0.0.1", routes=routes)
    env = {
        "WORKER_HTTP__ALLOW_NETWORKS": '["127.0.0.1/32"]',
        "WORKER_HTTP__TOTAL_TIMEOUT_S": "2",
        "WORKER_HTTP__READ_TIMEOUT_S": "1",
    }
    worker = start_worker(env=env)
    out = tmp_path / "out"
    jobs = [
        {
            "job_id": p.strip("/").split(".")[0],
            "image": {"uri": server.url(p)},
            "sinks": [{"type": "local", "path": str(out)}],
        }
        for p in [*routes, "/good.png"]
    ]
    jobs[-1]["job_id"] = "good-again"
    code = "from worker.client import submit\n" + "\n".join(f"submit({j!r})" for j in jobs)
    assert run_python(code, {**queue_env, **env}).returncode == 0
    wait_until(lambda: len(list(out.glob("*.json"))) == 5, 90, "five results")
    codes = {
        p.stem: (json.loads(p.read_text()).get("error") or {}).get("code", "ok")
        for p in out.glob("*.json")
    }
    assert codes == {
        "bomb": "image_too_large",
        "claims-100mb": "image_too_large",
        "slow": "source_timeout",  # retried (transient), then given up with this code
        "good": "ok",
        "good-again": "ok",
    }
    assert worker.proc.poll() is None  # still up
    assert len(worker.events("job.retry_scheduled")) == 2  # slow.png: attempts 1 and 2 of 3
    assert worker.stop() == 0
    server.close()
