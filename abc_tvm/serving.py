"""`abc-tvm serve`: compiled models over the Open Inference Protocol (KServe v2 REST).

The protocol is the one Triton, KServe and Seldon clients already speak, so they work
unchanged: health, server and model metadata, readiness, infer with JSON tensors and with
Triton's binary-tensor extension (`Inference-Header-Content-Length`), gzip/deflate request
bodies, and Triton's `/config` and `/v2/repository/index` for its tooling. Prometheus
`/metrics` counts requests and errors and keeps a latency histogram per model.

Why it is built this way:
- Inference runs in a thread pool (TVM releases the GIL), one Relax VM per call from the
  model's pool, so the event loop keeps accepting and parsing while kernels run.
- Every client mistake is an `ApiError`: a 4xx with `{"error": "..."}` naming the problem,
  logged at most as an access-log line, never as a crash.
- Models compiled with batch B > 1 get dynamic batching: concurrent requests of 1..B rows
  are merged (zero-padded) into one call, which is how such a model earns its keep.
- The bearer token is compared in constant time and guards every route but health, which
  orchestrators probe without credentials.
- A connection gets a deadline for each request head (`ServeOptions.read_timeout_s`,
  default min(10 s, --timeout)), so slowloris clients are closed instead of held for ever,
  and a JSON request may be only as large as the model's inputs can need, so a JSON bomb
  cannot stall the event loop for seconds (benchmarks/soak_server.py found both).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from abc_tvm import __version__
from abc_tvm.errors import UserError
from abc_tvm.runtime import CompiledModel, TensorInfo, load, usable_cpus
from abc_tvm.serving_args import (
    DEFAULT_BATCH_DELAY_MS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TIMEOUT_S,
)

log = logging.getLogger("abc_tvm.serving")

MODEL_VERSION = "1"
PLATFORM = "abc-tvm"
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
# numpy dtype name -> Open Inference Protocol datatype
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8",
             "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
             "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL"}
# A connection's deadline for each request head when ServeOptions.read_timeout_s is None.
DEFAULT_READ_TIMEOUT_S = 10.0
# What a JSON request may need beyond its numbers (id, parameters, outputs), and per number
# (a float's repr is at most 24 characters; indented JSON adds a newline and an indent).
JSON_SLACK_BYTES = 64 << 10
JSON_BYTES_PER_NUMBER = 64
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ServeOptions:
    """Server behaviour beyond the models themselves (the CLI flags of the same names)."""

    token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    batching: bool = True
    max_batch_delay_ms: float = DEFAULT_BATCH_DELAY_MS
    allow_nonfinite: bool = False
    workers: int | None = None
    read_timeout_s: float | None = None  # None: min(DEFAULT_READ_TIMEOUT_S, timeout_s)
    max_connections: int | None = None  # uvicorn's limit_concurrency: beyond it, 503

    @property
    def read_deadline_s(self) -> float:
        """Seconds a connection gets to deliver each request head (see _DeadlineH11)."""
        if self.read_timeout_s is not None:
            return self.read_timeout_s
        return min(DEFAULT_READ_TIMEOUT_S, self.timeout_s)


class ApiError(Exception):
    """A request the server refuses: HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj), status, headers=headers, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


