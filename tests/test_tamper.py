"""Tampered artifacts (issue 22, item 5): a compiled .so or its manifest changed by one byte,
a manifest that belongs to another model, a bundle with a swapped file — refused by
`abc-tvm run`, `abc-tvm serve`, `abc_tvm.runtime.load` and the bundle runner (run.sh and
bin/abc-run) in one line, before the library is loaded. The hashes are checksums against
accidents and mismatched copies, not signatures (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as ob
import pytest

from abc_tvm import deploy
from abc_tvm.compiler import compile_model
from abc_tvm.errors import UserError
from abc_tvm.runtime import MANIFEST_DIGEST_KEY, load, manifest_digest, read_manifest

SH = shutil.which("sh") or "/bin/sh"
CROSS = shutil.which("aarch64-linux-gnu-g++") is not None
QEMU = deploy.emulator() is not None
needs_qemu = pytest.mark.skipif(
    not (CROSS and QEMU), reason="qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup`")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exactly one stderr line, exit `code`, no traceback, naming every word."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def models(seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    model, _ = ob.canonical(batch=1, in_channels=4, out_channels=4, height=6, width=6,
                            seed=seed)
    return model, ob.random_input((1, 4, 6, 6), seed)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Two different x86 modules (a, b) with manifests, and an input .npy for them."""
    d = tmp_path_factory.mktemp("tamper")
    out: dict[str, Path] = {}
    for name, seed in (("a", 0), ("b", 1)):
        model, x = models(seed)
        onnx.save(model, d / f"{name}.onnx")
        compile_model(d / f"{name}.onnx", "x86", d / f"{name}.so", quiet=True,
                      tuning_log=False)
        out[name] = d / f"{name}.so"
    np.save(d / "x.npy", x)
    out["x"] = d / "x.npy"
    return out


def copy(so: Path, dst: Path) -> Path:
    shutil.copy(so, dst)
    shutil.copy(str(so) + ".json", str(dst) + ".json")
    return dst


