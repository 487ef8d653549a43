"""abc_tvm._inspect_fix: the getmodule shortcut answers exactly as inspect's own."""

from __future__ import annotations

import builtins
import inspect
import sys

from abc_tvm import _inspect_fix


def _objects() -> list[tuple[object, str | None]]:
    frame = sys._getframe()
    code = compile("x = 1", "<string>", "exec")
    return [
        (frame, "<frozen importlib._bootstrap>"),  # frames of a pseudo-file: no module
        (frame.f_code, "<ast>"),
        (code, "<string>"),
        (builtins.len, "<frozen builtins>"),  # has __module__: the original path
        (inspect, None),  # a module is its own
        (_objects, __file__),  # a real file
        (print, "<stdin>"),
    ]


def test_shortcut_matches_inspect():
    assert inspect.getmodule is _inspect_fix._getmodule  # abc_tvm installs it on import
    for obj, filename in _objects():
        assert _inspect_fix._getmodule(obj, filename) is _inspect_fix._original(obj, filename), (
            obj, filename)
