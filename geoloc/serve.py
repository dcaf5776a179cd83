"""``geoloc serve``: the localiser behind an HTTP API (FastAPI + uvicorn), micro-batched.

Routes (docs/architecture.md, "HTTP service")::

    POST /v1/localize         one image: multipart field ``image``, or the raw bytes with
                              ``Content-Type: image/*`` (or application/octet-stream);
                              query parameters mode, top_cells, neighbours (and name, for raw
                              bytes). Answers ``Prediction.to_json()``: the object that
                              ``geoloc query --json`` prints for that image, with ``image`` set
                              to the upload's file name.
    POST /v1/localize/batch   several multipart file parts (field ``images`` or ``image``);
                              answers a list in upload order: the prediction object, or
                              ``{"image": name, "error": "<one line>"}`` for an undecodable file.
    GET  /healthz             the process is alive (200 even while the bundle loads).
    GET  /readyz              200 once the bundle is loaded and verified; 503 before (or if
                              loading failed, with the one-line reason).
    GET  /v1/info             the manifest summary that ``geoloc info`` prints.
    GET  /metrics             Prometheus text: requests by route and status, latency
                              histograms, micro-batch sizes, queue depth.

Every upload is streamed to a temporary regular file (deleted after the answer) and localised
by path through :meth:`geoloc.engine.Localizer.localize`, the CLI's own decoding path, so the
answers equal the CLI's (timings aside).

Micro-batching: request handlers put their images on a bounded queue; one worker thread takes
up to ``max_batch`` of them, waiting at most ``max_wait_ms`` after the first for requests still
uploading (none are: no wait), and calls ``localize`` once per batch (once per distinct query
option set within the batch). When
``max_queue`` images are already waiting, a request is answered 503 with ``Retry-After``
instead of queueing without bound.

Status codes: 413 upload over ``max_upload_bytes`` (checked while streaming, and up front from
Content-Length), 415 not an image content type, 422 undecodable image (geoloc's one-line
reason) or invalid query option, 400 malformed multipart body, 503 overloaded or not ready.
"""

# No `from __future__ import annotations` here: FastAPI resolves the route signatures, whose
# types (Request) are imported inside create_app.
import asyncio
import concurrent.futures
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from geoloc.errors import ConfigError, GeolocError, ImageError

if TYPE_CHECKING:  # the serve extra is optional: import fastapi only where it is used
    from fastapi import FastAPI

    from geoloc.config import Config
    from geoloc.engine import Localizer

log = logging.getLogger("geoloc.serve")

_ROUTES = ("/v1/localize", "/v1/localize/batch", "/healthz", "/readyz", "/v1/info", "/metrics")
_FORM_FIELDS_MAX = 64 * 1024
"""Bytes of non-file multipart content (headers, boundaries, text fields) allowed per file."""


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """Micro-batching and request limits of the service."""

    max_batch: int = 16
    """Most images per ``localize`` call."""
    max_wait_ms: float = 5.0
    """Longest wait, after the first image of a batch arrives, for requests still uploading."""
    max_queue: int = 64
    """Most images waiting for the worker; beyond it requests get 503 with Retry-After."""
    max_upload_bytes: int = 20 * 1024 * 1024
    """Largest image upload, per file."""
    max_batch_files: int = 32
    """Most files in one ``/v1/localize/batch`` request."""
    retry_after_s: int = 1
    """Retry-After (seconds) sent with 503 answers."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_upload_bytes", "max_batch_files", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"serve setting {name} must be at least 1, got {getattr(self, name)!r}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"serve setting max_wait_ms must be 0 or more, got {self.max_wait_ms!r}")


# -- micro-batching -----------------------------------------------------------------------------
class Overloaded(Exception):
    """The queue is full (or the batcher is stopping): answer 503."""


@dataclass
class _Job:
    path: str
    options: tuple[tuple[str, Any], ...]
    future: concurrent.futures.Future


class MicroBatcher:
    """One worker thread that answers queued images in batches of at most ``max_batch``.

    The worker takes every queued image (up to ``max_batch``); while requests are still
    uploading (:meth:`incoming`) it waits up to ``max_wait_ms`` for them to join the batch.

    ``localize(paths, **options) -> list[Prediction | ImageError]`` is called once per batch and
    option set; each job's future gets its own item (or the exception the call raised).
    """

    def __init__(self, localize: Callable[..., list], *, max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._localize = localize
        self.max_batch, self.max_wait_s, self.max_queue = int(max_batch), float(max_wait_ms) / 1e3, int(max_queue)
        self._on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._incoming = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="geoloc-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        """Images waiting (not yet taken by the worker)."""
        return len(self._jobs)

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (uploading) for the duration of the block.

        The worker waits for more images (up to ``max_wait_ms``) only while some request is on
        its way: a lone request is answered at once instead of paying the wait.
        """
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    def submit(self, paths: Sequence[str], options: dict[str, Any]) -> list[concurrent.futures.Future]:
        """Queue ``paths`` (all or none); one future per path. Raises :class:`Overloaded`."""
        key = tuple(sorted(options.items()))
        jobs = [_Job(str(p), key, concurrent.futures.Future()) for p in paths]
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise Overloaded(f"{len(self._jobs)} images already queued (max_queue {self.max_queue})")
            self._jobs.extend(jobs)
            self._cond.notify()
        return [j.future for j in jobs]

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, fail the queued jobs with :class:`Overloaded`, join."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            while self._jobs:
                self._jobs.popleft().future.set_exception(Overloaded("the server is shutting down"))

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._jobs) < self.max_batch and self._incoming > 0 and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.options, []).append(job)
            for key, jobs in groups.items():
                t0 = time.perf_counter()
                try:
                    results = self._localize([j.path for j in jobs], **dict(key))
                    if len(results) != len(jobs):
                        raise RuntimeError(f"localize answered {len(results)} items for {len(jobs)} images")
                except BaseException as exc:  # noqa: BLE001 - hand every failure to its requests
                    if not isinstance(exc, GeolocError):
                        log.exception("localize failed on a batch of %d images", len(jobs))
                    for j in jobs:
                        j.future.set_exception(exc)
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(jobs), time.perf_counter() - t0)
                for j, r in zip(jobs, results):
                    j.future.set_result(r)


