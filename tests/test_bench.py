"""`abc-tvm bench`: the smoke run writes its doc, plot and JSON with every peer; the popcount
microbenchmark runs VPOPCNTQ (on a CPU that has it). Speed itself is never asserted here."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from host import cpu_flags

from abc_tvm import bench
from abc_tvm.bench_args import add_bench_arguments
from abc_tvm.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


def _float_convs(prof: dict) -> list:
    """abc-tvm's float convs of a float-ops profile, each with its ORT peer (None: none)."""
    from abc_tvm.bench.float_ops import match

    return [(o, t) for o, t in match(prof["abc"], prof["ort"]).pairs
            if o.key and o.key[0] == "Conv"]


def test_popcount_peak_is_positive_and_uses_popcount_instructions():
    peak = bench.load_benchmark("popcount_peak")
    res = peak.measure_peak(threads=1, reps=64, repeat=2, min_repeat_ms=5)
    assert res.gbitops_per_s > 0 and res.seconds_per_call > 0
    assert res.popcount_insns, "the kernel's asm counts bits neither with popcnt nor vpshufb"
    if "avx512_vpopcntdq" in cpu_flags():
        assert res.vpopcntq, res.popcount_insns


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="the byte-counter kernel is AVX2 (VPSADBW)")
def test_byte_counter_popcount_is_exact_up_to_the_byte_limit():
    """31 all-ones words put 248 in every byte counter (the most it may hold); random words
    must match NumPy too; a longer round would overflow a byte and is refused."""
    import numpy as np
    import tvm

    mod = bench.load_benchmark("popcount_bytes")
    rng = np.random.default_rng(3)
    ones = np.full((2, 62, 2), 2**64 - 1, np.uint64)
    cases = [(ones, np.full((62, 8), 2**64 - 1, np.uint64)),
             (rng.integers(0, 2**63, (2, 62, 2), dtype=np.uint64),
              rng.integers(0, 2**63, (62, 8), dtype=np.uint64))]
    host = tvm.target.Target.from_device("cpu")
    for func in mod.kernels(rows=2, cols=8, words=62, reps=2):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=host)
        for a, b in cases:
            out = tvm.runtime.tensor(np.zeros((2, 8), np.uint64))
            lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
            np.testing.assert_array_equal(out.numpy(), mod.reference(a, b))
    assert int(mod.reference(*cases[0])[0, 0]) == 2 * 62 * 64
    with pytest.raises(ValueError, match="byte counter"):
        mod.kernels(rows=2, cols=8, words=64, reps=1, chunk=32)


def test_topi_reference_reads_weights_msb_first_and_signs_them():
    """The NumPy oracle of the TOPI peer on hand-made cases: 1x1 kernel, one word of channels."""
    import numpy as np

    topi = bench.load_benchmark("topi_bitserial")
    lay = topi.Layer(64, 2, 2, 2, 1, padding=0, kernel=1)
    data = np.arange(1, 1 + 2 * 2 * 64, dtype=np.int32).reshape(1, 2, 2, 64) % 4  # 2 bit-planes
    wq = np.zeros((1, 1, 1, 2, 1), np.uint64)
    wq[0, 0, 0, 0, 0] = np.uint64(2**64 - 1)  # output 0: every channel +1
    wq[0, 0, 0, 1, 0] = np.uint64(1 << 63)  # output 1: only channel 0 (the MSB) is +1
    got = topi.reference(lay, data, wq)
    total = data.sum(axis=-1)
    np.testing.assert_array_equal(got[..., 0], total)
    np.testing.assert_array_equal(got[..., 1], 2 * data[..., 0] - total)
    wq[0, 0, 0, 1, 0] = np.uint64(1)  # the LSB is channel 63
    np.testing.assert_array_equal(topi.reference(lay, data, wq)[..., 1],
                                  2 * data[..., 63] - total)


