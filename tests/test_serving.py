"""`abc-tvm serve` through a real Triton client: metadata, infer, bad input, load, shutdown.

Servers run in-process on a free 127.0.0.1 port (or as an `abc-tvm serve` subprocess) and
are always stopped; nothing here talks to anything but loopback.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from abc_tvm.compiler import compile_model
from abc_tvm.export import to_onnx
from abc_tvm.nn import ABCConv2d
from abc_tvm.runtime import load
from abc_tvm.serving import BackgroundServer, ServeOptions

TOKEN = "s3cret-token"
SHAPE = (1, 3, 8, 8)
OUT_SHAPE = (1, 4, 4, 4)
MAX_BODY = 64 << 10


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ABCConv2d(3, 8, 3, padding=1, M=2, N=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ABCConv2d(8, 4, 3, stride=2, padding=1, M=2, N=1, act="unipolar"),
    )


class Ref:
    """ONNX Runtime on the same ONNX file: the expected answers."""

    def __init__(self, onnx_path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(onnx_path), opts)
        self.batch = self.sess.get_inputs()[0].shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Rows of x (zero-padded to the compiled batch), as the served model must answer."""
        pad = np.zeros((self.batch - x.shape[0], *x.shape[1:]), np.float32)
        return self.sess.run(None, {"input": np.concatenate([x, pad])})[0][: x.shape[0]]


def assert_close(y: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.fixture(scope="module")
def modules(tmp_path_factory) -> dict:
    """tiny.so (batch 1) and tiny4.so (batch 4, the same net) in one directory."""
    d = tmp_path_factory.mktemp("models")
    net = tiny_net()
    out = {"dir": d}
    for name, batch in (("tiny", 1), ("tiny4", 4)):
        to_onnx(net, torch.rand(batch, 3, 8, 8), d / f"{name}.onnx")
        compile_model(d / f"{name}.onnx", "x86", d / f"{name}.so", quiet=True)
        out[name] = d / f"{name}.so"
        out[name + "_ref"] = Ref(d / f"{name}.onnx")
    (d / "onnx").mkdir()
    for f in d.glob("*.onnx"):
        shutil.move(f, d / "onnx" / f.name)  # the model dir then holds only modules
    return out


@pytest.fixture(scope="module")
def server(modules):
    models = [load(modules["tiny"], workers=2), load(modules["tiny4"], workers=2)]
    options = ServeOptions(token=TOKEN, max_body_bytes=MAX_BODY, timeout_s=10,
                           max_batch_delay_ms=20)
    with BackgroundServer(models, options) as s:
        yield s


def auth() -> dict[str, str]:
    """A fresh header dict each call: tritonclient adds its own keys to the one it gets."""
    return {"Authorization": f"Bearer {TOKEN}"}


def client(server: BackgroundServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address, connection_timeout=30,
                                        network_timeout=30)


def infer_input(x: np.ndarray, binary: bool, datatype: str = "FP32") -> triton.InferInput:
    i = triton.InferInput("input", list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def raw(server: BackgroundServer, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=auth() if headers is None else headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data), dict(r.getheaders())
    finally:
        conn.close()


def metric(server: BackgroundServer, name: str, **labels: str) -> float:
    text = raw_text(server, "/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def raw_text(server: BackgroundServer, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers=auth())
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def rand(rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 1.5, (rows, *SHAPE[1:])).astype(np.float32)


# ---------------------------------------------------------------------------------------------


def test_health_and_metadata(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()  # health needs no token
    meta = c.get_server_metadata(headers=auth())
    assert meta["name"] == "abc-tvm" and "binary_tensor_data" in meta["extensions"]
    for version in ("", "1"):
        m = c.get_model_metadata("tiny", model_version=version, headers=auth())
        assert m["name"] == "tiny" and m["versions"] == ["1"]
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": list(SHAPE)}]
        assert m["outputs"] == [{"name": "output", "datatype": "FP32",
                                 "shape": list(OUT_SHAPE)}]
        assert c.is_model_ready("tiny", model_version=version, headers=auth())
    batched = c.get_model_metadata("tiny4", headers=auth())
    assert batched["inputs"][0]["shape"] == [-1, 3, 8, 8]
    config = c.get_model_config("tiny4", headers=auth())
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [3, 8, 8]
    index = c.get_model_repository_index(headers=auth())
    assert sorted(m["name"] for m in index) == ["tiny", "tiny4"]
    assert not c.is_model_ready("nope", headers=auth())
    assert not c.is_model_ready("tiny", model_version="2", headers=auth())


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False),
                                                   (False, True)])
def test_infer_matches_onnxruntime(server, modules, binary_in, binary_out):
    x = rand(seed=3)
    out = triton.InferRequestedOutput("output", binary_data=binary_out)
    r = client(server).infer("tiny", [infer_input(x, binary_in)], outputs=[out],
                             headers=auth(), request_id="req-7")
    y = r.as_numpy("output")
    assert y.shape == OUT_SHAPE and y.dtype == np.float32
    assert_close(y, modules["tiny_ref"](x))
    assert r.get_response()["id"] == "req-7"


def test_infer_versioned_gzip_and_default_outputs(server, modules):
    x = rand(seed=4)
    c = client(server)
    for compression in (None, "gzip", "deflate"):
        r = c.infer("tiny", [infer_input(x, True)], model_version="1", headers=auth(),
                    request_compression_algorithm=compression)
        assert_close(r.as_numpy("output"), modules["tiny_ref"](x))
    with pytest.raises(InferenceServerException, match="version") as e:
        c.infer("tiny", [infer_input(x, True)], model_version="2", headers=auth())
    assert e.value.status() == "404"


def _json_request(data: object, shape: object = list(SHAPE), datatype: str = "FP32",
                  name: str = "input", **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                   "data": data}], **extra}).encode()


