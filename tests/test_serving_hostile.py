"""`abc-tvm serve` against hostile clients: the cases of benchmarks/soak_server.py (imported
from there) against an in-process server with a 1 s read deadline.

Each fast case must get a 4xx with a JSON {"error": ...} body (the status is pinned here,
apart from the case's own check), each slowloris must be closed by the server's deadline,
and after each a good client must still get the right answer (ONNX Runtime's, as in
test_serving.py). Plus: no 5xx and no ERROR log line, a deadline that never cuts a running
inference, pipelined requests, indented JSON under the JSON size cap, and a short soak with
the hostile clients running alongside.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_serving import (  # noqa: F401  (modules: the compiled tiny models, a fixture)
    TOKEN,
    assert_close,
    modules,
    rand,
)

from abc_tvm import serving
from abc_tvm.runtime import load
from abc_tvm.serving import BackgroundServer, ServeOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak_server as soak  # noqa: E402

DEADLINE_S = 1.0

# The status each fast case must get (soak_server's own check must pass too).
EXPECTED: dict[str, int | str | tuple] = {
    "disconnect_mid_body": "client hung up",
    "reset_mid_body": "client hung up",
    "garbage_body_1mb": 413,  # larger than a JSON request for tiny can be
    "garbage_stream_1mb": 400,
    "content_length_short": 400,
    "content_length_not_a_number": 400,
    "content_length_negative": 400,
    "binary_header_past_body": 400,
    "binary_header_negative": 400,
    "binary_data_short": 400,
    "binary_data_size_huge": 400,
    "json_bomb_deep_array": 400,
    "json_bomb_deep_object": 400,
    "json_bomb_big_number": 400,
    "json_bomb_huge_array": 413,
    "missing_token": 401,
    "wrong_token": 401,
    **{name: 404 for name in soak.TRAVERSALS},
}


@pytest.fixture(scope="module")
def served(modules):  # noqa: F811
    """(server, soak target) for tiny.so, with a token and a 1 s deadline."""
    options = ServeOptions(token=TOKEN, timeout_s=DEADLINE_S)
    with BackgroundServer([load(modules["tiny"], workers=2)], options) as s:
        x = rand(seed=21)
        target = soak.Target("127.0.0.1", s.port, TOKEN, "tiny", x, modules["tiny_ref"](x),
                             options.read_deadline_s)
        yield s, target


def no_errors_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, caplog.text


def test_expected_table_covers_every_case():
    assert set(EXPECTED) == set(soak.HOSTILE)


@pytest.mark.parametrize("name", list(soak.HOSTILE))
def test_hostile_request_gets_a_json_4xx_and_the_server_goes_on(served, name, caplog):
    _, target = served
    before = soak.scrape_5xx(target)
    with caplog.at_level(logging.WARNING):
        out = soak.HOSTILE[name](target)
        assert out.status == EXPECTED[name], (out.status, out.detail)
        assert out.ok, (out.status, out.detail)
        y = soak.GoodClient(target).infer(binary=True)
        assert_close(y, target.expected)
    no_errors_logged(caplog)
    assert soak.scrape_5xx(target) == before  # no new 5xx


@pytest.mark.parametrize("name", list(soak.SLOW))
def test_slow_client_is_closed_by_the_deadline(served, name, caplog):
    _, target = served
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        out = soak.SLOW[name](target)
        assert out.ok, (out.status, out.detail)
        assert_close(soak.GoodClient(target).infer(binary=False), target.expected)
    assert time.perf_counter() - t0 < 2 * DEADLINE_S + soak.slack(target) + 1
    no_errors_logged(caplog)


def test_slowloris_does_not_starve_good_clients(served):
    """32 trickling connections at once; meanwhile 200 good requests, each answered fast."""
    _, target = served
    results: list[soak.Outcome] = []
    threads = [threading.Thread(target=lambda: results.append(soak.slowloris_headers(target)))
               for _ in range(32)]
    for t in threads:
        t.start()
    good = soak.drive(target, 200, 4)
    for t in threads:
        t.join(30)
    assert good["errors"] == 0 and good["ok"] == 200, good
    assert good["max_ms"] < 1000, good
    assert len(results) == 32 and all(r.ok for r in results), [r.detail for r in results]


def test_deadline_never_cuts_a_running_inference(modules):  # noqa: F811
    """A request waiting 1 s for its batch outlives a 0.2 s head deadline."""
    options = ServeOptions(timeout_s=5, read_timeout_s=0.2, max_batch_delay_ms=1000)
    with BackgroundServer([load(modules["tiny4"], workers=1)], options) as s:
        x = rand(rows=1, seed=22)
        target = soak.Target("127.0.0.1", s.port, None, "tiny4", x, modules["tiny4_ref"](x),
                             0.2)
        t0 = time.perf_counter()
        y = soak.GoodClient(target).infer(binary=True)
        assert time.perf_counter() - t0 > 0.9
        assert_close(y, target.expected)
        # and an idle connection is still closed on time
        took, _ = soak.wait_closed(target.connect(), 5)
        assert took is not None and took < 0.2 + 1.5


def test_pipelined_requests_are_answered_then_the_idle_connection_closed(served):
    """Three requests in one write: three right answers, then the deadline closes it."""
    _, target = served
    body, headers = soak.good_request(target, binary=True)
    one = soak.http_bytes("POST", target.infer_path, body, {**target.auth(), **headers})
    sock = target.connect()
    try:
        sock.sendall(one * 3)
        took, got = soak.wait_closed(sock, 10)
    finally:
        sock.close()
    assert took is not None and took < DEADLINE_S + 1.5
    for _ in range(3):
        head, _, got = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        reply, got = got[:int(fields[b"content-length"])], got[int(fields[b"content-length"]):]
        n = int(fields[b"inference-header-content-length"])
        y = np.frombuffer(reply[n:], "<f4").reshape(target.expected.shape)
        assert_close(y, target.expected)
    assert got == b""


def test_indented_json_fits_under_the_json_cap(served):
    """The cap on JSON requests leaves room for pretty-printed nested data."""
    _, target = served
    data = np.round(target.x.astype(np.float64) - 1e-7, 17).tolist()  # long reprs, nested
    entry = {"name": "input", "shape": list(target.x.shape), "datatype": "FP32"}
    body = json.dumps({"inputs": [{**entry, "data": data}]}, indent=4).encode()
    bare = json.dumps({"inputs": [{**entry, "data": []}]}, indent=4).encode()
    per_number = (len(body) - len(bare)) / target.x.size
    assert 40 < per_number < serving.JSON_BYTES_PER_NUMBER  # as wordy as JSON tensors get
    reply = soak.exchange(target, soak.http_bytes(
        "POST", target.infer_path, body, {**target.auth(), "Content-Type": "application/json"}))
    assert reply.status == 200, reply.short()
    y = np.asarray(json.loads(reply.body)["outputs"][0]["data"], np.float32)
    assert_close(y.reshape(target.expected.shape), target.expected)


def test_short_soak_with_hostile_clients_alongside(served, caplog):
    """300 good requests at concurrency 16 while every hostile case loops: 0 errors."""
    _, target = served
    before = soak.scrape_5xx(target)
    with caplog.at_level(logging.WARNING):
        hostile = soak.HostileLoad(target, slowloris=4).start()
        good = soak.drive(target, 300, 16)
        hostile.stop()
        assert good["errors"] == 0 and good["ok"] == 300, good
        failed = {n: s.first_failure for n, s in hostile.stats.items() if s.failures}
        assert not failed, failed
        assert set(hostile.stats) == set(soak.HOSTILE) | set(soak.SLOW)
        assert soak.alive_and_correct(target) is None
    no_errors_logged(caplog)
    assert soak.scrape_5xx(target) == before  # no new 5xx


def test_socket_helpers_see_a_dead_server():
    """The soak's own checks fail against nothing listening (they can fail)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    x = rand()
    target = soak.Target("127.0.0.1", port, None, "tiny", x, x, DEADLINE_S)
    assert soak.alive_and_correct(target) is not None
    assert soak.expect_json_4xx(soak.Reply(status=500, content_type="application/json",
                                           body=b'{"error": "x"}')).ok is False
    assert soak.expect_json_4xx(soak.Reply(status=400, content_type="text/plain",
                                           body=b"Invalid")).ok is False