def test_options_are_checked():
    cfg = bench.config_from_args(_args("--quick"))
    assert cfg.threads == [1] and cfg.models == [(1, 1)] and cfg.image_size == 32
    cfg = bench.config_from_args(_args("--threads", "1,2", "--models", "1x1,3x3"))
    assert cfg.threads == [1, 2] and cfg.topi_tuned == [(3, 3)] and cfg.trials == 64
    for bad in (["--models", "3"], ["--threads", "0"], ["--parts", "gpu"],
                ["--image-size", "16"], ["--trials", "0"]):
        with pytest.raises(UserError):
            bench.config_from_args(_args(*bad))


def test_doc_section_replaces_x86_and_keeps_other_sections(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## ARM\n\narm text\n\n## Serving\n\nserving text\n")
    bench.write_doc(doc, "## x86\n\nfirst\n")
    bench.write_doc(doc, "## x86\n\nsecond\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n## x86\n\nsecond\n")
    assert "first" not in text and text.count("## x86") == 1
    assert "arm text" in text and "serving text" in text
    assert text.index("## x86") < text.index("## ARM") < text.index("## Serving")
    new = tmp_path / "new.md"
    bench.write_doc(new, "## x86\n\nonly\n")
    assert new.read_text() == "# Benchmarks\n\n## x86\n\nonly\n"


def test_doc_keeps_one_section_per_cpu(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## x86: znver5\n\nzen 5\n\n## ARM\n\narm text\n")
    bench.write_doc(doc, "## x86: znver3\n\nzen 3\n")
    bench.write_doc(doc, "## x86: znver3\n\nzen 3 again\n")
    text = doc.read_text()
    assert text == ("# Benchmarks\n\n## x86: znver5\n\nzen 5\n\n## x86: znver3\n\nzen 3 again\n"
                    "\n## ARM\n\narm text\n")
    assert bench.section_title({"runs": {"1": {"peak": {"target": json.dumps(
        {"kind": "llvm", "mcpu": "znver3"})}}}}) == "## x86: znver3"


def test_quick_bench_writes_doc_plot_and_json_with_every_peer(tmp_path):
    doc, plot = tmp_path / "benchmarks.md", tmp_path / "p.png"
    doc.write_text("# Benchmarks\n\n## Serving\n\nkeep me\n")
    cmd = [sys.executable, "-m", "abc_tvm.bench", "--quick", "--work-dir", str(tmp_path / "w"),
           "--doc", str(doc), "--plot", str(plot), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Whole models, 1 thread(s)" in proc.stdout

    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert json.loads(plot.with_suffix(".json").read_text()) == results
    assert results["errors"] == []
    run = results["runs"]["1"]
    assert run["peak"]["gbitops_per_s"] > 0
    for peer in ("ort", "torch", "tvm_fp32", "abc1x1"):
        entry = run["models"][peer]
        assert entry["best_ms"] > 0 and entry["median_ms"] >= entry["best_ms"], (peer, entry)
        assert entry["check_rel_err"] < 1e-3 and entry["top1_match"], (peer, entry)
    assert run["models"]["abc1x1"]["ort_rel_err"] < 1e-3  # the yardstick was computed
    # The engines a user would pick instead: int8 (static QDQ) and OpenVINO. Their outputs
    # are checked too: int8 and bf16 stay within a few percent of the float twin.
    for peer in ("ort_int8", "openvino", "openvino_int8"):
        entry = run["models"][peer]
        assert entry["best_ms"] > 0 and entry["check_rel_err"] < 0.1, (peer, entry)
    assert run["models"]["ort_int8"]["approximate"]
    assert run["models"]["openvino"]["precision"] in ("f32", "bf16", "f16")
    assert results["meta"]["machine"]["matrix"]
    for peer in ("tvm_fp32", "abc1x1"):  # each float conv against ORT's same op
        convs = _float_convs(run["float_ops"][peer])
        assert convs and all(t is not None and o.ms > 0 and t.ms > 0 for o, t in convs), peer
    layers = run["layers"]
    assert layers and all(r["abc"]["best_ms"] > 0 and r["abc"]["pct_peak"] > 0 for r in layers)
    topi = [r for r in layers if r["layer"]["channels"] % 64 == 0]
    assert topi, "the quick model has no layer TOPI can pack"
    for r in topi:
        for key in ("topi_untuned", "topi_tuned"):
            # Timed only when its output equals the NumPy reference; else reported as wrong
            # (TOPI's unscheduled kernel computes a wrong answer on a Zen 3 host).
            entry = r[key]
            if "wrong" in entry:
                assert "differs from the NumPy reference" in entry["wrong"], (key, entry)
                assert entry["wrong_records_skipped"] >= 1
            else:
                assert entry["best_ms"] > 0 and entry["correct"], (key, entry)

    text = doc.read_text()
    assert text.startswith(f"# Benchmarks\n\n{bench.section_title(results)}\n")
    assert "keep me" in text and text.index("## x86: ") < text.index("## Serving")
    for needle in ("python -m abc_tvm.bench --quick", "ONNX Runtime fp32", "PyTorch eager fp32",
                   "ONNX Runtime int8", "OpenVINO",
                   "TVM fp32", "abc-tvm ABC-ResNet-20 M=1 N=1", "TOPI tuned", "% of peak",
                   "Popcount peak", "Float layers of abc-tvm ABC-ResNet-20 M=1 N=1",
                   "every float layer <= 1.5x", results["meta"]["machine"]["cpu"]):
        assert needle in text, needle
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_split_into_abc_configurations_and_research_workloads():
    from abc_tvm.bench.research import split_models

    assert split_models("1x1,reactnet_a,3x3,bireal18") == ("1x1,3x3", ["reactnet_a", "bireal18"])
    assert split_models("bireal18") == (None, ["bireal18"])
    assert split_models("5x5") == ("5x5", [])
    with pytest.raises(UserError, match="MxN"):  # an unknown name is an MxN error
        bench.config_from_args(_args("--models", "resnet50"))


def test_research_workload_bench_times_every_peer(tmp_path):
    """`bench --models bireal18`: abc-tvm, ORT and PyTorch eager on the same export, every
    binary layer profiled in the model; the doc section names the command."""
    from abc_tvm.bench import research

    found = research.run(["bireal18"], 3, 32, tmp_path)
    (row,) = found["rows"]
    assert row["binary_layers"] == 16 and len(row["layer_ms"]) == 16
    assert set(row["best_ms"]) == {"abc-tvm", "ORT fp32", "PyTorch eager"}
    assert all(v > 0 for v in row["best_ms"].values()) and row["max_rel_err"] < 1e-4
    convs = _float_convs(row["float_ops"])  # the stem and the float 1x1 projections
    assert convs and all(t is not None and o.ms > 0 and t.ms > 0 for o, t in convs)
    (text,) = research.sections(found)
    assert text.startswith("## Research BNN exports (x86: ") and "| bireal18 (3x32x32) | 1 |" \
        in text
    assert "Float layers of bireal18 batch 1 vs ONNX Runtime" in text


def test_qonnx_workload_bench_runs_both_batches(tmp_path):
    """`bench --models finn_tfc_1w2a`: batch 1 and 64, ORT on the float-lowered model,
    Brevitas eager as the PyTorch peer, in the QONNX section."""
    pytest.importorskip("brevitas")
    from abc_tvm.bench import research

    found = research.run(["finn_tfc_1w2a"], 3, None, tmp_path)
    assert [r["batch"] for r in found["rows"]] == [1, 64]
    for row in found["rows"]:
        assert row["binary_layers"] == 4 and len(row["layer_ms"]) == 4
        assert set(row["best_ms"]) == {"abc-tvm", "ORT fp32", "Brevitas eager"}
        assert row["max_rel_err"] < 1e-5
    (text,) = research.sections(found)
    assert text.startswith("## QONNX exports: FINN's bnn_pynq (x86: ")
    assert "| finn_tfc_1w2a (1x28x28) | 64 |" in text