class Metrics:
    """Prometheus metrics in a registry of their own, so several servers fit in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("abc_tvm_infer_requests", "Inference requests received",
                                ["model"], registry=r)
        self.errors = Counter("abc_tvm_infer_errors", "Inference requests answered with an "
                              "error, by HTTP status", ["model", "status"], registry=r)
        self.latency = Histogram("abc_tvm_infer_latency_seconds", "Time from request to "
                                 "response of successful inference requests", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("abc_tvm_batch_rows", "Rows filled per executed batch "
                                    "(dynamic batching)", ["model"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.inflight = Gauge("abc_tvm_inflight_requests", "Inference requests being handled",
                              registry=r)
        self.http = Counter("abc_tvm_http_responses", "HTTP responses on every route, by "
                            "status", ["status"], registry=r)


# ---------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Pending:
    arrays: list[np.ndarray]
    rows: int
    future: asyncio.Future
    arrived: float


@dataclass
class Batcher:
    """Merges concurrent requests for a model compiled with batch B > 1 into calls of B rows.

    The oldest waiting request waits at most `delay_s` for company. At most `model.workers`
    batches run at once: while every VM is busy, requests pile up and the next batch leaves
    full, so batching grows with load instead of adding latency when idle.
    """

    model: CompiledModel
    executor: ThreadPoolExecutor
    delay_s: float
    metrics: Metrics
    _pending: deque[_Pending] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _slots: asyncio.Semaphore | None = None
    _loop_task: asyncio.Task | None = None
    _running: set[asyncio.Task] = field(default_factory=set)

    def start(self) -> None:
        self._slots = asyncio.Semaphore(self.model.workers)
        self._loop_task = asyncio.create_task(self._collect(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        """Let running batches finish; requests still waiting get a 503."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(ApiError(503, "the server is shutting down"))

    async def submit(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The outputs for these inputs (each of 1..B rows), computed within a batch."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Pending(arrays, arrays[0].shape[0], fut, loop.time()))
        self._wake.set()
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        size = self.model.batch_size
        assert self._slots is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            batch: list[_Pending] = []
            rows = 0
            deadline = self._pending[0].arrived + self.delay_s if self._pending else 0.0
            while True:
                while self._pending and rows + self._pending[0].rows <= size:
                    p = self._pending.popleft()
                    if not p.future.done():  # done: its client timed out
                        batch.append(p)
                        rows += p.rows
                if rows >= size or self._pending or not batch:
                    break  # full, the next request does not fit, or nothing left to wait for
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _run_sync(self, parts: list[list[np.ndarray]], rows: int) -> list[np.ndarray]:
        """Concatenate, zero-pad to the compiled batch, run (in a worker thread)."""
        inputs = []
        for k, info in enumerate(self.model.inputs):
            chunk = [p[k] for p in parts]
            if rows < info.shape[0]:
                chunk.append(np.zeros((info.shape[0] - rows, *info.shape[1:]), info.dtype))
            inputs.append(np.concatenate(chunk))
        return self.model.run(*inputs)

    async def _run(self, batch: list[_Pending], rows: int) -> None:
        loop = asyncio.get_running_loop()
        assert self._slots is not None
        try:
            outs = await loop.run_in_executor(self.executor, self._run_sync,
                                              [p.arrays for p in batch], rows)
        except Exception as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        else:
            self.metrics.batch_rows.labels(self.model.name).observe(rows)
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result([o[start:start + p.rows] for o in outs])
                start += p.rows
        finally:
            self._slots.release()


# ---------------------------------------------------------------------------------------------
# Models as the protocol sees them


class ServedModel:
    """A loaded model plus what the protocol needs: metadata, shape rules, its batcher."""

    def __init__(self, model: CompiledModel, batching: bool) -> None:
        self.model = model
        self.name = model.name
        size = model.batch_size
        self.batched = batching and size > 1 and all(
            info.shape and info.shape[0] == size for info in (*model.inputs, *model.outputs))
        self.batcher: Batcher | None = None
        # Why: json.loads and np.array of a 48 MB list of zeros held the event loop (every
        # other client) for 3-4 s and took ~0.5 GB; no valid JSON request for this model is
        # larger than this, so anything larger is refused before it is read or parsed.
        self.numbers = sum(math.prod(i.shape) for i in model.inputs)
        self.max_json_bytes = JSON_SLACK_BYTES + JSON_BYTES_PER_NUMBER * self.numbers

    def _shape(self, info: TensorInfo) -> list[int]:
        return [-1, *info.shape[1:]] if self.batched else list(info.shape)

    def _tensor(self, info: TensorInfo) -> dict:
        return {"name": info.name, "datatype": DATATYPES.get(info.dtype, info.dtype.upper()),
                "shape": self._shape(info)}

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                "inputs": [self._tensor(i) for i in self.model.inputs],
                "outputs": [self._tensor(o) for o in self.model.outputs]}

    def config(self) -> dict:
        """Triton's model configuration (its clients and perf_analyzer ask for it)."""

        def entry(info: TensorInfo) -> dict:
            dims = list(info.shape[1:]) if self.batched else list(info.shape)
            return {"name": info.name, "dims": dims,
                    "data_type": "TYPE_" + DATATYPES.get(info.dtype, info.dtype.upper())}

        cfg = {"name": self.name, "platform": PLATFORM, "backend": "tvm",
               "max_batch_size": self.model.batch_size if self.batched else 0,
               "input": [entry(i) for i in self.model.inputs],
               "output": [entry(o) for o in self.model.outputs],
               "instance_group": [{"count": self.model.workers, "kind": "KIND_CPU"}]}
        if self.batched:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds":
                                       int(self.batcher.delay_s * 1e6) if self.batcher else 0}
        return cfg

    def check_shape(self, info: TensorInfo, shape: list[int]) -> None:
        if self.batched:
            size = info.shape[0]
            if (len(shape) == len(info.shape) and 1 <= shape[0] <= size
                    and tuple(shape[1:]) == info.shape[1:]):
                return
            want = f"[n, {', '.join(map(str, info.shape[1:]))}] with 1 <= n <= {size}"
        else:
            if tuple(shape) == info.shape:
                return
            want = str(list(info.shape))
        raise ApiError(400, f"input {info.name!r} has shape {shape}; model {self.name!r} takes "
                            f"{want}")


