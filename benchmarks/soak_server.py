"""Soak `abc-tvm serve` with good traffic while hostile clients run alongside (issue 22).

    .venv/bin/python benchmarks/soak_server.py --requests 10000 --concurrency 16 \
        [--model MODEL.so] [--timeout 5] [--slowloris 16] [--json summary.json]

It compiles a small ABC model (or serves --model), starts `abc-tvm serve` on a free loopback
port in a subprocess (with a bearer token), warms it up and records its resident memory
(VmRSS from /proc/PID/status) and open file descriptors. Then --requests inference requests
at --concurrency run (binary and JSON tensors mixed, every answer compared with the model
run in this process) while, on other connections, hostile clients loop until the good
traffic is done:

- fast cases (HOSTILE, each must get a 4xx with a JSON `{"error": ...}` body, or for a
  client that hangs up itself, leave the server answering): a body cut off by FIN or RST,
  1 MB of garbage as a body and as the whole request, a Content-Length shorter than the
  body / not a number / negative, binary-tensor requests whose sizes lie, JSON bombs (deep
  nesting, a huge array, a 5000-digit number), a missing or wrong token, model names with
  path traversal (`../`, `%2e%2e`, `%2f`, absolute);
- slow cases (SLOW): a Content-Length longer than the body (408), and slowloris
  connections (idle, trickled request head, trickled body, trickled head of a second request
  on a kept-alive connection) that the server must close within its read deadline while the
  good clients go on.

Afterwards the server must still answer a good request correctly, report no 5xx on
/metrics, have written no traceback, and exit 0 on SIGTERM. Criteria (exit 1 if any fails):
0 errors among good requests, RSS growth from warm-up to the end < --max-rss-growth (5%),
every hostile case as expected on every run, p99 below --max-p99-ms, open descriptors back
to the warm-up count (+ a few), the server alive and correct at the end.

tests/test_serving_hostile.py runs the same cases (imported from here) against an
in-process server; docs/reliability.md, "## Server soak and hostile clients", has the
figures of a full run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from serve_load import cpu_model, pct, usable_cpus  # the load bench's, beside this file

TOKEN = "soak-token"

# ---------------------------------------------------------------------------------------------
# Talking to the server


@dataclass(frozen=True)
class Target:
    """Where the server is and what a good request to it looks like."""

    host: str
    port: int
    token: str | None
    model: str
    x: np.ndarray  # a good input
    expected: np.ndarray  # the model's own answer to it
    read_deadline_s: float  # how long the server may take to close a trickling client

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def connect(self, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.model}/infer"


def http_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
               content_length: int | str | None = None) -> bytes:
    """One HTTP/1.1 request as raw bytes; `content_length` may lie (None: the true length)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if content_length is None and (body or method == "POST"):
        content_length = len(body)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Reply:
    status: int | None = None  # None: no HTTP answer
    content_type: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    closed: str = ""  # how the connection ended without an answer: "closed", "reset", "timeout"
    seconds: float = 0.0

    def json_error(self) -> str | None:
        """The `error` message if the body is a JSON object {"error": str}, else None."""
        if "application/json" not in self.content_type:
            return None
        try:
            obj = json.loads(self.body)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
        return None

    def short(self) -> str:
        if self.status is None:
            return f"no answer ({self.closed}) after {self.seconds:.2f} s"
        return f"{self.status} {self.content_type} {self.body[:160]!r}"


def read_reply(sock: socket.socket, timeout: float) -> Reply:
    """The next HTTP response on `sock`, or how the connection ended instead."""
    t0 = time.perf_counter()
    sock.settimeout(timeout)
    r = Reply()
    try:
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        r.status = resp.status
        r.content_type = resp.getheader("content-type", "")
        r.headers = {k.lower(): v for k, v in resp.getheaders()}
        r.body = resp.read()
    except TimeoutError:
        r.closed = "timeout"
    except (ConnectionResetError, BrokenPipeError):
        r.closed = "reset"
    except (http.client.RemoteDisconnected, http.client.IncompleteRead,
            http.client.BadStatusLine, ConnectionError):
        r.closed = "closed"
    r.seconds = time.perf_counter() - t0
    return r


