"""Arguments of `abc-tvm serve` (kept apart from the server so `--help` needs no web stack)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", type=Path, help="compiled .so files to serve")
    p.add_argument("--model-dir", type=Path, default=None, help="serve every .so in DIR")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'")