GOOD = rand(seed=5).ravel().tolist()
INFER = "/v2/models/tiny/infer"
BAD_REQUESTS = {
    # name: (path, body, extra headers, status, words the error must contain)
    "malformed JSON": (INFER, b'{"inputs": [', {}, 400, ["malformed json"]),
    "JSON not an object": (INFER, b"[1, 2]", {}, 400, ["json object"]),
    "no inputs": (INFER, b"{}", {}, 400, ["inputs"]),
    "unknown model": ("/v2/models/nope/infer", _json_request(GOOD), {}, 404,
                      ["unknown model", "nope"]),
    "unknown version": ("/v2/models/tiny/versions/3/infer", _json_request(GOOD), {}, 404,
                        ["version"]),
    "unknown input": (INFER, _json_request(GOOD, name="image"), {}, 400, ["no input", "image"]),
    "wrong shape": (INFER, _json_request(GOOD, shape=[1, 3, 16, 4]), {}, 400, ["shape"]),
    "bad shape value": (INFER, _json_request(GOOD, shape="1x3x8x8"), {}, 400, ["shape"]),
    "wrong dtype": (INFER, _json_request(GOOD, datatype="INT32"), {}, 400,
                    ["datatype", "FP32"]),
    "too few elements": (INFER, _json_request(GOOD[:10]), {}, 400, ["10 element", "192"]),
    "too many elements": (INFER, _json_request(GOOD + [0.5]), {}, 400, ["193 element"]),
    "strings in data": (INFER, _json_request(["a"] * 192), {}, 400, ["numbers"]),
    "booleans in data": (INFER, _json_request([True] * 192), {}, 400, ["numbers"]),
    "ragged data": (INFER, _json_request([[1.0], [1.0, 2.0]]), {}, 400, ["list of numbers"]),
    "NaN in JSON": (INFER, _json_request([float("nan")] + GOOD[1:]), {}, 400, ["nan"]),
    "Inf in JSON": (INFER, _json_request([float("inf")] + GOOD[1:]), {}, 400, ["inf"]),
    "overflowing value": (INFER, _json_request([1e300] + GOOD[1:]), {}, 400, ["inf"]),
    "no data": (INFER, json.dumps({"inputs": [{"name": "input", "shape": list(SHAPE),
                                               "datatype": "FP32"}]}).encode(), {}, 400,
                ["neither"]),
    "unknown output": (INFER, _json_request(GOOD, outputs=[{"name": "logits"}]), {}, 400,
                       ["no output", "logits"]),
    "classification": (INFER, _json_request(GOOD, outputs=[
        {"name": "output", "parameters": {"classification": 3}}]), {}, 400, ["classification"]),
    "too large body": (INFER, b" " * (MAX_BODY + 1), {}, 413, ["limit"]),
    "gzip bomb": (INFER, gzip.compress(b" " * (MAX_BODY * 4)), {"Content-Encoding": "gzip"},
                  413, ["decompressed"]),
    "bad gzip": (INFER, b"not gzip at all", {"Content-Encoding": "gzip"}, 400, ["decompress"]),
    "unknown encoding": (INFER, _json_request(GOOD), {"Content-Encoding": "br"}, 415, ["br"]),
    "bad header length": (INFER, _json_request(GOOD), {"Inference-Header-Content-Length": "x"},
                          400, ["inference-header-content-length"]),
    "header length past body": (INFER, _json_request(GOOD),
                                {"Inference-Header-Content-Length": "99999"}, 400,
                                ["inference-header-content-length"]),
    "unknown route": ("/v2/nothing/here", None, {}, 404, ["no route"]),
    "batch too big": ("/v2/models/tiny4/infer", _json_request(GOOD * 5, shape=[5, 3, 8, 8]), {},
                      400, ["shape", "n <= 4"]),
}