def exchange(target: Target, data: bytes, timeout: float = 30.0) -> Reply:
    """Send `data` on a new connection (from a thread: the server may answer and close before
    it has read everything) and read the answer."""
    sock = target.connect(timeout)

    def write() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        return read_reply(sock, timeout)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        writer.join(timeout)


def wait_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"",
                interval_s: float = 0.25) -> tuple[float | None, bytes]:
    """Trickle `trickle` one byte per `interval_s` (then stay silent) until the server closes
    the connection: (seconds until it did, or None if it had not after `limit_s`; what it
    sent meanwhile)."""
    t0 = time.perf_counter()
    got = b""
    i = 0
    while time.perf_counter() - t0 < limit_s:
        readable, _, _ = select.select([sock], [], [], interval_s)
        if readable:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return time.perf_counter() - t0, got
            if not chunk:
                return time.perf_counter() - t0, got
            got += chunk
            continue
        if i < len(trickle):
            try:
                sock.sendall(trickle[i:i + 1])
            except OSError:
                return time.perf_counter() - t0, got
            i += 1
    return None, got


def good_request(target: Target, binary: bool) -> tuple[bytes, dict[str, str]]:
    """A correct infer request for target.x: binary tensors in and out, or JSON."""
    x = target.x
    entry: dict = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        raw = x.astype("<f4").tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [entry], "parameters": {"binary_data_output": True}})
        return head.encode() + raw, {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream"}
    entry["data"] = x.ravel().tolist()
    return json.dumps({"inputs": [entry]}).encode(), {"Content-Type": "application/json"}


def decode_output(status: int, headers: http.client.HTTPMessage, body: bytes) -> np.ndarray:
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    n = headers.get("Inference-Header-Content-Length")
    head = json.loads(body[:int(n)] if n is not None else body)
    out = head["outputs"][0]
    if n is not None:
        y = np.frombuffer(body[int(n):], "<f4")
    else:
        y = np.asarray(out["data"], np.float32)
    return y.reshape(out["shape"])


def close_enough(y: np.ndarray, expected: np.ndarray) -> bool:
    return y.shape == expected.shape and bool(np.allclose(
        y, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max())))


class GoodClient:
    """One kept-alive connection sending good requests and checking every answer."""

    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.requests = {b: good_request(target, b) for b in (False, True)}

    def infer(self, binary: bool) -> np.ndarray:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.target.host, self.target.port,
                                                   timeout=self.timeout)
        body, headers = self.requests[binary]
        try:
            self.conn.request("POST", self.target.infer_path, body,
                              {**self.target.auth(), **headers})
            r = self.conn.getresponse()
            data = r.read()
        except Exception:
            self.close()
            raise
        return decode_output(r.status, r.headers, data)

    def check(self, binary: bool) -> str | None:
        """None if the answer is right, else what went wrong."""
        try:
            y = self.infer(binary)
        except Exception as e:
            return repr(e)[:300]
        if not close_enough(y, self.target.expected):
            return "wrong answer"
        return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def alive_and_correct(target: Target) -> str | None:
    """None if health answers and a JSON and a binary request get the right answer."""
    try:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
        conn.request("GET", "/v2/health/live")
        r = conn.getresponse()
        r.read()
        conn.close()
        if r.status != 200:
            return f"health answered {r.status}"
    except Exception as e:
        return f"health: {e!r}"
    c = GoodClient(target, timeout=10)
    try:
        for binary in (False, True):
            problem = c.check(binary)
            if problem:
                return f"{'binary' if binary else 'JSON'} request: {problem}"
    finally:
        c.close()
    return None


# ---------------------------------------------------------------------------------------------
# Hostile clients


@dataclass
class Outcome:
    ok: bool
    status: int | str  # the HTTP status, or what happened instead ("closed after 5.1 s")
    detail: str = ""


