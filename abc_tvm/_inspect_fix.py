"""Make TVMScript parsing fast in a process with many modules loaded (torch is, always).

Every `@T.prim_func` calls `inspect.stack()`, which looks up the module of each frame with
`inspect.getmodule`. A frame of a pseudo-file (`<frozen importlib._bootstrap>` during an
import, `<ast>`, `<string>`) matches no module's `__file__`, so getmodule scans all of
`sys.modules` for it, every time. apache-tvm-ffi imports torch whenever it is installed
(~2000 modules), and `import tvm.s_tir.meta_schedule` parses the tensor intrinsics at import:
measured on a 2-core Zen 3 box, that import took 63 s, and every MetaSchedule builder and
runner worker paid it again at start. The shortcut below gives the same answer for those
frames without the scan; it takes under a second.

Kept free of TVM imports: MetaSchedule workers run `install()` as their initializer before
they import TVM's meta_schedule.
"""

from __future__ import annotations

import inspect
import sys

_original = inspect.getmodule


def _getmodule(object, _filename=None):  # noqa: A002 (inspect's own signature)
    """inspect.getmodule, answering pseudo-files without the scan over sys.modules.

    Same result as the original: such a file belongs to no module, so getmodule ends by
    checking whether the object is a global of __main__ or builtins (frames never are).
    """
    if (_filename is None or not (_filename.startswith("<") and _filename.endswith(">"))
            or inspect.ismodule(object) or hasattr(object, "__module__")
            or _filename in inspect.modulesbyfile):
        return _original(object, _filename)
    name = getattr(object, "__name__", None)
    if name is None:
        return None
    for modname in ("__main__", "builtins"):
        module = sys.modules.get(modname)
        if module is not None and getattr(module, name, None) is object:
            return module
    return None


def install() -> None:
    """Install the shortcut (idempotent); also the initializer of MetaSchedule workers."""
    inspect.getmodule = _getmodule
