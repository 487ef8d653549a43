"""Arguments of `abc-tvm serve` (kept apart from the server so `--help` needs no web stack)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_BATCH_DELAY_MS = 2.0
TOKEN_ENV = "ABC_TVM_TOKEN"


def byte_size(text: str) -> int:
    """`65536`, `512K`, `64M` or `1G` as a number of bytes (argparse type)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (e.g. 1048576, 512K, 64M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive (got {text!r})")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text!r})")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more (got {text!r})")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {text!r})")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (got {text!r})")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", type=Path, help="compiled .so files to serve")
    p.add_argument("--model-dir", type=Path, default=None, help="serve every .so in DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: pick a free one)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help="require 'Authorization: Bearer TOKEN' on every route but health "
                        f"(default: ${TOKEN_ENV}, which keeps it out of the process list)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="inferences run at once, one VM each (default: usable CPUs)")
    p.add_argument("--max-body-bytes", type=byte_size, default=DEFAULT_MAX_BODY_BYTES,
                   help="refuse larger request bodies with 413 (default: 64M)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                   help="seconds to read a request body and to run it (default: 30)")
    p.add_argument("--read-timeout", type=_positive_float, default=None,
                   help="seconds a connection has to send each request head before it is "
                        "closed (slow clients, slowloris; default: min(10, --timeout))")
    p.add_argument("--max-connections", type=_positive_int, default=None,
                   help="connections and requests served at once; more get 503 at once "
                        "(default: no limit)")
    p.add_argument("--max-batch-delay-ms", type=_non_negative_float,
                   default=DEFAULT_BATCH_DELAY_MS,
                   help="dynamic batching, for models compiled with batch > 1: how long the "
                        "first request waits for others to fill the batch (default: 2)")
    p.add_argument("--no-batching", action="store_true",
                   help="turn dynamic batching off: requests must match the compiled batch")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/Inf inputs (by default refused: binarisation maps NaN to 0)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