Case = Callable[[Target], Outcome]


def expect_json_4xx(reply: Reply, status: int | tuple[int, ...] | None = None,
                    words: tuple[str, ...] = ()) -> Outcome:
    """A 4xx (or exactly `status`) whose body is {"error": "..."} containing `words`."""
    if reply.status is None:
        return Outcome(False, reply.closed, reply.short())
    want = (status,) if isinstance(status, int) else status
    message = reply.json_error()
    ok = (400 <= reply.status < 500 and (want is None or reply.status in want)
          and message is not None and all(w.lower() in message.lower() for w in words))
    return Outcome(ok, reply.status, message if message is not None else reply.short())


def _infer(target: Target, body: bytes, headers: dict[str, str] | None = None,
           content_length: int | str | None = None, path: str | None = None,
           auth: bool = True) -> bytes:
    h = {**(target.auth() if auth else {}), "Content-Type": "application/json", **(headers or {})}
    return http_bytes("POST", path or target.infer_path, body, h, content_length)


def _json_input(data: object, target: Target, **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(target.x.shape),
                                   "datatype": "FP32", "data": data}], **extra}).encode()


def _binary_input(target: Target, size: int | None = None, data: bytes | None = None,
                  ) -> tuple[bytes, bytes]:
    raw = target.x.astype("<f4").tobytes() if data is None else data
    head = json.dumps({"inputs": [{"name": "input", "shape": list(target.x.shape),
                                   "datatype": "FP32", "parameters": {
                                       "binary_data_size": len(raw) if size is None else size}}]})
    return head.encode(), raw