def _binary_request(x: np.ndarray, size: int | None = None, datatype: str = "FP32",
                    shape: list[int] | None = None, extra: bytes = b"") -> tuple[bytes, dict]:
    raw_data = x.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": shape or list(x.shape),
                                   "datatype": datatype,
                                   "parameters": {"binary_data_size": size or len(raw_data)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + raw_data + extra, {"Inference-Header-Content-Length": str(len(head))}


def _bad_binary() -> dict:
    x = rand(seed=6)
    nan, inf = x.copy(), x.copy()
    nan[0, 0, 0, 0], inf[0, 2, 7, 7] = np.nan, -np.inf
    cases = {
        "binary size mismatch": (_binary_request(x, size=100), ["binary_data_size", "768"]),
        "binary body too short": (_binary_request(x[..., :4], shape=list(SHAPE)),
                                  ["binary_data_size"]),
        "binary extra bytes": (_binary_request(x, extra=b"1234"), ["no input claims"]),
        "binary NaN": (_binary_request(nan), ["nan"]),
        "binary Inf": (_binary_request(inf), ["inf"]),
        "binary FP64": (_binary_request(x.astype(np.float64), datatype="FP64"), ["FP32"]),
    }
    return {k: (INFER, body, h, 400, words) for k, ((body, h), words) in cases.items()}


BAD_REQUESTS.update(_bad_binary())


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_clear_4xx_and_the_server_keeps_serving(server, modules, case,
                                                                 caplog):
    path, body, headers, status, words = BAD_REQUESTS[case]
    with caplog.at_level(logging.WARNING):
        got, reply, _ = raw(server, "POST" if body is not None else "GET", path, body,
                            {**auth(), **headers})
        assert got == status, reply
        assert set(reply) == {"error"} and isinstance(reply["error"], str)
        for w in words:
            assert w.lower() in reply["error"].lower(), reply["error"]
        x = rand(seed=9)
        r = client(server).infer("tiny", [infer_input(x, True)], headers=auth())
        assert_close(r.as_numpy("output"), modules["tiny_ref"](x))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_bad_input_through_the_triton_client(server):
    """The same mistakes as a Triton user makes them: the client raises with our message."""
    c = client(server)
    cases = [
        (infer_input(np.zeros((1, 3, 8, 7), np.float32), True), "shape", "400"),
        (infer_input(np.zeros(SHAPE, np.float64), True, "FP64"), "datatype", "400"),
        (infer_input(np.full(SHAPE, np.nan, np.float32), False), "NaN", "400"),
        (infer_input(np.full(SHAPE, np.inf, np.float32), True), "Inf", "400"),
    ]
    for inp, word, status in cases:
        with pytest.raises(InferenceServerException, match=word) as e:
            c.infer("tiny", [inp], headers=auth())
        assert e.value.status() == status
    with pytest.raises(InferenceServerException, match="unknown model") as e:
        c.infer("resnet", [infer_input(rand(), True)], headers=auth())
    assert e.value.status() == "404"
    big = np.zeros((1, 3, 128, 128), np.float32)  # 196 KiB > the 64 KiB limit
    with pytest.raises(InferenceServerException, match="limit") as e:
        c.infer("tiny", [infer_input(big, True)], headers=auth())
    assert e.value.status() == "413"


def test_token_guards_every_route_but_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/tiny"),
                             ("POST", INFER), ("GET", "/metrics"), ("GET", "/v2/other")):
            status, reply, h = raw(server, method, path, b"{}" if method == "POST" else None,
                                   headers)
            assert status == 401, (headers, path)
            assert "token" in reply["error"] and h.get("www-authenticate") == "Bearer"
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert raw(server, "GET", path, headers={})[0] == 200
    with pytest.raises(InferenceServerException, match="token") as e:
        client(server).get_model_metadata("tiny")
    assert e.value.status() == "401"


