"""Deploy bundles: a compiled aarch64 model that runs on a board with no Python and no TVM.

`make_bundle(model.so, DIR)` (what `abc-tvm compile --target arm --bundle DIR` calls) writes

    DIR/model.so, DIR/model.so.json      the model and its manifest
    DIR/bin/abc-run                      the C++ runner (abc_run.cc here), cross-compiled
    DIR/lib/libtvm_runtime.so, libtvm_ffi.so   from the aarch64 apache-tvm(-ffi) wheels
    DIR/run.sh, DIR/README.md, DIR/bundle.json
    DIR/SHA256SUMS                       what run.sh checks before running (sha256sum -c)
    DIR/src/                             the runner's source and tvm-ffi headers

The runtime libraries come from the aarch64 wheels of exactly the TVM and tvm-ffi versions
installed here (a .so only loads in the runtime it was built against), fetched once with
`pip download --platform manylinux_2_28_aarch64` into the cache (~/.cache/abc-tvm, or
$ABC_TVM_CACHE); $ABC_TVM_AARCH64_WHEELS may name a directory holding the two wheels for an
offline machine. The runner is built once per content hash of its source, compiler and
headers. Where qemu-aarch64 is installed, the new bundle is run once under it before
`make_bundle` returns, so a bundle that does not load is never handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abc_tvm import targets
from abc_tvm.errors import UserError

RUNNER_DIR = Path(__file__).resolve().parent  # abc_run.cc, run.sh, README.bundle.md
RUNNER_SOURCE = RUNNER_DIR / "abc_run.cc"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_PYTHON = "3.11"
EM_AARCH64 = 183
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
BUNDLE_FORMAT = "abc-tvm-bundle/1"
# How the runner links: without --no-as-needed the runtime (which registers the Relax VM
# loader) is dropped as unused and loading a model crashes; RPATH finds lib/ beside bin/.
LINK_FLAGS = ("-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/../lib")
CXX_FLAGS = ("-std=c++17", "-O2", "-Wall")


def cache_dir() -> Path:
    """Where downloaded runtimes and built runners are kept between runs."""
    if os.environ.get("ABC_TVM_CACHE"):
        return Path(os.environ["ABC_TVM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "abc-tvm"


def versions() -> tuple[str, str]:
    """(apache-tvm, apache-tvm-ffi) versions installed here: the runtime must match them."""
    return importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock, so parallel test workers download and build only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def elf_machine(path: str | os.PathLike) -> int | None:
    """The ELF e_machine of a file (183 = aarch64, 62 = x86_64), None if it is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little")


# ------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """The aarch64 TVM runtime extracted from the wheels: libraries and ffi headers."""

    root: Path
    tvm_version: str
    ffi_version: str

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def include(self) -> Path:
        return self.root / "include"


def _download_wheels(dest: Path, tvm_version: str, ffi_version: str) -> list[Path]:
    """The two aarch64 wheels: from $ABC_TVM_AARCH64_WHEELS, else `pip download`."""
    names = {"apache_tvm": tvm_version, "apache_tvm_ffi": ffi_version}
    offline = os.environ.get("ABC_TVM_AARCH64_WHEELS")
    if offline:
        found = []
        for dist, ver in names.items():
            hits = sorted(Path(offline).glob(f"{dist}-{ver}-*aarch64*.whl"))
            if not hits:
                raise UserError(f"ABC_TVM_AARCH64_WHEELS={offline} has no {dist}-{ver} aarch64 "
                                "wheel")
            found.append(hits[0])
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version",
           WHEEL_PYTHON, "--dest", str(dest),
           f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln] or [
            ln for ln in proc.stderr.splitlines() if ln.strip()] or ["pip failed"]
        raise UserError(f"cannot fetch the aarch64 TVM runtime wheels (pip download "
                        f"apache-tvm=={tvm_version} apache-tvm-ffi=={ffi_version} for "
                        f"{WHEEL_PLATFORM}): {errors[-1].strip()}; offline, put both wheels "
                        "in a directory and set ABC_TVM_AARCH64_WHEELS to it")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 2:
        raise UserError(f"pip download gave {len(wheels)} wheels, expected apache-tvm and "
                        "apache-tvm-ffi")
    return wheels