def _hang_up(target: Target, rst: bool) -> Outcome:
    """Half a body, then FIN (or RST): nobody to answer; the server must go on."""
    body, _ = good_request(target, False)
    sock = target.connect(10)
    sock.sendall(_infer(target, body[: len(body) // 2], content_length=len(body)))
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    sock.close()
    problem = alive_and_correct(target)
    return Outcome(problem is None, "client hung up", problem or "server still answers")


def disconnect_mid_body(target: Target) -> Outcome:
    return _hang_up(target, rst=False)


def reset_mid_body(target: Target) -> Outcome:
    return _hang_up(target, rst=True)


MIB = 1 << 20


def garbage_body_1mb(target: Target) -> Outcome:
    """1 MB of random bytes as a JSON body: 400 (not JSON) or 413 (larger than the model's
    inputs can need)."""
    rnd = random.Random(1)
    return expect_json_4xx(exchange(target, _infer(target, rnd.randbytes(MIB))), (400, 413))


def garbage_stream_1mb(target: Target) -> Outcome:
    """1 MB of random bytes where a request should be: uvicorn's HTTP parser refuses it."""
    rnd = random.Random(2)
    return expect_json_4xx(exchange(target, rnd.randbytes(MIB)), 400)


def content_length_short(target: Target) -> Outcome:
    body, _ = good_request(target, False)
    return expect_json_4xx(exchange(target, _infer(target, body, content_length=len(body) // 2)),
                           400, ("json",))


def content_length_not_a_number(target: Target) -> Outcome:
    body, _ = good_request(target, False)
    return expect_json_4xx(exchange(target, _infer(target, body, content_length="12abc")), 400)


def content_length_negative(target: Target) -> Outcome:
    body, _ = good_request(target, False)
    return expect_json_4xx(exchange(target, _infer(target, body, content_length=-5)), 400)


def binary_header_past_body(target: Target) -> Outcome:
    head, raw = _binary_input(target)
    h = {"Inference-Header-Content-Length": str(len(head) + len(raw) + 1000)}
    return expect_json_4xx(exchange(target, _infer(target, head + raw, h)), 400,
                           ("inference-header-content-length",))


def binary_header_negative(target: Target) -> Outcome:
    head, raw = _binary_input(target)
    h = {"Inference-Header-Content-Length": "-40"}
    return expect_json_4xx(exchange(target, _infer(target, head + raw, h)), 400,
                           ("inference-header-content-length",))


def binary_data_short(target: Target) -> Outcome:
    """binary_data_size right for the shape, but only half the bytes follow."""
    head, raw = _binary_input(target)
    h = {"Inference-Header-Content-Length": str(len(head))}
    return expect_json_4xx(exchange(target, _infer(target, head + raw[: len(raw) // 2], h)),
                           400, ("binary",))


def binary_data_size_huge(target: Target) -> Outcome:
    head, raw = _binary_input(target, size=1 << 62)
    h = {"Inference-Header-Content-Length": str(len(head))}
    return expect_json_4xx(exchange(target, _infer(target, head + raw, h)), 400,
                           ("binary_data_size",))


# The deep bombs stay under 64 KiB, which the server accepts as JSON for any model, so they
# reach the parser: Python's gives up past about 10000 levels (RecursionError).


def json_bomb_deep_array(target: Target) -> Outcome:
    depth = 30_000
    body = _json_input(None, target).replace(b"null", b"[" * depth + b"]" * depth)
    return expect_json_4xx(exchange(target, _infer(target, body)), 400)


def json_bomb_deep_object(target: Target) -> Outcome:
    depth = 12_000
    body = b'{"inputs": ' + b'{"":' * depth + b"1" + b"}" * depth + b"}"
    return expect_json_4xx(exchange(target, _infer(target, body)), 400)


def json_bomb_big_number(target: Target) -> Outcome:
    body = _json_input(None, target).replace(b"null", b"[" + b"9" * 5000 + b"]")
    return expect_json_4xx(exchange(target, _infer(target, body)), 400)


BOMB_BYTES = 48 * MIB  # under the server's default --max-body-bytes (64M)


def json_bomb_huge_array(target: Target) -> Outcome:
    """A 48 MB list of zeros: refused (wrong size, or too large) without starving others."""
    n = BOMB_BYTES // 2
    body = _json_input(None, target).replace(b"null", b"[" + b"0," * (n - 1) + b"0]")
    return expect_json_4xx(exchange(target, _infer(target, body), timeout=60), (400, 413))


def missing_token(target: Target) -> Outcome:
    if not target.token:
        return Outcome(True, "n/a", "the server has no token")
    body, _ = good_request(target, False)
    return expect_json_4xx(exchange(target, _infer(target, body, auth=False)), 401, ("token",))


def wrong_token(target: Target) -> Outcome:
    if not target.token:
        return Outcome(True, "n/a", "the server has no token")
    body, _ = good_request(target, False)
    h = {"Authorization": f"Bearer {target.token}x"}
    return expect_json_4xx(exchange(target, _infer(target, body, h, auth=False)), 401,
                           ("token",))


TRAVERSALS = {
    "traversal_dotdot": "/v2/models/../infer",
    "traversal_pct_dotdot": "/v2/models/%2e%2e/infer",
    "traversal_pct_slash": "/v2/models/..%2f..%2f..%2fetc%2fpasswd/infer",
    "traversal_absolute": "/v2/models//etc/passwd/infer",
    "traversal_absolute_pct": "/v2/models/%2fetc%2fpasswd/infer",
    "traversal_deep": "/v2/models/MODEL/../../../../etc/passwd",
    "traversal_absolute_form": "http://127.0.0.1/v2/models/..%2f..%2fetc%2fpasswd/infer",
}


def _traversal(path: str) -> Case:
    def case(target: Target) -> Outcome:
        body, _ = good_request(target, False)
        reply = exchange(target, _infer(target, body, path=path.replace("MODEL", target.model)))
        out = expect_json_4xx(reply, 404)
        if b"root:" in reply.body:
            return Outcome(False, out.status, "the body holds /etc/passwd")
        return out

    case.__name__ = path
    return case


def content_length_long(target: Target) -> Outcome:
    """Content-Length 1000 bytes more than sent, then silence: 408 within the deadline."""
    body, _ = good_request(target, False)
    sock = target.connect(10)
    try:
        sock.sendall(_infer(target, body, content_length=len(body) + 1000))
        reply = read_reply(sock, target.read_deadline_s * 2 + 5)
    finally:
        sock.close()
    out = expect_json_4xx(reply, 408)
    if out.ok and reply.seconds > target.read_deadline_s + slack(target):
        return Outcome(False, out.status, f"408 only after {reply.seconds:.1f} s")
    return out


def slack(target: Target) -> float:
    """How late past its deadline a close may come on a loaded machine."""
    return max(2.0, target.read_deadline_s / 2)


def _slowloris(target: Target, first: bytes, trickle: bytes, expect: bytes = b"") -> Outcome:
    """Send `first`, then trickle; the server must close the connection within its
    deadline (+ slack) of the last complete exchange; `expect`: bytes its answer must hold."""
    limit = 3 * target.read_deadline_s + 10
    sock = target.connect(10)
    try:
        if first:
            sock.sendall(first)
        took, got = wait_closed(sock, limit, trickle)
    finally:
        sock.close()
    if took is None:
        return Outcome(False, f"still open after {limit:.0f} s",
                       f"sent {len(first)} + {len(trickle)} trickled bytes; got {got[:120]!r}")
    status = f"closed after {took:.1f} s"
    if expect and expect not in got:
        return Outcome(False, status, f"expected {expect!r} in the answer, got {got[:200]!r}")
    bound = (2 if expect else 1) * target.read_deadline_s + slack(target)
    return Outcome(took <= bound, status, got[:120].decode("latin-1")
                   if took <= bound else f"later than {bound:.1f} s")


TRICKLE = b"X-Slow: " + b"a" * 200  # never ends the head: no blank line


def slowloris_idle(target: Target) -> Outcome:
    """Connect and send nothing."""
    return _slowloris(target, b"", b"")


def slowloris_headers(target: Target) -> Outcome:
    """A request line, then header bytes one at a time: the head never completes."""
    return _slowloris(target, f"POST {target.infer_path} HTTP/1.1\r\n".encode(), TRICKLE)


def slowloris_body(target: Target) -> Outcome:
    """A complete head declaring 4096 bytes (under any model's JSON cap), then the body one
    byte at a time: a 408 (JSON), and the connection closed though the bytes keep coming."""
    head = _infer(target, b"", content_length=4096)
    return _slowloris(target, head, b'{"inputs": [' + b" " * 400, expect=b" 408 ")


def slowloris_after_response(target: Target) -> Outcome:
    """A good request (answered 200), then the next request's head trickled on the same
    kept-alive connection."""
    body, headers = good_request(target, True)
    first = _infer(target, body, headers)
    second = f"POST {target.infer_path} HTTP/1.1\r\n".encode() + TRICKLE
    return _slowloris(target, first, second, expect=b" 200 ")


HOSTILE: dict[str, Case] = {
    "disconnect_mid_body": disconnect_mid_body,
    "reset_mid_body": reset_mid_body,
    "garbage_body_1mb": garbage_body_1mb,
    "garbage_stream_1mb": garbage_stream_1mb,
    "content_length_short": content_length_short,
    "content_length_not_a_number": content_length_not_a_number,
    "content_length_negative": content_length_negative,
    "binary_header_past_body": binary_header_past_body,
    "binary_header_negative": binary_header_negative,
    "binary_data_short": binary_data_short,
    "binary_data_size_huge": binary_data_size_huge,
    "json_bomb_deep_array": json_bomb_deep_array,
    "json_bomb_deep_object": json_bomb_deep_object,
    "json_bomb_big_number": json_bomb_big_number,
    "json_bomb_huge_array": json_bomb_huge_array,
    "missing_token": missing_token,
    "wrong_token": wrong_token,
    **{name: _traversal(path) for name, path in TRAVERSALS.items()},
}

SLOW: dict[str, Case] = {
    "content_length_long": content_length_long,
    "slowloris_idle": slowloris_idle,
    "slowloris_headers": slowloris_headers,
    "slowloris_body": slowloris_body,
    "slowloris_after_response": slowloris_after_response,
}


@dataclass
class CaseStats:
    runs: int = 0
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    first_failure: str = ""
    example: str = ""
    close_s: list[float] = field(default_factory=list)  # [min, max] of "closed after T s"

    def add(self, out: Outcome) -> None:
        self.runs += 1
        key = re.sub(r"\d+\.\d s", "N s", str(out.status))  # "closed after 5.1 s" -> one key
        if m := re.search(r"closed after (\d+\.\d) s", str(out.status)):
            t = float(m.group(1))
            self.close_s = [min(self.close_s[0], t), max(self.close_s[1], t)] \
                if self.close_s else [t, t]
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if not out.ok:
            self.failures += 1
            if not self.first_failure:
                self.first_failure = f"{out.status}: {out.detail}"[:400]
        elif not self.example:
            self.example = f"{out.status}: {out.detail}"[:200]


def run_case(name: str, case: Case, target: Target, stats: dict[str, CaseStats],
             lock: threading.Lock) -> Outcome:
    try:
        out = case(target)
    except Exception as e:  # the client side failed: count it as a failure of the case
        out = Outcome(False, "client error", repr(e)[:300])
    with lock:
        stats.setdefault(name, CaseStats()).add(out)
    return out


# ---------------------------------------------------------------------------------------------
# The soak


def drive(target: Target, requests: int, concurrency: int, timeout: float = 30.0) -> dict:
    """`requests` good requests from `concurrency` kept-alive clients, every answer checked."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    budget = [requests]

    def take() -> int | None:
        with lock:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            return budget[0]

    def worker() -> None:
        c = GoodClient(target, timeout)
        mine, bad = [], []
        try:
            while (n := take()) is not None:
                t = time.perf_counter()
                problem = c.check(binary=n % 2 == 0)
                if problem:
                    bad.append(problem)
                else:
                    mine.append(time.perf_counter() - t)
        finally:
            c.close()
            with lock:
                lat.extend(mine)
                errors.extend(bad)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"requests": requests, "ok": len(lat), "errors": len(errors),
            "first_error": errors[0] if errors else "", "seconds": round(elapsed, 2),
            "rps": round(len(lat) / elapsed, 1), "p50_ms": round(pct(lat, 50) * 1e3, 2),
            "p99_ms": round(pct(lat, 99) * 1e3, 2), "max_ms": round(max(lat, default=0) * 1e3, 2)}


class HostileLoad:
    """Hostile clients looping until stopped: one thread through the fast cases, one per
    slow case, and `slowloris` more threads trickling request heads."""

    def __init__(self, target: Target, slowloris: int, pause_s: float = 0.05) -> None:
        self.target = target
        self.stats: dict[str, CaseStats] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.pause_s = pause_s
        self.threads = [threading.Thread(target=self._fast, daemon=True)]
        slow = [(n, c) for n, c in SLOW.items()]
        slow += [("slowloris_headers", slowloris_headers)] * max(0, slowloris - 1)
        self.threads += [threading.Thread(target=self._slow, args=nc, daemon=True)
                         for nc in slow]

    def _fast(self) -> None:
        while True:  # whole passes: every case runs at least once
            for name, case in HOSTILE.items():
                run_case(name, case, self.target, self.stats, self.lock)
                time.sleep(self.pause_s)
            if self.stop_event.is_set():
                return

    def _slow(self, name: str, case: Case) -> None:
        while not self.stop_event.is_set():
            run_case(name, case, self.target, self.stats, self.lock)

    def start(self) -> HostileLoad:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        """Ask every thread to finish its current case, and wait for it."""
        self.stop_event.set()
        for t in self.threads:
            t.join(6 * self.target.read_deadline_s + 120)


class Server:
    """`abc-tvm serve MODEL` as a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: Path, token: str | None, timeout_s: float, log: Path,
                 extra: list[str]) -> None:
        self.argv = [sys.executable, "-m", "abc_tvm.cli", "serve", str(model), "--port", "0",
                     "--timeout", f"{timeout_s:g}", "--log-level", "warning", *extra]
        env = {**os.environ}
        if token:
            env["ABC_TVM_TOKEN"] = token  # keeps it out of the process list
        self.log = log
        self._err = log.open("w")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {log.read_text()[-2000:]}")
        self.port = int(match.group(1))

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return -1

    def rss_mib(self) -> float:
        return round(self.status("VmRSS") / 1024, 1)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        self._err.close()
        return rc


def build_model(workdir: Path) -> Path:
    """A small two-block ABC net (3x16x16 input), compiled for x86."""
    import torch

    from abc_tvm.compiler import compile_model
    from abc_tvm.export import to_onnx
    from abc_tvm.nn import ABCConv2d

    so = workdir / "soak_tiny.so"
    if so.exists() and Path(str(so) + ".json").exists():
        return so
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        ABCConv2d(3, 16, 3, padding=1, M=2, N=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        ABCConv2d(16, 8, 3, stride=2, padding=1, M=2, N=1, act="unipolar"))
    to_onnx(net, torch.rand(1, 3, 16, 16), workdir / "soak_tiny.onnx")
    compile_model(workdir / "soak_tiny.onnx", "x86", so, quiet=True)
    return so


def scrape_5xx(target: Target) -> dict[str, float]:
    """abc_tvm_http_responses_total by 5xx status, from /metrics."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
    conn.request("GET", "/metrics", headers=target.auth())
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for m in re.finditer(r'^abc_tvm_http_responses_total\{status="(5\d\d)"\} (\S+)$', text,
                         re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def soak(args: argparse.Namespace) -> dict:
    from abc_tvm.runtime import load

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="abc-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    so = Path(args.model) if args.model else build_model(workdir)
    model = load(so, workers=1)
    info = model.inputs[0]
    if len(model.inputs) != 1 or info.dtype != "float32":
        raise SystemExit("soak_server.py: --model must take one float32 input")
    x = np.random.default_rng(0).uniform(-0.5, 1.5, info.shape).astype(np.float32)
    expected = model.run(x)[0]
    deadline = min(10.0, args.timeout)  # the server's read deadline (serving.py)
    server = Server(so, TOKEN, args.timeout, workdir / "server.log", args.server_arg)
    target = Target("127.0.0.1", server.port, TOKEN, so.name.removesuffix(".so"), x, expected,
                    deadline)
    summary: dict = {"cpu": cpu_model(), "cores": usable_cpus(),
                     "python": platform.python_version(), "model": str(so),
                     "input_shape": list(info.shape), "server_argv": server.argv[2:],
                     "read_deadline_s": deadline, "concurrency": args.concurrency}
    try:
        warm = drive(target, args.warmup, args.concurrency)
        time.sleep(0.5)
        summary["warmup"] = warm
        summary["rss_warm_mib"] = server.rss_mib()
        summary["fds_warm"] = server.fds()
        print(f"warm-up: {warm['ok']} ok, {warm['errors']} errors; server RSS "
              f"{summary['rss_warm_mib']} MiB, {summary['fds_warm']} fds", flush=True)

        hostile = HostileLoad(target, args.slowloris).start() if not args.no_hostile else None
        good = drive(target, args.requests, args.concurrency)
        summary["good"] = good
        print(f"good: {good['ok']}/{good['requests']} ok, {good['errors']} errors, "
              f"{good['rps']} req/s, p50 {good['p50_ms']} ms, p99 {good['p99_ms']} ms",
              flush=True)
        if hostile is not None:
            hostile.stop()
            summary["hostile"] = {n: vars(s) for n, s in sorted(hostile.stats.items())}
        time.sleep(1.0)  # let closed connections go
        summary["alive_after"] = alive_and_correct(target) or "ok"
        summary["rss_end_mib"] = server.rss_mib()
        summary["fds_end"] = server.fds()
        summary["http_5xx"] = scrape_5xx(target)
    finally:
        rc = server.stop()
    log_text = server.log.read_text()
    summary["server_exit"] = rc
    summary["server_log_tracebacks"] = log_text.count("Traceback")
    summary["server_log_warnings"] = len(re.findall(r"^WARNING", log_text, re.M))
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    growth = (summary["rss_end_mib"] - summary["rss_warm_mib"]) / summary["rss_warm_mib"]
    summary["rss_growth_pct"] = round(100 * growth, 2)

    crit: dict[str, bool] = {
        "good requests: 0 errors": good["errors"] == 0 and good["ok"] == args.requests,
        f"RSS growth < {args.max_rss_growth:g}%": 100 * growth < args.max_rss_growth,
        f"p99 < {args.max_p99_ms:g} ms": good["p99_ms"] < args.max_p99_ms,
        "server alive and correct afterwards": summary["alive_after"] == "ok",
        "no 5xx on /metrics": not any(summary["http_5xx"].values()),
        "no traceback in the server log": summary["server_log_tracebacks"] == 0,
        "open fds back to warm-up (+4)": summary["fds_end"] <= summary["fds_warm"] + 4,
        "server exits 0 on SIGTERM": rc == 0,
    }
    if "hostile" in summary:
        for name in (*HOSTILE, *SLOW):
            s = summary["hostile"].get(name)
            crit[f"hostile {name}"] = bool(s) and s["runs"] > 0 and s["failures"] == 0
    summary["criteria"] = crit
    summary["passed"] = all(crit.values())
    return summary


def report(summary: dict) -> str:
    lines = [f"CPU: {summary['cpu']} ({summary['cores']} usable cores), Python "
             f"{summary['python']}; model {Path(summary['model']).name} "
             f"{summary['input_shape']}; server read deadline {summary['read_deadline_s']:g} s"]
    g = summary["good"]
    lines.append(f"good requests: {g['ok']}/{g['requests']} ok, {g['errors']} errors"
                 f"{' (first: ' + g['first_error'] + ')' if g['errors'] else ''}, "
                 f"{g['rps']} req/s, p50 {g['p50_ms']} ms, p99 {g['p99_ms']} ms, "
                 f"max {g['max_ms']} ms, {g['seconds']} s")
    lines.append(f"server RSS: {summary['rss_warm_mib']} MiB after warm-up, "
                 f"{summary['rss_end_mib']} MiB at the end ({summary['rss_growth_pct']:+.2f}%); "
                 f"fds {summary['fds_warm']} -> {summary['fds_end']}")
    lines.append(f"afterwards: {summary['alive_after']}; 5xx: {summary['http_5xx'] or 'none'}; "
                 f"server log: {summary['server_log_tracebacks']} tracebacks, "
                 f"{summary['server_log_warnings']} WARNING lines; exit {summary['server_exit']}")
    for name, s in summary.get("hostile", {}).items():
        statuses = ", ".join(f"{k} x{v}" for k, v in s["statuses"].items())
        if s["close_s"]:
            statuses = statuses.replace("N s", "{:.1f}-{:.1f} s".format(*s["close_s"]))
        flag = "ok  " if s["failures"] == 0 else "FAIL"
        lines.append(f"  {flag} {name:28s} {s['runs']:4d} runs: {statuses}"
                     + (f"  -- {s['first_failure']}" if s["failures"] else ""))
    failed = [k for k, v in summary["criteria"].items() if not v]
    lines.append("PASS" if not failed else "FAIL: " + "; ".join(failed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="serve this .so (default: compile a small one)")
    p.add_argument("--workdir", default=None, help="where the model and server log go")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1000, help="good requests before the baseline")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="the server's --timeout (its read deadline is min(10, this))")
    p.add_argument("--slowloris", type=int, default=16,
                   help="connections trickling request heads at once")
    p.add_argument("--no-hostile", action="store_true", help="good traffic only")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    p.add_argument("--max-p99-ms", type=float, default=2000.0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for abc-tvm serve (repeatable)")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    summary = soak(args)
    print(report(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