def test_max_connections_sheds_load_with_503_and_recovers(modules):  # noqa: F811
    """--max-connections N: with N connections held open, the next request is refused at
    once (503), not queued; once they close, requests are served right again."""
    options = ServeOptions(token=TOKEN, timeout_s=5, read_timeout_s=5, max_connections=2)
    with BackgroundServer([load(modules["tiny"], workers=1)], options) as s:
        x = rand(seed=22)
        target = soak.Target("127.0.0.1", s.port, TOKEN, "tiny", x, modules["tiny_ref"](x),
                             options.read_deadline_s)
        held = [target.connect() for _ in range(2)]
        time.sleep(0.2)
        try:
            sock = target.connect()
            sock.sendall(soak.http_bytes("GET", "/v2/health/live"))
            reply = soak.read_reply(sock, 5)
            sock.close()
            assert reply.status == 503, reply.short()
        finally:
            for h in held:
                h.close()
        time.sleep(0.2)
        assert soak.alive_and_correct(target) is None


def test_serve_flags_parse():
    import argparse

    from abc_tvm.serving_args import add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["m.so", "--read-timeout", "2.5", "--max-connections", "64"])
    assert (args.read_timeout, args.max_connections) == (2.5, 64)
    assert p.parse_args(["m.so"]).max_connections is None