def test_metrics_count_requests_errors_and_latency(server):
    before = metric(server, "abc_tvm_infer_requests_total", model="tiny")
    errors = metric(server, "abc_tvm_infer_errors_total", model="tiny", status="400")
    c = client(server)
    for _ in range(3):
        c.infer("tiny", [infer_input(rand(), True)], headers=auth())
    with pytest.raises(InferenceServerException):
        c.infer("tiny", [infer_input(np.zeros((1, 3, 8, 7), np.float32), True)], headers=auth())
    assert metric(server, "abc_tvm_infer_requests_total", model="tiny") == before + 4
    assert metric(server, "abc_tvm_infer_errors_total", model="tiny", status="400") == errors + 1
    assert metric(server, "abc_tvm_infer_latency_seconds_count", model="tiny") >= 3
    assert metric(server, "abc_tvm_infer_latency_seconds_bucket", model="tiny", le="+Inf") >= 3


def test_concurrent_clients_all_get_their_own_answers(server, modules):
    """16 threads x 50 requests, JSON and binary mixed, every answer checked."""
    xs = [rand(seed=100 + k) for k in range(16)]
    refs = [modules["tiny_ref"](x) for x in xs]
    failures: list[str] = []

    def worker(k: int) -> None:
        c = client(server)
        try:
            for n in range(50):
                binary = (n + k) % 2 == 0
                out = triton.InferRequestedOutput("output", binary_data=binary)
                r = c.infer("tiny", [infer_input(xs[k], binary)], outputs=[out], headers=auth())
                y = r.as_numpy("output")
                if y.shape != OUT_SHAPE or not np.allclose(y, refs[k], rtol=1e-4,
                                                           atol=1e-4 * np.abs(refs[k]).max()):
                    failures.append(f"thread {k} request {n}")
        except Exception as e:  # reported below, with the thread
            failures.append(f"thread {k}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]


def test_dynamic_batching_merges_concurrent_requests(server, modules):
    """A batch-4 model answers requests of 1-3 rows, merged into shared calls."""
    ref = modules["tiny4_ref"]
    count0 = metric(server, "abc_tvm_batch_rows_count", model="tiny4")
    rows0 = metric(server, "abc_tvm_batch_rows_sum", model="tiny4")
    failures: list[str] = []

    def worker(k: int) -> None:
        c = client(server)
        try:
            for n in range(10):
                x = rand(rows=1 + (k + n) % 3, seed=1000 * k + n)
                r = c.infer("tiny4", [infer_input(x, n % 2 == 0)], headers=auth())
                y = r.as_numpy("output")
                if y.shape != (x.shape[0], 4, 4, 4) or not np.allclose(
                        y, ref(x), rtol=1e-4, atol=1e-4 * np.abs(ref(x)).max()):
                    failures.append(f"thread {k} request {n}")
        except Exception as e:
            failures.append(f"thread {k}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    batches = metric(server, "abc_tvm_batch_rows_count", model="tiny4") - count0
    rows = metric(server, "abc_tvm_batch_rows_sum", model="tiny4") - rows0
    assert rows == sum(1 + (k + n) % 3 for k in range(8) for n in range(10))
    assert 0 < batches < 80, "80 requests should share fewer than 80 model calls"
    assert rows / batches > 1.2


def _partial_post(port: int, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared
                 + sent)
    return sock


def test_timeouts_slow_bodies_dropped_clients_and_allow_nonfinite(modules, caplog):
    """504 when a batch waits 2 s for company under a 0.3 s timeout; 408 for a body that
    never arrives; a client vanishing mid-body is no crash; the server goes on. And
    --allow-nonfinite lets NaN through, for models that can take it."""
    options = ServeOptions(timeout_s=0.3, max_batch_delay_ms=2000, allow_nonfinite=True)
    with caplog.at_level(logging.WARNING), BackgroundServer(
            [load(modules["tiny4"], workers=1), load(modules["tiny"])], options) as s:
        t0 = time.perf_counter()
        with pytest.raises(InferenceServerException, match="did not answer") as e:
            client(s).infer("tiny4", [infer_input(rand(), True)])
        assert e.value.status() == "504" and time.perf_counter() - t0 < 1.5
        with _partial_post(s.port, 1000, b'{"inputs": [') as sock:
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 408
            assert "not received within" in json.loads(reply.read())["error"]
        _partial_post(s.port, 1000, b'{"inputs": [').close()
        time.sleep(0.1)
        x = rand(seed=11)
        r = client(s).infer("tiny", [infer_input(x, True)])
        assert_close(r.as_numpy("output"), modules["tiny_ref"](x))
        x[0, 0, 0, 0] = np.nan
        assert client(s).infer("tiny", [infer_input(x, True)]).as_numpy("output").shape == \
            OUT_SHAPE
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_graceful_shutdown_finishes_in_flight_requests(modules):
    """Stop while a request sits in a 700 ms batch window: it still gets its answer."""
    s = BackgroundServer([load(modules["tiny4"], workers=1)],
                         ServeOptions(max_batch_delay_ms=700)).start()
    x = rand(rows=2, seed=12)
    result: dict = {}

    def request() -> None:
        try:
            result["y"] = client(s).infer("tiny4", [infer_input(x, True)]).as_numpy("output")
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=request)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while metric(s, "abc_tvm_inflight_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(s, "abc_tvm_inflight_requests") == 1
    finally:
        s.stop()  # blocks until in-flight requests are answered
    t.join(10)
    assert "error" not in result, result
    assert_close(result["y"], modules["tiny4_ref"](x))
    with pytest.raises(ConnectionError):
        http.client.HTTPConnection("127.0.0.1", s.port, timeout=5).connect()


# ---------------------------------------------------------------------------------------------
# The command line


def serve_main(capsys, *args: str) -> str:
    """`abc-tvm serve ARGS` in-process (start-up errors come before any server or TVM
    thread exists): the one stderr line, after checking the exit status 2."""
    from abc_tvm.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("abc-tvm serve: error:"), err
    return err[0]


def test_cli_refuses_bad_arguments_at_start(modules, tmp_path, capsys):
    assert "no models" in serve_main(capsys)
    assert "no such module" in serve_main(capsys, str(tmp_path / "missing.so"))
    assert "not a directory" in serve_main(capsys, "--model-dir", str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    assert "no .so" in serve_main(capsys, "--model-dir", str(tmp_path / "empty"))
    onnx_path = str(modules["dir"] / "onnx" / "tiny.onnx")
    assert "not a compiled module" in serve_main(capsys, str(modules["tiny"]), onnx_path)
    (tmp_path / "other").mkdir()
    copy = tmp_path / "other" / "tiny.so"
    shutil.copy(modules["tiny"], copy)
    assert "unique" in serve_main(capsys, str(modules["tiny"]), str(copy))


def test_cli_refuses_a_tampered_module(modules, tmp_path):
    bad = tmp_path / "bad.so"
    data = bytearray(modules["tiny"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    shutil.copy(str(modules["tiny"]) + ".json", str(bad) + ".json")
    proc = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "serve", str(bad), "--port",
                           "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abc-tvm serve: error:"), proc.stderr
    assert "sha256" in lines[0] and "bad.so" in lines[0]
    assert proc.stdout == ""  # refused before it listened


def test_cli_serves_a_model_dir_and_stops_cleanly_on_sigterm(modules):
    proc = subprocess.Popen(
        [sys.executable, "-m", "abc_tvm.cli", "serve", "--model-dir", str(modules["dir"]),
         "--port", "0", "--token", TOKEN, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "tiny, tiny4" in line, (line, proc.stderr.read()
                                                                      if proc.poll() else "")
        address = line.split("http://")[1].split()[0]
        c = triton.InferenceServerClient(address)
        assert c.is_server_ready()
        x = rand(seed=13)
        r = c.infer("tiny", [infer_input(x, True)], headers=auth())
        assert_close(r.as_numpy("output"), modules["tiny_ref"](x))
        x4 = rand(rows=3, seed=14)
        r = c.infer("tiny4", [infer_input(x4, False)], headers=auth())
        assert_close(r.as_numpy("output"), modules["tiny4_ref"](x4))
        with pytest.raises(InferenceServerException) as e:
            c.infer("tiny", [infer_input(rand(), True)])
        assert e.value.status() == "401"
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in out
