"""The HTTP service end to end: the real uvicorn server on a free loopback port, over httpx.

Equivalence: every answer (timings and the echoed file name aside) equals the in-process
Localizer's and the CLI's (``geoloc query --json`` through typer's runner), including 50
concurrent requests that the micro-batcher groups.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (pip install -e '.[serve]') is not installed")
httpx = pytest.importorskip("httpx")

from citydata import TINY_CONFIG, write_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from geoloc.build import build_index  # noqa: E402
from geoloc.cli import app as cli_app  # noqa: E402
from geoloc.config import load_config  # noqa: E402
from geoloc.engine import Localizer  # noqa: E402
from geoloc.errors import ConfigError  # noqa: E402
from geoloc.bundle import INFO_KEYS
from geoloc.serve import (  # noqa: E402
    MicroBatcher,
    Overloaded,
    ServerThread,
    ServeSettings,
    bind_socket,
    create_app,
    run_server,
)

LIMIT = 64 * 1024
MODES = ("classify", "retrieve", "hybrid")


def strip(row: dict) -> dict:
    """An answer without the fields that legitimately differ: timings and the echoed name."""
    return {k: v for k, v in row.items() if k not in ("timings_ms", "image")}


def same(a, b) -> bool:
    """Equal answers: every field exact, except that floats may differ by 1e-6 (relative).

    Scores (cosines) move in the last bits with the batch an image is embedded in (1 here,
    4 in the CLI, up to max_batch in the server): CPU matmul kernels sum in a batch-dependent
    order. Everything else (match, cells, positions, ranks) must be identical.
    """
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=1e-6, abs=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_dataset(root / "ds", n_db=120, n_q=12)
    build_index(database=root / "ds", out=root / "idx", config=load_config(TINY_CONFIG), progress=False)
    return root


@pytest.fixture(scope="module")
def queries(built) -> list[Path]:
    return sorted((built / "ds" / "queries").iterdir())


@pytest.fixture(scope="module")
def loc(built):
    return Localizer.load(built / "idx")


@pytest.fixture(scope="module")
def reference(loc, queries) -> dict:
    """In-process answers per (mode, file name), JSON round-tripped as the server sends them."""
    out = {}
    for mode in MODES:
        for p in loc.localize([str(q) for q in queries], mode=mode):
            out[mode, Path(p.image).name] = strip(json.loads(json.dumps(p.to_json())))
    return out


@pytest.fixture(scope="module")
def server(loc):
    settings = ServeSettings(max_batch=8, max_wait_ms=20, max_queue=64, max_upload_bytes=LIMIT)
    with ServerThread(create_app(loc, settings=settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def test_health_ready_info(client, built):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    info = client.get("/v1/info").json()
    manifest = json.loads((built / "idx" / "manifest.json").read_text())
    assert set(info) == set(INFO_KEYS) and info == {k: manifest[k] for k in INFO_KEYS}


def test_single_upload_equals_cli_and_in_process(client, built, queries, reference):
    cli = CliRunner().invoke(cli_app, ["query", *map(str, queries[:4]), "--index", str(built / "idx"),
                                       "--mode", "hybrid", "--json"])
    assert cli.exit_code == 0, cli.output
    cli_rows = {Path(r["image"]).name: strip(r) for r in json.loads(cli.stdout)}
    assert len(cli_rows) == 4
    for q in queries[:4]:
        r = client.post("/v1/localize", params={"mode": "hybrid"},
                        files={"image": (q.name, q.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        row = r.json()
        assert row["image"] == q.name and {"decode", "backbone", "heads", "search"} <= set(row["timings_ms"])
        assert same(strip(row), cli_rows[q.name]) and same(strip(row), reference["hybrid", q.name])
        raw = client.post("/v1/localize", params={"mode": "hybrid", "name": q.name}, content=q.read_bytes(),
                          headers={"content-type": "image/jpeg"})
        assert raw.status_code == 200 and raw.json()["image"] == q.name and same(strip(raw.json()), strip(row))


def test_query_options_are_applied(client, queries, loc):
    q = queries[0]
    r = client.post("/v1/localize", params={"mode": "hybrid", "top_cells": 2, "neighbours": "true"},
                    files={"image": (q.name, q.read_bytes(), "image/jpeg")})
    want = loc.localize([str(q)], mode="hybrid", top_cells=2, neighbours=True)[0]
    assert r.status_code == 200 and same(strip(r.json()), strip(json.loads(json.dumps(want.to_json()))))
    assert len(r.json()["top_cells"]) == 2


def test_batch_keeps_order_and_reports_bad_files(client, queries, reference, loc, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = [("images", (queries[2].name, queries[2].read_bytes(), "image/jpeg")),
             ("images", (bad.name, bad.read_bytes(), "image/jpeg")),
             ("images", (queries[5].name, queries[5].read_bytes(), "image/jpeg"))]
    r = client.post("/v1/localize/batch", params={"mode": "retrieve"}, files=files)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [x["image"] for x in rows] == [queries[2].name, "broken.jpg", queries[5].name]
    assert same(strip(rows[0]), reference["retrieve", queries[2].name])
    assert same(strip(rows[2]), reference["retrieve", queries[5].name])
    problem = loc.localize([str(bad)])[0].problem  # the one-line reason the CLI prints
    assert rows[1] == {"image": "broken.jpg", "error": f"broken.jpg: {problem}"}


def test_fifty_concurrent_requests_equal_in_process_answers(server, queries, reference, client):
    def batches_so_far() -> tuple[float, float]:
        text = client.get("/metrics").text
        val = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("geoloc_batch_size_")}
        return val["geoloc_batch_size_count"], val["geoloc_batch_size_sum"]

    jobs = [(queries[i % len(queries)], MODES[i % 3]) for i in range(50)]
    count0, sum0 = batches_so_far()

    async def go() -> list:
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=httpx.Limits(max_connections=50)) as ac:
            return await asyncio.gather(*(ac.post("/v1/localize", params={"mode": m},
                                                  files={"image": (q.name, q.read_bytes(), "image/jpeg")})
                                          for q, m in jobs))

    answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [200] * 50
    for (q, m), a in zip(jobs, answers):
        assert a.json()["image"] == q.name and same(strip(a.json()), reference[m, q.name])
    count1, sum1 = batches_so_far()
    assert sum1 - sum0 == 50
    assert count1 - count0 < 50, "the micro-batcher never grouped concurrent requests"


def test_metrics_count_routes_and_statuses(client):
    client.get("/healthz")
    client.post("/v1/localize", params={"mode": "sideways"}, content=b"x", headers={"content-type": "image/jpeg"})
    text = client.get("/metrics").text
    assert 'geoloc_http_requests_total{route="/healthz",status="200"}' in text
    assert 'geoloc_http_requests_total{route="/v1/localize",status="422"}' in text
    assert "geoloc_http_request_duration_seconds_bucket" in text and "geoloc_queue_depth 0.0" in text
    assert "geoloc_ready 1.0" in text


@pytest.mark.parametrize("params, needle", [({"mode": "sideways"}, "unknown mode 'sideways'"),
                                            ({"top_cells": 0}, "top_cells must be at least 1")])
def test_bad_options_are_422(client, queries, params, needle):
    r = client.post("/v1/localize", params=params, files={"image": ("a.jpg", queries[0].read_bytes(), "image/jpeg")})
    assert r.status_code == 422 and needle in r.json()["detail"]


def test_not_an_image_is_415_or_422(client):
    r = client.post("/v1/localize", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = client.post("/v1/localize", files={"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = client.post("/v1/localize/batch", content=b"\xff\xd8", headers={"content-type": "image/jpeg"})
    assert r.status_code == 415
    r = client.post("/v1/localize", params={"name": "x.jpg"}, content=b"just some text, no pixels",
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["detail"] == "x.jpg: not an image: the file holds text"
    r = client.post("/v1/localize", files={"other": ("a.jpg", b"\xff\xd8", "image/jpeg")})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]


def test_oversized_uploads_are_413(client):
    big = b"\xff\xd8" + bytes(LIMIT)
    r = client.post("/v1/localize", content=big, headers={"content-type": "image/jpeg"})  # Content-Length
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(4):
            yield bytes(LIMIT // 2)

    r = client.post("/v1/localize", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413
    r = client.post("/v1/localize", files={"image": ("big.jpg", big, "image/jpeg")})  # multipart part
    assert r.status_code == 413 and "big.jpg" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


class GatedLocalizer:
    """A Localizer whose localize waits for a gate: holds the worker busy on demand."""

    def __init__(self, loc: Localizer) -> None:
        self.loc, self.bundle = loc, loc.bundle
        self.gate, self.entered = threading.Event(), threading.Event()

    def localize(self, paths, **kw):
        self.entered.set()
        assert self.gate.wait(30)
        return self.loc.localize(paths, **kw)


def test_overload_is_503_with_retry_after(loc, queries):
    slow = GatedLocalizer(loc)
    app = create_app(slow, settings=ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2, retry_after_s=3))
    body = queries[0].read_bytes()
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        post = lambda: c.post("/v1/localize", content=body, headers={"content-type": "image/jpeg"})  # noqa: E731
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(post())) for _ in range(3)]
        threads[0].start()
        assert slow.entered.wait(30)  # the worker holds request 1
        for t in threads[1:]:
            t.start()
        for _ in range(3000):  # requests 2 and 3 fill the queue
            if "geoloc_queue_depth 2.0" in c.get("/metrics").text:
                break
        r = post()
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "max_queue 2" in r.json()["detail"]
        slow.gate.set()
        for t in threads:
            t.join(30)
        assert [x.status_code for x in results] == [200, 200, 200]


def test_readyz_is_503_until_the_bundle_is_loaded(loc, queries):
    gate = threading.Event()

    def load():
        assert gate.wait(30)
        return loc

    with ServerThread(create_app(load)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"} and "retry-after" in r.headers
        r = c.post("/v1/localize", content=queries[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 503 and "still loading" in r.json()["detail"]
        assert c.get("/v1/info").status_code == 503
        gate.set()
        for _ in range(500):
            if c.get("/readyz").status_code == 200:
                break
        assert c.get("/readyz").status_code == 200 and c.get("/v1/info").status_code == 200


def test_failed_load_is_reported_by_readyz(tmp_path):
    from geoloc.errors import BundleError

    def load():
        raise BundleError(f"{tmp_path}: manifest.json checksum mismatch")

    with ServerThread(create_app(load)) as url, httpx.Client(base_url=url) as c:
        for _ in range(500):
            r = c.get("/readyz")
            if r.json()["status"] != "loading":
                break
        assert r.status_code == 503 and "checksum mismatch" in r.json()["detail"]


def test_settings_and_binding_are_validated(loc):
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        ServeSettings(max_batch=0)
    with ServerThread(create_app(loc)) as url:
        port = int(url.rsplit(":", 1)[1])
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            ServerThread(create_app(loc), port=port)


def test_listening_socket_gets_tcp_nodelay_connections():
    # asyncio sets TCP_NODELAY only on connections of IPPROTO_TCP sockets; with proto 0 every
    # response body waited ~40 ms (Nagle + delayed ACK) behind its headers.
    sock = bind_socket("127.0.0.1", 0)
    try:
        client = socket.create_connection(sock.getsockname()[:2])
        conn, _ = sock.accept()
        assert sock.proto == socket.IPPROTO_TCP and conn.proto == socket.IPPROTO_TCP
        conn.close()
        client.close()
    finally:
        sock.close()


def test_run_server_refuses_a_missing_bundle_before_binding(tmp_path):
    from geoloc.errors import BundleError

    with pytest.raises(BundleError, match="no such bundle folder"):
        run_server(index=tmp_path / "nope", port=0)


def test_run_server_refuses_a_bad_set_before_binding(built):
    with pytest.raises(ConfigError, match="nonsense"):
        run_server(index=built / "idx", port=0, sets=["query.nonsense=1"])


def test_batcher_groups_by_options_and_waits_only_for_requests_on_their_way():
    calls: list = []
    gate = threading.Event()

    def localize(paths, **kw):
        gate.wait(10)
        calls.append((list(paths), kw))
        if kw.get("mode") == "boom":
            raise RuntimeError("boom")
        return [f"{p}:{kw.get('mode')}" for p in paths]

    b = MicroBatcher(localize, max_batch=8, max_wait_ms=5000, max_queue=8)
    b.start()
    try:
        gate.set()
        t0 = time.monotonic()
        assert b.submit(["lone"], {})[0].result(10) == "lone:None"
        assert time.monotonic() - t0 < 2.5, "a lone request waited for max_wait_ms"
        gate.clear()
        hold = b.submit(["hold"], {"mode": "a"})  # the worker takes it and blocks on the gate
        while b.depth():
            time.sleep(0.001)
        futs = b.submit(["x", "y"], {"mode": "a"}) + b.submit(["z"], {"mode": "b"}) + b.submit(["w"], {"mode": "boom"})
        with pytest.raises(Overloaded, match="max_queue 8"):
            b.submit([str(i) for i in range(5)], {})  # 4 queued + 5 > 8: all or nothing
        assert b.depth() == 4
        gate.set()
        assert hold[0].result(10) == "hold:a" and [f.result(10) for f in futs[:3]] == ["x:a", "y:a", "z:b"]
        with pytest.raises(RuntimeError, match="boom"):
            futs[3].result(10)
        assert sorted(len(p) for p, _ in calls[-3:]) == [1, 1, 2]  # one localize call per option set
    finally:
        gate.set()
        b.stop()


def test_run_server_serves_in_its_own_process(built, queries, reference):
    """``geoloc serve`` in a real process: loopback, ready, answering as the CLI does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "geoloc", "serve", "--index", str(built / "idx"), "--port", str(port),
           "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(1200):
                assert proc.poll() is None, proc.stdout.read().decode()
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            q = queries[1]
            r = c.post("/v1/localize", params={"mode": "classify"}, files={"image": (q.name, q.read_bytes(), "image/jpeg")})
            assert r.status_code == 200 and same(strip(r.json()), reference["classify", q.name])
    finally:
        proc.terminate()
        proc.wait(30)