def _extract(wheels: list[Path], out: Path) -> None:
    """Copy the two runtime libraries and the tvm-ffi/dlpack headers out of the wheels."""
    (out / "lib").mkdir(parents=True)
    (out / "include").mkdir()
    wanted = {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so",
              "tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so"}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                if name in wanted:
                    dest = out / wanted[name]
                elif name.startswith("tvm_ffi/include/") and not info.is_dir():
                    dest = out / "include" / name[len("tvm_ffi/include/"):]
                else:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    for lib in RUNTIME_LIBS:
        path = out / "lib" / lib
        if not path.is_file():
            raise UserError(f"the aarch64 wheels hold no {lib}")
        if elf_machine(path) != EM_AARCH64:
            raise UserError(f"{lib} from the aarch64 wheel is not an aarch64 library")
    if not (out / "include" / "tvm" / "ffi" / "extra" / "module.h").is_file():
        raise UserError("the aarch64 apache-tvm-ffi wheel holds no C++ headers")


def aarch64_runtime() -> Runtime:
    """The aarch64 runtime for the installed TVM version, downloaded once into the cache."""
    tvm_version, ffi_version = versions()
    root = cache_dir() / "runtime" / f"aarch64-tvm{tvm_version}-ffi{ffi_version}"
    runtime = Runtime(root, tvm_version, ffi_version)
    if (root / "ok").is_file():
        return runtime
    with _locked(cache_dir() / "runtime.lock"):
        if (root / "ok").is_file():
            return runtime
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            wheels = _download_wheels(Path(tmp) / "wheels", tvm_version, ffi_version)
            staging = Path(tmp) / "runtime"
            _extract(wheels, staging)
            (staging / "ok").write_text(json.dumps({"wheels": [w.name for w in wheels]}))
            if root.exists():
                shutil.rmtree(root)
            os.replace(staging, root)
    return runtime


# -------------------------------------------------------------------------- runner


def _compiler_id(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else cxx


def build_runner(runtime: Runtime, cxx: str = targets.AARCH64_CXX) -> Path:
    """The cross-compiled `abc-run`, rebuilt only when its source, compiler or headers change."""
    if shutil.which(cxx) is None:
        raise UserError(f"building the bundle's runner needs the cross compiler {cxx}: run "
                        "`make setup` or `apt-get install g++-aarch64-linux-gnu`")
    key = hashlib.sha256()
    for part in (RUNNER_SOURCE.read_bytes(), _compiler_id(cxx).encode(),
                 " ".join(CXX_FLAGS + LINK_FLAGS).encode(), runtime.tvm_version.encode(),
                 runtime.ffi_version.encode()):
        key.update(part)
        key.update(b"\0")
    out = cache_dir() / "runner" / key.hexdigest()[:16] / "abc-run"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"abc-run.{os.getpid()}.tmp")
    cmd = [cxx, *CXX_FLAGS, f"-I{runtime.include}", str(RUNNER_SOURCE), "-o", str(tmp),
           f"-L{runtime.lib}", *LINK_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln),
                     proc.stderr.strip()[:300])
        raise UserError(f"building the runner with {cxx} failed: {first}")
    os.replace(tmp, out)
    return out


# -------------------------------------------------------------------------- bundle