@dataclass
class _InferRequest:
    request_id: str | None
    arrays: list[np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, binary)
    timeout_s: float | None


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise ApiError(400, "Inference-Header-Content-Length must be an integer, got "
                            f"{header_length[:40]!r}") from None
    if not 0 <= n <= len(body):
        raise ApiError(400, f"Inference-Header-Content-Length is {n} but the body has only "
                            f"{len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def _json_tensor(data: object, info: TensorInfo, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ApiError(400, f"input {info.name!r}: 'data' must be a list of numbers")
    try:
        a = np.array(data)
    except (ValueError, TypeError):
        raise ApiError(400, f"input {info.name!r}: 'data' is not a flat or evenly nested list "
                            "of numbers") from None
    if a.dtype.kind not in "iuf":
        raise ApiError(400, f"input {info.name!r}: 'data' must hold only numbers (found "
                            f"{'booleans' if a.dtype.kind == 'b' else 'other values'})")
    if a.size != count:
        raise ApiError(400, f"input {info.name!r}: 'data' has {a.size} element(s) but shape "
                            f"{shape} needs {count}")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values: caught as Inf
        return a.astype(info.dtype).reshape(shape)


def _decode_tensor(t: dict, info: TensorInfo, served: ServedModel, binary: memoryview,
                   offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from its JSON entry (and the binary section); the new offset."""
    want = DATATYPES.get(info.dtype, info.dtype.upper())
    datatype = t.get("datatype")
    if datatype != want:
        raise ApiError(400, f"input {info.name!r} has datatype {datatype!r}; model "
                            f"{served.name!r} takes {want}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ApiError(400, f"input {info.name!r}: 'shape' must be a list of non-negative "
                            f"integers, got {shape!r}")
    served.check_shape(info, shape)
    count = math.prod(shape)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, f"input {info.name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in t:
            raise ApiError(400, f"input {info.name!r} has neither 'data' nor "
                                "parameters.binary_data_size")
        return _json_tensor(t["data"], info, shape, count), offset
    if "data" in t:
        raise ApiError(400, f"input {info.name!r} has both 'data' and binary_data_size")
    dtype = np.dtype(info.dtype).newbyteorder("<")
    if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
        raise ApiError(400, f"input {info.name!r}: binary_data_size is {size!r} bytes but shape "
                            f"{shape} of {want} needs {count * dtype.itemsize} (wrong element "
                            "count or datatype)")
    if offset + size > len(binary):
        raise ApiError(400, f"input {info.name!r}: the body ends {offset + size - len(binary)} "
                            "byte(s) before the end of its binary data")
    a = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
    return a.astype(info.dtype, copy=False), offset + size


def _json_too_large(served: ServedModel, size: int | None = None) -> str:
    got = "the JSON request is" if size is None else \
        f"the JSON part of the request ({size} bytes) is"
    return (f"{got} larger than any request for model {served.name!r} needs "
            f"({served.max_json_bytes} bytes for its {served.numbers} input numbers): "
            "send binary tensors for large inputs")


def parse_infer_request(body: bytes, header_length: str | None, served: ServedModel,
                        allow_nonfinite: bool = False) -> _InferRequest:
    """Validate an infer request completely before any of it reaches the model."""
    head, binary = _split_body(body, header_length)
    if len(head) > served.max_json_bytes:
        raise ApiError(413, _json_too_large(served, len(head)))
    try:
        req = json.loads(head)
    except RecursionError:  # why: a 500 with a traceback before (deeply nested arrays)
        raise ApiError(400, "the request's JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, and ints over 4300 digits
        raise ApiError(400, f"malformed JSON in the request: {e}") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "the request has no 'inputs' list")
    expected = {i.name: i for i in served.model.inputs}
    given: dict[str, np.ndarray] = {}
    offset = 0
    for k, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ApiError(400, f"inputs[{k}] must be an object with a 'name'")
        name = t["name"]
        if name not in expected:
            raise ApiError(400, f"model {served.name!r} has no input {name!r} (its inputs: "
                                f"{', '.join(expected)})")
        if name in given:
            raise ApiError(400, f"input {name!r} is given twice")
        given[name], offset = _decode_tensor(t, expected[name], served, binary, offset)
        if not allow_nonfinite and not np.isfinite(given[name]).all():
            raise ApiError(400, f"input {name!r} holds NaN or Inf, which the model's "
                                "binarisation cannot take (it would read NaN as bit 0)")
    if offset != len(binary):
        raise ApiError(400, f"the body holds {len(binary) - offset} byte(s) of binary data that "
                            "no input claims")
    missing = [n for n in expected if n not in given]
    if missing:
        raise ApiError(400, f"missing input(s) {', '.join(map(repr, missing))} for model "
                            f"{served.name!r}")
    arrays = [given[i.name] for i in served.model.inputs]
    if served.batched and len({a.shape[0] for a in arrays}) > 1:
        raise ApiError(400, "all inputs must have the same batch size (first dimension)")

    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be an object")
    default_binary = params.get("binary_data_output", False) is True
    known_outputs = [o.name for o in served.model.outputs]
    wanted = req.get("outputs")
    if wanted is None:
        outputs = [(n, default_binary) for n in known_outputs]
    else:
        if not isinstance(wanted, list):
            raise ApiError(400, "'outputs' must be a list")
        outputs = []
        for k, o in enumerate(wanted):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ApiError(400, f"outputs[{k}] must be an object with a 'name'")
            if o["name"] not in known_outputs:
                raise ApiError(400, f"model {served.name!r} has no output {o['name']!r} (its "
                                    f"outputs: {', '.join(known_outputs)})")
            oparams = o.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise ApiError(400, f"outputs[{k}]: 'parameters' must be an object")
            if oparams.get("classification"):
                raise ApiError(400, "the classification extension is not supported: ask for "
                                    "the output tensor and take its argmax")
            outputs.append((o["name"], oparams.get("binary_data", default_binary) is True))
    timeout = params.get("timeout")  # Triton's client sends microseconds
    timeout_s = timeout / 1e6 if isinstance(timeout, int) and timeout > 0 else None
    rid = req.get("id")
    return _InferRequest(rid if isinstance(rid, str) else None, arrays, outputs, timeout_s)


def infer_response(served: ServedModel, req: _InferRequest, outs: list[np.ndarray]) -> Response:
    """JSON outputs, or the binary-tensor form: JSON header then raw little-endian data."""
    by_name = dict(zip((o.name for o in served.model.outputs), outs, strict=True))
    entries, chunks = [], []
    for name, binary in req.outputs:
        y = by_name[name]
        entry: dict = {"name": name, "datatype": DATATYPES.get(str(y.dtype), str(y.dtype)),
                       "shape": list(y.shape)}
        if binary:
            raw = np.ascontiguousarray(y, dtype=y.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = y.ravel().tolist()
        entries.append(entry)
    head: dict = {"model_name": served.name, "model_version": MODEL_VERSION}
    if req.request_id is not None:
        head["id"] = req.request_id
    head["outputs"] = entries
    js = json.dumps(head).encode()
    if not chunks:
        return Response(js, media_type="application/json")
    return Response(js + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(js))})


# ---------------------------------------------------------------------------------------------
# The application


class _Guard:
    """ASGI middleware: the bearer token on every route but health; responses by status."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: Metrics) -> None:
        self.app = app
        self.token = f"Bearer {token}".encode() if token else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(str(message["status"])).inc()
            await send(message)

        if self.token is not None and scope["path"] not in HEALTH_PATHS:
            auth = dict(scope["headers"]).get(b"authorization")
            problem = None
            if auth is None:
                problem = "missing bearer token: send 'Authorization: Bearer <token>'"
            elif not hmac.compare_digest(auth, self.token):
                problem = "wrong bearer token"
            if problem is not None:
                response = _error(401, problem, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, counting_send)
                return
        await self.app(scope, receive, counting_send)


async def _read_body(request: Request, limit: int, timeout_s: float,
                     too_large: str | None = None) -> bytes:
    """The body, refused with 413 beyond `limit` bytes (also once decompressed), 408 if slow.

    `too_large`: the 413 message when `limit` is not --max-body-bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length is not an integer: {length[:40]!r}") from None
        if n > limit:
            raise ApiError(413, too_large or f"request body of {n} bytes exceeds the server's "
                                             f"limit of {limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, too_large or "request body exceeds the server's limit "
                                                     f"of {limit} bytes (--max-body-bytes)")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:  # nobody left to answer; counted, not logged as a failure
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported (use gzip, "
                            "deflate or none)")
    d = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, f"the {encoding} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise ApiError(413, "decompressed: " + too_large if too_large else "decompressed "
                       f"request body exceeds the server's limit of {limit} bytes "
                       "(--max-body-bytes)")
    if not d.eof:
        raise ApiError(400, f"the {encoding} body is truncated")
    return out


def create_app(models: Sequence[CompiledModel], options: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving `models` (names must be unique); run it with uvicorn."""
    options = options or ServeOptions()
    served: dict[str, ServedModel] = {}
    for m in models:
        if m.name in served:
            raise UserError(f"two models are named {m.name!r}: model names (file names without "
                            ".so) must be unique")
        served[m.name] = ServedModel(m, options.batching)
    if not served:
        raise UserError("no models to serve")
    workers = options.workers or max(m.workers for m in models)
    metrics = Metrics()
    state: dict = {"executor": None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="abc-tvm-infer")
        state["executor"] = executor
        for s in served.values():
            if s.batched:
                s.batcher = Batcher(s.model, executor, options.max_batch_delay_ms / 1e3,
                                    metrics)
                s.batcher.start()
        try:
            yield
        finally:
            for s in served.values():
                if s.batcher is not None:
                    await s.batcher.stop()
                    s.batcher = None
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="abc-tvm", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.models = served

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message)

    def model_for(name: str, version: str | None) -> ServedModel:
        s = served.get(name)
        if s is None:
            raise ApiError(404, f"unknown model {name!r} (serving: {', '.join(served)})")
        if version not in (None, "", MODEL_VERSION):
            raise ApiError(404, f"model {name!r} has no version {version!r} (only "
                                f"{MODEL_VERSION!r})")
        return s

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _json({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": PLATFORM, "version": __version__,
                      "extensions": ["binary_tensor_data", "model_configuration",
                                     "model_repository"]})

    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(model_for(name, version).metadata())

    async def model_ready(name: str, version: str | None = None) -> Response:
        model_for(name, version)
        return _json({"name": name, "ready": True})

    async def model_config(name: str, version: str | None = None) -> Response:
        return _json(model_for(name, version).config())

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        label = name if name in served else "(unknown)"
        metrics.requests.labels(label).inc()
        metrics.inflight.inc()
        try:
            s = model_for(name, version)
            header_length = request.headers.get("inference-header-content-length")
            limit, too_large = options.max_body_bytes, None
            if header_length is None and s.max_json_bytes < limit:  # all of it is JSON
                limit, too_large = s.max_json_bytes, _json_too_large(s)
            body = await _read_body(request, limit, options.timeout_s, too_large)
            req = parse_infer_request(body, header_length, s, options.allow_nonfinite)
            timeout = min(options.timeout_s, req.timeout_s or options.timeout_s)
            outs = await _run(s, req.arrays, timeout)
            response = infer_response(s, req, outs)
        except ApiError as e:
            metrics.errors.labels(label, str(e.status)).inc()
            return _error(e.status, e.message)
        except Exception as e:  # a bug, not the client's fault: log it, keep serving
            log.exception("inference on model %r failed", name)
            metrics.errors.labels(label, "500").inc()
            return _error(500, f"internal error while running model {name!r}: "
                               f"{type(e).__name__}")
        finally:
            metrics.inflight.dec()
        metrics.latency.labels(label).observe(time.perf_counter() - t0)
        return response

    async def _run(s: ServedModel, arrays: list[np.ndarray], timeout: float) -> list[np.ndarray]:
        try:
            async with asyncio.timeout(timeout):
                if s.batcher is not None:
                    return await s.batcher.submit(arrays)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(state["executor"], s.model.run, *arrays)
        except TimeoutError:
            raise ApiError(504, f"model {s.name!r} did not answer within {timeout:g} s "
                                "(--timeout)") from None
        except UserError as e:  # the runtime's own checks: still the client's input
            raise ApiError(400, str(e)) from None

    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(base, model_metadata, methods=["GET"])
        app.add_api_route(base + "/ready", model_ready, methods=["GET"])
        app.add_api_route(base + "/config", model_config, methods=["GET"])
        app.add_api_route(base + "/infer", infer, methods=["POST"])

    @app.post("/v2/repository/index")
    async def repository_index() -> Response:
        return _json([{"name": n, "version": MODEL_VERSION, "state": "READY"} for n in served])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, token=options.token, metrics=metrics)
    return app


