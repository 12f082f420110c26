"""ONNX export of a pruned model: pf.export → torch.onnx.export → onnxruntime (issue 12)."""

import io

import pytest
import torch
from helpers import randomize, rel

import paam_fast as pf

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZE = (1, 3, 64, 64)


def _pruned(name):
    model = pf.paamify(pf.models.get_model(name), input_size=SIZE)
    randomize(model)
    model.eval()
    x = torch.randn(2, *SIZE[1:])
    model(x)
    pf.select(model, keep=0.5)
    return pf.export(model).eval(), x


def _onnx_run(plain, x, dynamo: bool):
    if dynamo:
        pytest.importorskip("onnxscript")
        prog = torch.onnx.export(plain, (x,), dynamo=True, input_names=["x"],
                                 output_names=["y"], verbose=False)
        data = prog.model_proto.SerializeToString()
    else:
        buf = io.BytesIO()
        torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"],
                          output_names=["y"])
        data = buf.getvalue()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("name", ["resnet18", "regnet_y_400mf"])  # regnet: grouped convs + SE
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::UserWarning")
def test_onnxruntime_computes_the_exported_model(name, dynamo):
    plain, x = _pruned(name)
    with torch.no_grad():
        want = plain(x)
    got = _onnx_run(plain, x, dynamo)
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::UserWarning")
def test_onnxruntime_computes_a_cifar_resnet_with_pruned_stages(dynamo):
    """coupling="grouped" on a CIFAR ResNet cuts the stages: its option-A shortcuts export as
    a gather of the kept pairs (Concat + Gather)."""
    model = pf.paamify(pf.models.resnet20(), coupling="grouped")
    randomize(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    pf.select(model, keep=0.4)
    plain = pf.export(model).eval()
    assert plain.layer2[0].shortcut.gather is not None  # the stages were cut
    with torch.no_grad():
        want = plain(x)
    assert rel(_onnx_run(plain, x, dynamo), want) <= 1e-5