def _glibc_needs(files: list[Path]) -> tuple[str, str]:
    """The newest GLIBC_ and GLIBCXX_ symbol versions the bundle's binaries ask for."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    found: dict[str, tuple[int, ...]] = {"GLIBC": (2, 17), "GLIBCXX": (3, 4)}
    if objdump is None:
        return "2.34", "3.4.26"  # what Debian 12's cross g++ produces
    for f in files:
        text = subprocess.run([objdump, "-T", str(f)], capture_output=True, text=True).stdout
        for lib, ver in re.findall(r"\b(GLIBC|GLIBCXX)_(\d+(?:\.\d+)+)\b", text):
            found[lib] = max(found[lib], tuple(int(p) for p in ver.split(".")))
    return ".".join(map(str, found["GLIBC"])), ".".join(map(str, found["GLIBCXX"]))


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def _prepare_dir(bundle: Path) -> None:
    """An empty or previous-bundle directory becomes the bundle; anything else is refused."""
    if bundle.exists() and not bundle.is_dir():
        raise UserError(f"--bundle {bundle} is a file: give a directory")
    if bundle.is_dir() and any(bundle.iterdir()):
        if not (bundle / "bundle.json").is_file():
            raise UserError(f"--bundle {bundle} exists and is not an abc-tvm bundle: give a new "
                            "or empty directory")
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True, exist_ok=True)


def make_bundle(so_path: str | os.PathLike, bundle_dir: str | os.PathLike,
                check: bool = True, quiet: bool = False) -> Path:
    """Write a self-contained aarch64 deploy directory for a compiled model (see module doc).

    With `check` and qemu-aarch64 present, the bundle is run once on zeros under qemu.
    """
    from abc_tvm.runtime import read_manifest

    so_path, bundle = Path(so_path), Path(bundle_dir)
    manifest = read_manifest(so_path)
    target = manifest["target"]["name"]
    arch = targets.arch_of(target, manifest["target"].get("tvm"))
    if arch != "aarch64":
        hint = (" (PyPI has no armv7 TVM wheels to take the runtime from)"
                if arch == "armv7" else "")
        what = target if arch == target else f"{target} ({arch})"
        raise UserError(f"--bundle packs the aarch64 TVM runtime, but {so_path.name} was "
                        f"compiled for {what}{hint}: compile with --target arm, rpi4, rpi5, "
                        "jetson-nano or jetson-orin")
    if elf_machine(so_path) != EM_AARCH64:
        raise UserError(f"{so_path} is not an aarch64 shared library: recompile it")
    runtime = aarch64_runtime()
    if manifest.get("tvm_version") not in (None, runtime.tvm_version):
        raise UserError(f"{so_path.name} was compiled with TVM {manifest['tvm_version']}, this "
                        f"installation has {runtime.tvm_version}: recompile it")
    runner = build_runner(runtime)
    _prepare_dir(bundle)
    (bundle / "bin").mkdir()
    (bundle / "lib").mkdir()
    shutil.copy2(runner, bundle / "bin" / "abc-run")
    for lib in RUNTIME_LIBS:
        shutil.copy2(runtime.lib / lib, bundle / "lib" / lib)
    # The runner's source and headers, to rebuild it on a board whose glibc is older.
    shutil.copytree(runtime.include, bundle / "src" / "include",
                    ignore=shutil.ignore_patterns("tvm_ffi_python_*"))
    shutil.copy2(RUNNER_SOURCE, bundle / "src" / RUNNER_SOURCE.name)
    model = so_path.name
    shutil.copy2(so_path, bundle / model)
    shutil.copy2(str(so_path) + ".json", bundle / f"{model}.json")
    glibc, glibcxx = _glibc_needs([bundle / "bin" / "abc-run", bundle / model,
                                   *(bundle / "lib" / lib for lib in RUNTIME_LIBS)])
    preset = targets.ARM_PRESETS.get(target)
    values = {
        "MODEL": model, "ARCH": "aarch64", "TARGET": target, "BUNDLE": bundle.name,
        "DESCRIPTION": preset.description if preset else "aarch64",
        "TVM_VERSION": runtime.tvm_version, "FFI_VERSION": runtime.ffi_version,
        "INPUT_SHAPE": str(manifest["inputs"][0]["shape"]),
        "OUTPUT_SHAPE": str(manifest["outputs"][0]["shape"]) if manifest["outputs"] else "?",
        "GLIBC": glibc, "GLIBCXX": glibcxx,
    }
    run_sh = bundle / "run.sh"
    run_sh.write_text(_fill((RUNNER_DIR / "run.sh").read_text(), values))
    run_sh.chmod(0o755)
    for exe in (bundle / "bin" / "abc-run", bundle / model):
        exe.chmod(0o755)
    (bundle / "README.md").write_text(_fill((RUNNER_DIR / "README.bundle.md").read_text(),
                                            values))
    (bundle / "bundle.json").write_text(json.dumps({
        "format": BUNDLE_FORMAT, "model": model, "arch": "aarch64", "target": target,
        "tvm_version": runtime.tvm_version, "ffi_version": runtime.ffi_version,
        "requires": {"glibc": glibc, "glibcxx": glibcxx},
        "input": manifest["inputs"][0], "outputs": manifest["outputs"],
    }, indent=1))
    write_checksums(bundle, [model, f"{model}.json", "bin/abc-run",
                             *(f"lib/{lib}" for lib in RUNTIME_LIBS), "run.sh"])
    checked = ""
    if check and emulator() is not None:
        shape = tuple(manifest["inputs"][0]["shape"])
        run_bundle(bundle, np.zeros(shape, np.float32))
        checked = " (ran once under qemu-aarch64)"
    if not quiet:
        print(f"wrote bundle {bundle}: {model}, bin/abc-run, lib/ (TVM {runtime.tvm_version} "
              f"aarch64 runtime), run.sh, README.md{checked}")
    return bundle


CHECKSUMS = "SHA256SUMS"


def write_checksums(bundle: Path, names: list[str]) -> Path:
    """`sha256sum -c`-format checksums of the bundle's files, which run.sh checks before it
    runs anything: a model, manifest, runner or runtime library swapped or corrupted in the
    copy to the board is refused in one line. Accidents only: not a signature."""
    from abc_tvm.runtime import sha256

    lines = [f"{sha256(bundle / name)}  {name}\n" for name in names]
    path = bundle / CHECKSUMS
    path.write_text("".join(lines))
    return path


# ------------------------------------------------------------------------- running


def emulator() -> list[str] | None:
    """The command that runs aarch64 binaries here: [] on an aarch64 host, qemu elsewhere."""
    if platform.machine() in ("aarch64", "arm64"):
        return []
    qemu = shutil.which("qemu-aarch64")
    sysroot = Path(os.environ.get("ABC_RUN_SYSROOT", "/usr/aarch64-linux-gnu"))
    if qemu is None or not (sysroot / "lib" / "libc.so.6").is_file():
        return None
    return [qemu, "-L", str(sysroot)]


def _executed_instructions(log: Path) -> int:
    """Guest instructions executed, from a qemu `-d in_asm,exec,nochain` log.

    `in_asm` lists each translated block's instructions under "IN:", `exec` (with chaining
    off) logs every execution of a block with its guest pc: the sum over executions of the
    block sizes is the dynamic instruction count.
    """
    sizes: dict[int, int] = {}
    total = 0
    block_pc, block_len = None, 0
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("Trace "):
                pc = int(line.split("[", 1)[1].split("/", 2)[1], 16)
                total += sizes.get(pc, 1)
            elif line.startswith("0x"):
                if block_pc is None:
                    block_pc = int(line.split(":", 1)[0], 16)
                block_len += 1
            elif block_pc is not None and not line.strip():
                sizes[block_pc] = block_len
                block_pc, block_len = None, 0
    return total


def count_instructions(bundle_dir: str | os.PathLike, x: np.ndarray, repeat: int = 2) -> int:
    """aarch64 instructions one inference executes, counted under qemu (no board needed).

    Runs the bundle single-threaded (TVM_NUM_THREADS=1, so no spinning worker threads)
    with `--repeat 0` and `--repeat R`; the difference over R excludes loading and I/O.
    Debian's qemu has no instruction-count plugin, so the count comes from qemu's own
    block-execution log (tens to hundreds of MB per run, in a temporary directory).
    """
    bundle = Path(bundle_dir)
    qemu = emulator()
    if qemu is None or not qemu:
        raise UserError("counting instructions needs qemu-aarch64 on an x86 host "
                        "(apt-get install qemu-user)")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        xin = Path(tmp) / "in.npy"
        np.save(xin, np.ascontiguousarray(x))
        for r in (0, repeat):
            log = Path(tmp) / f"q{r}.log"
            cmd = [*qemu, "-d", "in_asm,exec,nochain", "-D", str(log),
                   str(bundle / "bin" / "abc-run"), str(next(bundle.glob("*.so"))), str(xin),
                   str(Path(tmp) / "out.npy"), *(["--repeat", str(r)] if r else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TVM_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise UserError(f"running {bundle} under qemu failed: {proc.stderr.strip()}")
            totals.append(_executed_instructions(log))
            log.unlink()
    return (totals[1] - totals[0]) // repeat


def run_bundle(bundle_dir: str | os.PathLike, x: np.ndarray, repeat: int = 0,
               timeout: float = 300) -> np.ndarray:
    """Run a bundle's `run.sh` on one input (under qemu off the board); its output array."""
    bundle = Path(bundle_dir)
    if not (bundle / "run.sh").is_file():
        raise UserError(f"{bundle} is not an abc-tvm bundle (no run.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        xin, yout = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(xin, np.ascontiguousarray(x))
        cmd = ["sh", str(bundle / "run.sh"), str(xin), str(yout)]
        if repeat:
            cmd += ["--repeat", str(repeat)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise UserError(lines[-1].removeprefix("abc-run: error: "))
        return np.load(yout)