# ---------------------------------------------------------------------------------------------
# Running it


def find_models(paths: Iterable[str | os.PathLike], model_dir: str | os.PathLike | None
                ) -> list[Path]:
    """The .so files named on the command line plus those in `model_dir`, checked to exist."""
    found = []
    for p in map(Path, paths):
        if p.suffix != ".so":
            raise UserError(f"{p} is not a compiled module (.so): compile it with abc-tvm "
                            "compile first")
        if not p.is_file():
            raise UserError(f"no such module: {p}")
        found.append(p)
    if model_dir is not None:
        d = Path(model_dir)
        if not d.is_dir():
            raise UserError(f"--model-dir {d} is not a directory")
        in_dir = sorted(d.glob("*.so"))
        if not in_dir:
            raise UserError(f"--model-dir {d} holds no .so files")
        found += in_dir
    if not found:
        raise UserError("no models to serve: name .so files or use --model-dir DIR")
    names: dict[str, Path] = {}
    for p in found:
        name = p.name.removesuffix(".so")
        if name in names and names[name].resolve() != p.resolve():
            raise UserError(f"two models are named {name!r} ({names[name]} and {p}): model "
                            "names (file names without .so) must be unique")
        names.setdefault(name, p)
    return list(names.values())


def load_models(paths: Sequence[Path], workers: int | None = None) -> list[CompiledModel]:
    """Load and smoke-run every model, so a broken one stops the server before it listens."""
    models = []
    for p in paths:
        m = load(p, workers=workers)
        m.run(*[np.zeros(i.shape, i.dtype) for i in m.inputs])
        models.append(m)
    return models


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free one); binding first makes the port known."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UserError(f"cannot resolve --host {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, and JSON 400s.

    Why: uvicorn times out only a kept-alive connection that stays silent, and any byte it
    receives cancels that timer. A connection that never sent a byte, one trickling its
    request head (slowloris), or one trickling a body after it was answered (a 408, or a
    second request's head) was held open for ever: a socket, a file descriptor and a
    protocol object each, until the server ran out. Here each request head must arrive
    within `read_timeout_s` of the connection opening or of the previous response ending,
    else the connection is closed; while a request is being handled the app's own limits
    apply (the body's --timeout, the inference timeout), so no inference is cut short.
    And uvicorn answers what its parser refuses (garbage, a bad Content-Length, a head over
    16 KiB) with a text/plain 400: here it is JSON, like every other client mistake.
    Pinned instead of uvicorn's "auto" choice, which would take httptools if installed.
    """

    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or (self.cycle is not None
                                           and not self.cycle.response_complete):
            return
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived: the app's limits take over
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before: the super call may start a pipelined request (and disarm)
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "invalid HTTP request: the request line or headers "
                                    "cannot be parsed (bad syntax, a bad Content-Length, or "
                                    "a head over 16 KiB)"}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _uvicorn_config(app: FastAPI, options: ServeOptions, log_level: str,
                    log_config: dict | None | str = uvicorn.config.LOGGING_CONFIG
                    ) -> uvicorn.Config:
    protocol = type("_DeadlineH11", (_DeadlineH11,),
                    {"read_timeout_s": options.read_deadline_s})
    return uvicorn.Config(app, lifespan="on", log_level=log_level, log_config=log_config,
                          timeout_graceful_shutdown=int(options.timeout_s) + 5,
                          access_log=log_level in ("info", "debug"), http=protocol,
                          limit_concurrency=options.max_connections)


class BackgroundServer:
    """The server in a thread on a loopback port: for tests, benchmarks and notebooks.

    `with BackgroundServer(models) as s:` ... `s.address` ("127.0.0.1:PORT", what Triton's
    client takes); leaving the block shuts it down gracefully, in-flight requests first.
    """

    def __init__(self, models: Sequence[CompiledModel], options: ServeOptions | None = None,
                 host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.options = options or ServeOptions()
        self.app = create_app(models, self.options)
        self.host = host
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        # log_config=None: uvicorn leaves logging alone, records reach the root logger
        self._server = uvicorn.Server(_uvicorn_config(self.app, self.options, log_level, None))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="abc-tvm-serve", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop accepting, let in-flight requests finish, then stop."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(models: Sequence[CompiledModel], host: str = "127.0.0.1", port: int = 8000,
          options: ServeOptions | None = None, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests and return."""
    options = options or ServeOptions()
    app = create_app(models, options)
    sock = bind(host, port)
    shown = sock.getsockname()
    where = f"[{shown[0]}]:{shown[1]}" if sock.family == socket.AF_INET6 else \
        f"{shown[0]}:{shown[1]}"
    if not options.token and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"abc-tvm serve: warning: listening on {host} without --token: anyone who can "
              "reach this port can run the models", file=sys.stderr)
    print(f"abc-tvm serve: {len(models)} model(s) ({', '.join(m.name for m in models)}) on "
          f"http://{where} (Open Inference Protocol /v2, metrics /metrics)", flush=True)
    server = uvicorn.Server(_uvicorn_config(app, options, log_level))
    # uvicorn re-raises the signal that stopped it under the handler it found; a no-op
    # handler here makes a graceful stop end in exit status 0 instead of death by signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    print("abc-tvm serve: stopped", flush=True)


def serve_from_args(args: object) -> None:
    """`abc-tvm serve` (argparse namespace from serving_args.add_serve_arguments)."""
    paths = find_models(args.models, args.model_dir)
    workers = getattr(args, "workers", None) or usable_cpus()
    # Requests run `workers` at a time: split the cores between them rather than letting
    # every call spread over all of them (see abc_tvm.runtime for the measurement).
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, usable_cpus() // workers)))
    models = load_models(paths, workers)
    options = ServeOptions(token=args.token or None, max_body_bytes=args.max_body_bytes,
                           timeout_s=args.timeout, batching=not args.no_batching,
                           max_batch_delay_ms=args.max_batch_delay_ms,
                           allow_nonfinite=args.allow_nonfinite, workers=workers,
                           read_timeout_s=args.read_timeout,
                           max_connections=args.max_connections)
    serve(models, args.host, args.port, options, args.log_level)