def flip(path: Path, at: int, new: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[at] = (data[at] ^ 0x01) if new is None else new
    path.write_bytes(bytes(data))


def test_manifest_carries_its_own_digest(built):
    m = read_manifest(built["a"])
    assert m[MANIFEST_DIGEST_KEY] == manifest_digest(m)
    assert m["sha256"] == hashlib.sha256(built["a"].read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["first", "elf-header", "middle", "last"])
def test_so_changed_by_one_byte_is_refused(built, tmp_path, where):
    bad = copy(built["a"], tmp_path / "bad.so")
    size = bad.stat().st_size
    flip(bad, {"first": 0, "elf-header": 18, "middle": size // 2, "last": size - 1}[where])
    with pytest.raises(UserError, match="does not match the sha256"):
        load(bad)
    one_line(cli("run", str(bad), "--input", str(built["x"])), 2, "bad.so", "sha256")


def test_truncated_and_swapped_so_are_refused(built, tmp_path):
    short = copy(built["a"], tmp_path / "short.so")
    short.write_bytes(short.read_bytes()[:4096])
    with pytest.raises(UserError, match="sha256"):
        load(short)
    swapped = copy(built["a"], tmp_path / "swapped.so")
    shutil.copy(built["b"], swapped)  # the other model's library under this manifest
    one_line(cli("run", str(swapped), "--input", str(built["x"])), 2, "sha256")


def test_manifest_pointing_elsewhere_is_refused(built, tmp_path):
    """A manifest copied from, or linked to, another model's: its sha256 names that .so."""
    so = tmp_path / "m.so"
    shutil.copy(built["a"], so)
    shutil.copy(str(built["b"]) + ".json", str(so) + ".json")
    with pytest.raises(UserError, match="sha256"):
        load(so)
    os.unlink(str(so) + ".json")
    os.symlink(str(built["b"]) + ".json", str(so) + ".json")
    one_line(cli("run", str(so), "--input", str(built["x"])), 2, "sha256")


def test_every_one_byte_manifest_edit_is_refused_or_harmless(built, tmp_path):
    """120 single-byte edits of the manifest, spread over the file: each one is refused in
    one line, or leaves the parsed JSON exactly as it was (whitespace), never loaded as
    something else."""
    orig = Path(str(built["a"]) + ".json").read_bytes()
    want = json.loads(orig)
    rng = np.random.default_rng(22)
    positions = rng.choice(len(orig), size=min(120, len(orig)), replace=False)
    refused = harmless = 0
    so = copy(built["a"], tmp_path / "e.so")
    mpath = Path(str(so) + ".json")
    for at in positions:
        data = bytearray(orig)
        data[at] = int(rng.choice([c for c in b'0123456789abcdef":, []{}x' if c != data[at]]))
        mpath.write_bytes(bytes(data))
        try:
            got = read_manifest(so)
        except UserError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert got == want, f"byte {at} changed the manifest and it was accepted"
        harmless += 1
    assert refused + harmless == len(positions) and refused > 0.9 * len(positions)


def test_manifest_field_edits_are_refused(built, tmp_path):
    """Edits the .so hash cannot see: a shape, the target's CPU features, the sha256 itself
    rewritten to fit a changed .so (without the digest)."""
    so = copy(built["a"], tmp_path / "f.so")
    mpath = Path(str(so) + ".json")
    orig = json.loads(mpath.read_text())
    edits = {
        "input shape": lambda m: m["inputs"][0]["shape"].__setitem__(2, 7),
        "cpu features": lambda m: m["target"].__setitem__("cpu_features", []),
        "target": lambda m: m["target"].__setitem__("name", "rpi4"),
    }
    for what, edit in edits.items():
        m = json.loads(json.dumps(orig))
        edit(m)
        mpath.write_text(json.dumps(m, indent=1))
        with pytest.raises(UserError, match=MANIFEST_DIGEST_KEY):
            load(so)
        one_line(cli("run", str(so), "--input", str(built["x"])), 2, MANIFEST_DIGEST_KEY), what
    flip(so, so.stat().st_size // 2)
    m = dict(orig, sha256=hashlib.sha256(so.read_bytes()).hexdigest())
    mpath.write_text(json.dumps(m))
    with pytest.raises(UserError, match=MANIFEST_DIGEST_KEY):
        load(so)
    # Reformatting (indent, key order) is not an edit: the digest is over canonical JSON.
    shutil.copy(built["a"], so)
    mpath.write_text(json.dumps(dict(reversed(list(orig.items()))), indent=4))
    y = load(so, workers=1)(np.load(built["x"]))
    np.testing.assert_array_equal(y, load(built["a"], workers=1)(np.load(built["x"])))


def test_serve_refuses_a_tampered_model_at_start(built, tmp_path):
    bad = copy(built["a"], tmp_path / "served.so")
    flip(bad, bad.stat().st_size // 3)
    one_line(cli("serve", "--port", "0", str(built["b"]), str(bad), timeout=120), 2,
             "served.so", "sha256")
    d = tmp_path / "dir"
    d.mkdir()
    copy(built["a"], d / "ok.so")
    shutil.copy(str(built["b"]) + ".json", d / "ok.so.json")
    one_line(cli("serve", "--port", "0", "--model-dir", str(d), timeout=120), 2, "sha256")


# ------------------------------------------------------------------------ the bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path, Path, np.ndarray]:
    """(bundle of model a for arm, arm .so of model b, x.npy, x86 output of model a on x)."""
    if not (CROSS and QEMU):
        pytest.skip("qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup`")
    d = tmp_path_factory.mktemp("tamper-bundle")
    sos = []
    for name, seed in (("a", 0), ("b", 1)):
        model, x = models(seed)
        onnx.save(model, d / f"{name}.onnx")
        so = d / f"{name}.so"
        compile_model(d / f"{name}.onnx", "arm", so, quiet=True, tuning_log=False)
        sos.append(so)
    np.save(d / "x.npy", x)
    compile_model(d / "a.onnx", "x86", d / "a86.so", quiet=True, tuning_log=False)
    want = load(d / "a86.so", workers=1)(x)
    b = deploy.make_bundle(sos[0], d / "bundle", check=False, quiet=True)
    return b, sos[1], d / "x.npy", want


def run_sh(b: Path, x: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SH, str(b / "run.sh"), str(x), str(out)], capture_output=True,
                          text=True, timeout=300)


@needs_qemu
def test_bundle_refuses_changed_or_swapped_files(bundle, tmp_path):
    b, other, x, want = bundle
    assert (b / deploy.CHECKSUMS).is_file()
    ok = run_sh(b, x, tmp_path / "y.npy")
    assert ok.returncode == 0, ok.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    cases = {
        "model byte": ("a.so", lambda p: flip(p, p.stat().st_size // 2)),
        "manifest byte": ("a.so.json", lambda p: flip(p, p.read_bytes().index(b'"shape"') + 12)),
        "model swapped": ("a.so", lambda p: shutil.copy(other, p)),
        "library swapped": ("lib/libtvm_ffi.so",
                            lambda p: shutil.copy(p.parent / "libtvm_runtime.so", p)),
        "runner byte": ("bin/abc-run", lambda p: flip(p, p.stat().st_size - 100)),
    }
    for what, (name, edit) in cases.items():
        c = tmp_path / what.replace(" ", "_")
        shutil.copytree(b, c, symlinks=True)
        edit(c / name)
        one_line(run_sh(c, x, tmp_path / "z.npy"), 2, "abc-run: error:", name, "SHA256SUMS")
        assert not (tmp_path / "z.npy").exists(), what


@needs_qemu
def test_runner_checks_the_model_itself(bundle, tmp_path):
    """bin/abc-run run directly (or from a run.sh on a board without sha256sum)."""
    b, other, x, _ = bundle
    c = tmp_path / "c"
    shutil.copytree(b, c, symlinks=True)

    def runner() -> subprocess.CompletedProcess:
        return subprocess.run([*deploy.emulator(), str(c / "bin" / "abc-run"), str(c / "a.so"),
                               str(x), str(tmp_path / "y.npy")], capture_output=True,
                              text=True, timeout=300)

    assert runner().returncode == 0
    flip(c / "a.so", (c / "a.so").stat().st_size // 2)
    one_line(runner(), 2, "abc-run: error:", "sha256", "a.so")
    shutil.copy(other, c / "a.so")
    one_line(runner(), 2, "abc-run: error:", "sha256")
    m = json.loads((b / "a.so.json").read_text())
    del m["sha256"]
    (c / "a.so.json").write_text(json.dumps(m))
    shutil.copy(b / "a.so", c / "a.so")
    one_line(runner(), 2, "abc-run: error:", "no sha256")