# -- metrics ------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self, depth: Callable[[], float], ready: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("geoloc_http_requests_total", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.latency = Histogram("geoloc_http_request_duration_seconds", "HTTP request latency by route.", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.batch_size = Histogram("geoloc_batch_size", "Images per localize call of the micro-batcher.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("geoloc_batch_duration_seconds", "Seconds per localize call.",
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.images = Counter("geoloc_images_total", "Images answered, by outcome.", ["outcome"], registry=r)
        Gauge("geoloc_queue_depth", "Images waiting for the micro-batch worker.", registry=r).set_function(depth)
        Gauge("geoloc_ready", "1 once the bundle is loaded and verified.", registry=r).set_function(ready)

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)


class _MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route (known routes, else "other")."""

    def __init__(self, app, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")
        route = route if route in _ROUTES else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status["code"])).inc()


# -- uploads ------------------------------------------------------------------------------------
class _HTTPFail(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


@dataclass
class _Upload:
    name: str
    path: str
    size: int = 0


def _is_image_type(content_type: str) -> bool:
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct.startswith("image/") or ct == "application/octet-stream"


def _tmpfile(tmpdir: str, name: str) -> tuple[int, str]:
    suffix = Path(name).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix or "") else ".img"
    return tempfile.mkstemp(dir=tmpdir, prefix="upload-", suffix=suffix)


def _too_large(what: str, limit: int) -> _HTTPFail:
    return _HTTPFail(413, f"{what} is larger than the limit of {limit} bytes (max_upload_bytes); send a smaller image")


async def _read_raw(request, *, name: str, limit: int, tmpdir: str) -> list[_Upload]:
    fd, path = _tmpfile(tmpdir, name)
    up = _Upload(name, path)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                up.size += len(chunk)
                if up.size > limit:
                    raise _too_large(f"upload {name!r}", limit)
                f.write(chunk)
    except BaseException:
        _remove([up])
        raise
    return [up]


async def _read_multipart(request, *, fields: tuple[str, ...], max_files: int, limit: int,
                          tmpdir: str) -> list[_Upload]:
    """Stream a multipart body: file parts named in ``fields`` go straight to temporary files,
    each refused (413) as soon as it passes ``limit`` bytes."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(request.headers.get("content-type", ""))
    if b"boundary" not in params:
        raise _HTTPFail(400, "multipart body without a boundary in its Content-Type")
    ups: list[_Upload] = []
    st: dict[str, Any] = {"headers": {}, "hname": b"", "hval": b"", "file": None, "up": None, "other": 0, "end": False}
    total_other_limit = _FORM_FIELDS_MAX * max(1, max_files)

    def on_part_begin() -> None:
        st["headers"], st["file"], st["up"] = {}, None, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        st["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        st["hval"] += data[start:end]

    def on_header_end() -> None:
        st["headers"][st["hname"].decode("latin-1").lower()] = st["hval"].decode("latin-1")
        st["hname"], st["hval"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(st["headers"].get("content-disposition", ""))
        field = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in opts or field not in fields:
            return  # a text field or another file field: skipped (its bytes are still counted)
        fname = opts[b"filename"].decode("utf-8", "replace") or f"upload-{len(ups)}"
        ctype = st["headers"].get("content-type", "application/octet-stream")
        if not _is_image_type(ctype):
            raise _HTTPFail(415, f"part {fname!r} has Content-Type {ctype!r}; send image/* (or application/octet-stream)")
        if len(ups) >= max_files:
            raise _HTTPFail(413, f"more than {max_files} files in one request (max_batch_files); split the batch")
        fd, path = _tmpfile(tmpdir, fname)
        ups.append(_Upload(fname, path))
        st["up"], st["file"] = ups[-1], os.fdopen(fd, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if st["file"] is None:
            st["other"] += end - start
            if st["other"] > total_other_limit:
                raise _HTTPFail(413, f"non-image form content over {total_other_limit} bytes")
            return
        up = st["up"]
        up.size += end - start
        if up.size > limit:
            raise _too_large(f"upload {up.name!r}", limit)
        st["file"].write(data[start:end])

    def on_part_end() -> None:
        if st["file"] is not None:
            st["file"].close()
            st["file"] = None

    def on_end() -> None:
        st["end"] = True

    callbacks = dict(on_part_begin=on_part_begin, on_part_data=on_part_data, on_part_end=on_part_end,
                     on_header_field=on_header_field, on_header_value=on_header_value, on_header_end=on_header_end,
                     on_headers_finished=on_headers_finished, on_end=on_end)
    parser = MultipartParser(params[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except MultipartParseError as err:
                raise _HTTPFail(400, f"malformed multipart body ({' '.join(str(err).split())})") from None
        if not st["end"]:
            raise _HTTPFail(400, "multipart body ended before its closing boundary")
    except BaseException:
        if st["file"] is not None:
            st["file"].close()
        _remove(ups)
        raise
    return ups


def _remove(ups: Sequence[_Upload]) -> None:
    for up in ups:
        with suppress(OSError):
            os.unlink(up.path)


# -- the app ------------------------------------------------------------------------------------
LocalizerSource = Union["Localizer", Callable[[], "Localizer"]]


class _Service:
    """What the routes share: the localiser (once loaded), the batcher, metrics, temp folder."""

    def __init__(self, source: LocalizerSource, settings: ServeSettings) -> None:
        self.settings = settings
        self.localizer: Localizer | None = None
        self.loader: Callable[[], Localizer] | None = None
        if callable(source) and not hasattr(source, "localize"):
            self.loader = source
        else:
            self.localizer = source
        self.error: str | None = None
        self.tmpdir: str | None = None
        self.metrics = _Metrics(depth=lambda: self.batcher.depth(), ready=lambda: float(self.ready))
        self.batcher = MicroBatcher(self._localize, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                    max_queue=settings.max_queue, on_batch=self.metrics.on_batch)

    @property
    def ready(self) -> bool:
        return self.localizer is not None

    def _localize(self, paths: list[str], **options) -> list:
        return self.localizer.localize(paths, **options)

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            loc = self.loader()
        except GeolocError as err:
            self.error = str(err)
            log.error("cannot load the bundle: %s", err)
            return
        except Exception as err:  # noqa: BLE001 - reported by /readyz and the log
            self.error = f"{type(err).__name__}: {' '.join(str(err).split())}"
            log.exception("cannot load the bundle")
            return
        self.localizer = loc
        log.info("bundle %s loaded and verified in %.1f s; ready", loc.bundle.path, time.perf_counter() - t0)

    def start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="geoloc-serve-")
        self.batcher.start()
        if self.loader is not None:
            threading.Thread(target=self._load, name="geoloc-loader", daemon=True).start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def require_ready(self) -> "Localizer":
        if self.localizer is None:
            why = f"bundle failed to load: {self.error}" if self.error else "the bundle is still loading; retry shortly"
            raise _HTTPFail(503, why, {"Retry-After": str(self.settings.retry_after_s)})
        return self.localizer

    def options(self, mode: str | None, top_cells: int | None, neighbours: bool | None) -> dict[str, Any]:
        from geoloc.engine import MODES

        if mode is not None and mode not in MODES:
            raise _HTTPFail(422, f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if top_cells is not None and top_cells < 1:
            raise _HTTPFail(422, f"top_cells must be at least 1, got {top_cells}")
        return {k: v for k, v in (("mode", mode), ("top_cells", top_cells), ("neighbours", neighbours)) if v is not None}

    async def receive(self, request, *, batch: bool, name: str | None) -> list[_Upload]:
        s = self.settings
        ctype = request.headers.get("content-type", "")
        multipart = ctype.split(";", 1)[0].strip().lower() == "multipart/form-data"
        files = min(s.max_batch_files, s.max_queue) if batch else 1  # a bigger batch could never be queued
        body_limit = s.max_upload_bytes if not multipart else files * (s.max_upload_bytes + _FORM_FIELDS_MAX)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > body_limit:
            raise _too_large("request body" if multipart else "upload", body_limit)
        if multipart:
            ups = await _read_multipart(request, fields=("images", "image") if batch else ("image",),
                                        max_files=files, limit=s.max_upload_bytes, tmpdir=self.tmpdir)
            if not ups:
                raise _HTTPFail(422, "no image in the form: send the file in a multipart field named "
                                     + ("'images'" if batch else "'image'"))
            return ups
        if batch:
            raise _HTTPFail(415, f"Content-Type {ctype or 'none'!r}: /v1/localize/batch takes multipart/form-data "
                                 "with one file part per image")
        if not _is_image_type(ctype):
            raise _HTTPFail(415, f"Content-Type {ctype or 'none'!r} is not an image; send multipart/form-data with "
                                 "a file field 'image', or the raw bytes as image/*")
        return await _read_raw(request, name=name or "upload", limit=s.max_upload_bytes, tmpdir=self.tmpdir)

    async def localize(self, request, *, batch: bool, name: str | None, options: dict[str, Any]) -> list[dict]:
        """Receive the request's images, queue them, await the micro-batcher: one row per image."""
        with self.batcher.incoming():
            ups = await self.receive(request, batch=batch, name=name)
            try:
                futures = self.batcher.submit([u.path for u in ups], options)
            except Overloaded as err:
                _remove(ups)
                raise _HTTPFail(503, f"overloaded: {err}; retry later",
                                {"Retry-After": str(self.settings.retry_after_s)}) from None
        try:
            try:
                results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            except Overloaded as err:
                raise _HTTPFail(503, str(err), {"Retry-After": str(self.settings.retry_after_s)}) from None
            except ConfigError as err:
                raise _HTTPFail(422, str(err)) from None
        finally:
            _remove(ups)
        out = []
        for up, r in zip(ups, results):
            if isinstance(r, ImageError):
                self.metrics.images.labels("error").inc()
                out.append({"image": up.name, "error": f"{up.name}: {r.problem}"})
            else:
                self.metrics.images.labels("ok").inc()
                row = r.to_json()
                row["image"] = up.name
                out.append(row)
        return out


def create_app(localizer: LocalizerSource, *, settings: ServeSettings | None = None) -> "FastAPI":
    """The FastAPI application serving ``localizer``.

    ``localizer``: a loaded :class:`~geoloc.engine.Localizer`, or a zero-argument callable that
    loads one; the callable runs in a background thread at startup, and ``/readyz`` (and the
    localize routes) answer 503 until it returns.
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    svc = _Service(localizer, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app):
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="geoloc", summary="Where was this street photo taken?", lifespan=lifespan)
    app.state.service = svc

    def fail(err: _HTTPFail) -> JSONResponse:
        return JSONResponse({"detail": err.detail}, status_code=err.status, headers=err.headers)

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """200 once the bundle is loaded and verified, else 503."""
        if svc.ready:
            return {"status": "ready", "index": str(svc.localizer.bundle.path)}
        body = {"status": "failed", "detail": svc.error} if svc.error else {"status": "loading"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(svc.settings.retry_after_s)})

    @app.get("/v1/info")
    async def info():
        """The bundle's manifest summary (as ``geoloc info`` prints it)."""
        try:
            loc = svc.require_ready()
        except _HTTPFail as err:
            return fail(err)
        from geoloc.bundle import manifest_summary

        return manifest_summary(loc.bundle.manifest)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/localize")
    async def localize(request: Request,
                       mode: str | None = Query(None, description="classify | retrieve | hybrid"),
                       top_cells: int | None = Query(None, description="Hybrid: cells to search."),
                       neighbours: bool | None = Query(None, description="Hybrid: also search neighbour cells."),
                       name: str | None = Query(None, description="Name echoed as `image` for raw uploads.")):
        """One image -> the prediction object of ``geoloc query --json``."""
        try:
            svc.require_ready()
            opts = svc.options(mode, top_cells, neighbours)
            row = (await svc.localize(request, batch=False, name=name, options=opts))[0]
        except _HTTPFail as err:
            return fail(err)
        if "error" in row:
            return JSONResponse({"detail": row["error"]}, status_code=422)
        return JSONResponse(row)

    @app.post("/v1/localize/batch")
    async def localize_batch(request: Request,
                             mode: str | None = Query(None, description="classify | retrieve | hybrid"),
                             top_cells: int | None = Query(None, description="Hybrid: cells to search."),
                             neighbours: bool | None = Query(None, description="Hybrid: also search neighbours.")):
        """Several images (multipart field ``images``) -> one answer per file, in order."""
        try:
            svc.require_ready()
            opts = svc.options(mode, top_cells, neighbours)
            rows = await svc.localize(request, batch=True, name=None, options=opts)
        except _HTTPFail as err:
            return fail(err)
        return JSONResponse(rows)

    app.add_middleware(_MetricsMiddleware, metrics=svc.metrics)
    return app


# -- running ------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port). Raises ConfigError."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} does not resolve ({err.strerror}); use an address such as 127.0.0.1") from None
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets' connections,
    # and without it Nagle's algorithm holds each response body ~40 ms behind its headers.
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop the "
                          "process that holds it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, *, log_level: str):
    import uvicorn

    cfg = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", lifespan="on",
                         timeout_graceful_shutdown=10)
    return uvicorn.Server(cfg)


class ServerThread:
    """The real uvicorn server in a background thread, on an already bound socket (for tests,
    benchmarks, notebooks). ``with ServerThread(app) as url: ...``."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        h, p = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
        self.server = _uvicorn_server(app, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the uvicorn server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def run_server(*, index: Path, host: str = "127.0.0.1", port: int = 8000, config: "Config | None" = None,
               max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 64,
               max_upload_bytes: int = 20 * 1024 * 1024, log_level: str = "info", threads: int | None = None,
               sets: Sequence[str] = ()) -> None:
    """Serve the bundle at ``index`` over HTTP until interrupted (Ctrl-C / SIGTERM).

    The bundle's manifest is read before binding (a wrong path fails at once with a
    :class:`~geoloc.errors.GeolocError`); the full load and checksum verification run in the
    background while ``/healthz`` already answers, and ``/readyz`` turns 200 when they finish.
    Binds to loopback unless ``host`` says otherwise.

    ``config`` replaces the bundle's query-time options (as ``Localizer.load``); ``sets``
    (``section.key=value``) are applied on top of the bundle's config, as ``geoloc query --set``.

    ``threads``: torch intra-op threads for the backbone (default: all cores but one, at least
    one). The event loop needs a core of its own: with every core in torch's OpenMP pool, the
    pool's spin-waiting threads and the loop fight for the CPU and a batch can take 10-100x
    longer (measured on 2 cores: 2.6 ms -> 200+ ms per image).
    """
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        from geoloc.errors import DependencyError

        raise DependencyError(f"`geoloc serve` needs the serve extra ({err.name} is not installed); install it with "
                              "pip install -e \".[serve]\" in the checkout, or pip install \"geoloc[serve]\"") from None
    from geoloc.bundle import read_manifest
    from geoloc.config import Config
    from geoloc.engine import Localizer

    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ConfigError(f"unknown log level {log_level!r}; choose critical, error, warning, info, debug or trace")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    index = Path(index)
    read_manifest(index)  # fail fast on a wrong path or a foreign folder
    sets = list(sets)
    Config().override(sets)  # fail fast on a bad --set
    import torch

    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_upload_bytes=max_upload_bytes)
    def load() -> Localizer:
        loc = Localizer.load(index, config=config)
        loc.config.override(sets)
        return loc

    app = create_app(load, settings=settings)
    sock = bind_socket(host, port)
    logging.basicConfig(level=log_level.upper() if log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    h, p = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service has no authentication; expose it only behind a proxy you trust", h)
    log.info("serving %s at http://%s:%d (max_batch %d, max_wait_ms %g, max_queue %d, %d torch threads); "
             "loading the bundle...", index, h, p, max_batch, max_wait_ms, max_queue, threads)
    try:
        _uvicorn_server(app, log_level=log_level).run(sockets=[sock])
    finally:
        sock.close()
