"""export / save / load: pickle-free files, identical outputs, torch.export (§6.4)."""

import io
import pickletools
import zipfile

import pytest
import torch
from helpers import randomize, rel

import paam_fast as pf


def _pruned(arch="resnet20", size=32, coupling="internal"):
    model = pf.paamify(pf.models.get_model(arch), coupling=coupling,
                       input_size=(1, 3, size, size))
    randomize(model)
    model(torch.randn(2, 3, size, size))
    pf.select(model, keep=0.5)
    return model.eval()


def _globals_in(path) -> set[str]:
    found = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(".pkl"):
                for op, arg, _ in pickletools.genops(io.BytesIO(z.read(name))):
                    if op.name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                        found.add(str(arg))
    return found


@pytest.mark.parametrize("arch,size,coupling", [("resnet20", 32, "internal"),
                                                ("mobilenet_v2", 64, "grouped")])
def test_save_load_round_trip(tmp_path, arch, size, coupling):
    model = _pruned(arch, size, coupling)
    x = torch.randn(2, 3, size, size)
    y = model(x)
    path = tmp_path / "m.paam"
    pf.save(model, path)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "plan", "state_dict"}
    globs = _globals_in(path)
    assert not any("paam_fast" in g or "torch.nn" in g for g in globs), globs
    again = pf.load(path, lambda: pf.models.get_model(arch)).eval()
    assert torch.equal(again(x), pf.export(model)(x))
    assert rel(again(x), y) <= 1e-5
    assert pf.count(again, (1, 3, size, size)) == pf.count(pf.export(model), (1, 3, size, size))


def test_load_refuses_the_wrong_architecture(tmp_path):
    model = _pruned()
    pf.save(model, tmp_path / "m.paam")
    with pytest.raises(ValueError, match="do not fit the model built by model_fn"):
        pf.load(tmp_path / "m.paam", lambda: pf.models.get_model("resnet56"))
    (tmp_path / "junk.paam").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a paam_fast model file|cannot read"):
        pf.load(tmp_path / "junk.paam", lambda: pf.models.get_model("resnet20"))


def test_exported_model_works_with_torch_export():
    model = _pruned()
    plain = pf.export(model)
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(plain, (x,))
    assert rel(ep.module()(x), plain(x)) <= 1e-6
    assert not any("paam_fast.nn" in type(m).__module__ for m in plain.modules())
    assert not plain._forward_pre_hooks


def test_report_text_and_dict():
    model = _pruned()
    r = pf.report(model)
    d = r.to_dict()
    assert d["params_final"] == pf.count(pf.export(model), (1, 3, 32, 32))["params"]
    assert d["params_dense"] == 269_722
    row = next(x for x in d["per_layer"] if x["name"] == "layer2.1.conv1")
    assert row["filters_dense"] == 32 and 1 <= row["filters_final"] <= 32 and row["gated"]
    text = str(r)
    assert "layer2.1.conv1" in text and "params 269,722 ->" in text
