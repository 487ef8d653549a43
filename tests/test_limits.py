"""Models too large for TVM's 32-bit tensor indices, and TVM errors reaching the user
(issue 22, item 6): one line naming the layer and the limit, exit 2; TVM's own failures one
line, exit 3 — never the 50-line TVMScript dump."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from abc_tvm import cli, limits
from abc_tvm.blocks import front
from abc_tvm.compiler import internal
from abc_tvm.errors import InternalError, UserError


def conv_model(h: int, w: int, cin: int = 3, cout: int = 4, k: int = 3) -> onnx.ModelProto:
    """One float Conv (node 'conv0') on a 1 x cin x h x w input, same padding."""
    weight = np.random.default_rng(0).normal(size=(cout, cin, k, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["output"], kernel_shape=[k, k],
                          pads=[k // 2] * 4, name="conv0")], "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, cout, h, w])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def compile_err(tmp_path, model: onnx.ModelProto, capsys) -> tuple[int, list[str]]:
    onnx.save(model, tmp_path / "m.onnx")
    rc = cli.main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.so")])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_ten_million_pixel_input_is_one_line(tmp_path, capsys):
    """The issue's case: a 1x3x10^7x1000 image (3e10 elements) through a conv."""
    rc, err = compile_err(tmp_path, conv_model(10_000_000, 1000), capsys)
    assert rc == 2 and len(err) == 1, err
    for words in ("input 'input'", "30000000000", "2^31 - 1", "32-bit"):
        assert words in err[0], err[0]
    assert not (tmp_path / "m.so").exists()


def test_output_too_large_names_the_layer(tmp_path, capsys):
    """The input fits (1.1e8 elements), the conv's 64-channel output (2.3e9) does not."""
    rc, err = compile_err(tmp_path, conv_model(6000, 6000, cout=64), capsys)
    assert rc == 2 and len(err) == 1, err
    assert "layer conv0 (Conv)" in err[0] and "2304000000" in err[0], err[0]


def test_the_limit_is_where_tvm_fails():
    """46340^2 < 2^31 - 1 < 46341^2: measured, the first builds in TVM, the second fails."""
    limits.check_tensor_sizes(conv_model(46340, 46340, cin=1, cout=1, k=1))
    with pytest.raises(UserError, match="2147488281 elements"):
        limits.check_tensor_sizes(conv_model(46341, 46341, cin=1, cout=1, k=1))
    limits.check_tensor_sizes(conv_model(224, 224))


def _tvm_int32_error() -> ValueError:
    try:
        tvm.tirx.IntImm("int32", 30_000_000_000)
    except ValueError as e:
        return e
    raise AssertionError("TVM accepted a 35-bit int32 literal")


def test_tvm_overflow_inside_the_build_is_a_user_error_naming_the_largest_tensor():
    fr = front(conv_model(64, 64))
    with pytest.raises(UserError) as info, internal("TVM's build", fr):
        raise _tvm_int32_error()
    msg = str(info.value)
    assert "\n" not in msg and "2^31 - 1" in msg and "layer conv0's output 'output'" in msg


def test_other_tvm_errors_are_one_line_internal_errors():
    fr = front(conv_model(16, 16))
    multi = "\n".join(["Check failed: (x) is false: something broke", "",
                       "Error in pass: RewriteDataflowReshape", *["    T.dump()"] * 40])
    with pytest.raises(InternalError) as info, internal("TVM's build", fr):
        try:
            tvm.tirx.IntImm("int32", 30_000_000_000)
        except ValueError as e:
            raise ValueError(multi).with_traceback(e.__traceback__) from None
    msg = str(info.value)
    assert msg.count("\n") == 0, msg
    assert "something broke (in TVM pass RewriteDataflowReshape)" in msg, msg
    # abc-tvm's own ValueErrors (no TVM frames) keep their meaning: the model's parameters.
    with pytest.raises(ValueError, match="kernel larger"), internal("TVM's build", fr):
        raise ValueError("kernel larger than the padded input")


def test_cli_prints_one_line_for_a_multi_line_value_error(monkeypatch, tmp_path, capsys):
    from abc_tvm import compiler

    def dump(*_a, **_k):
        raise ValueError("Check failed: (a) is false: bad\nError in pass: P\n" + "x\n" * 50)

    monkeypatch.setattr(compiler, "front", dump)
    onnx.save(conv_model(8, 8), tmp_path / "m.onnx")
    rc = cli.main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.so")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["abc-tvm compile: error: bad (in TVM pass P)"], err
