"""ImageFolder batches decoded on the training device (torchvision.io.decode_jpeg; the CPU here,
nvJPEG on a GPU): same pictures as the Pillow workers' pipeline, reproducible augmentation,
fallbacks for non-JPEG files, a named error for a corrupt one, and paam-train on top of it."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from paam_fast import data as D
from paam_fast.device_decode import random_resized_crop_box
from paam_fast.train import main


def _picture(rng, h, w):
    """A smooth random picture (JPEG-friendly, so decoders agree closely)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(0.02, 0.2, 3)
        out[..., c] = 127 + 120 * np.sin(a * yy + p * 7) * np.cos(b * xx)
    return out.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for cls in ("ants", "bees"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                img = Image.fromarray(_picture(rng, h, w))
                if split == "train" and cls == "bees" and i == 0:
                    img.convert("L").save(d / f"{i}.jpg", quality=95)  # grayscale JPEG
                elif split == "train" and cls == "bees" and i == 1:
                    img.save(d / f"{i}.jpg", format="PNG")  # a PNG with a .jpg name
                else:
                    img.save(d / f"{i}.jpg", quality=95)
    return str(root)


def _loaders(folder, decode, device="cpu"):
    return D.image_folder_loaders(folder, 4, 0, 32, 0, 1, 0, None, decode=decode, device=device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)"))]


@pytest.mark.parametrize("device", DEVICES)
def test_eval_pictures_match_the_pillow_pipeline(folder, device):
    _, ev_dev, classes, _ = _loaders(folder, "device", device)
    _, ev_pil, classes_pil, _ = _loaders(folder, "workers")
    assert classes == classes_pil == ["ants", "bees"]
    xs_d, ys_d = zip(*list(ev_dev))
    xs_p, ys_p = zip(*list(ev_pil))
    assert xs_d[0].device.type == device
    x_d, x_p = torch.cat(xs_d).cpu(), torch.cat(xs_p)
    assert torch.equal(torch.cat(ys_d).cpu(), torch.cat(ys_p))
    assert x_d.shape == x_p.shape == (6, 3, 32, 32) and x_d.dtype == torch.float32
    # different JPEG decoders and resampling code: close, not bit-equal (normalised units,
    # where one grey level is ~0.017)
    diff = (x_d - x_p).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.05, (diff.mean(), diff.max())
    assert float((x_d - x_p.flip(-1)).abs().mean()) > 3 * float(diff.mean())  # not vacuous


@pytest.mark.parametrize("device", DEVICES)
def test_train_batches_are_augmented_reproducibly(folder, device):
    tl, _, _, sampler = _loaders(folder, "device", device)
    assert len(tl) == 4 and len(tl.dataset) == 16
    tl.set_epoch(0)
    a = list(tl)
    b = list(tl)
    tl.set_epoch(1)
    c = list(tl)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 3, 32, 32) and torch.isfinite(xa).all()
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # labels follow the sampler's order of the dataset's samples
    tl.set_epoch(0)
    order = list(iter(sampler))
    want = torch.tensor([tl.dataset.samples[i][1] for i in order])
    assert torch.equal(torch.cat([y for _, y in a]).cpu(), want)


def test_crop_boxes_follow_random_resized_crop():
    """Same distribution as torchvision's RandomResizedCrop.get_params (which draws from the
    global generator): boxes inside the picture, equal mean area and aspect within sampling
    error over 3,000 draws on the same picture sizes."""
    from torchvision import transforms as T

    gen = torch.Generator().manual_seed(0)
    sizes = [tuple(int(v) for v in torch.randint(20, 300, (2,), generator=gen))
             for _ in range(3000)]
    ours, theirs = [], []
    torch.manual_seed(0)
    for h, w in sizes:
        top, left, ch, cw = random_resized_crop_box(h, w, gen)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        ours.append((ch * cw / (h * w), math.log(cw / ch)))
        top, left, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, h, w), (0.08, 1.0),
                                                           (3 / 4, 4 / 3))
        theirs.append((ch * cw / (h * w), math.log(cw / ch)))
    a, b = torch.tensor(ours), torch.tensor(theirs)
    assert (a.mean(0) - b.mean(0)).abs().max() < 0.02, (a.mean(0), b.mean(0))
    assert (a.std(0) - b.std(0)).abs().max() < 0.02
    # a very wide picture takes the fallback: the central crop of ratio 4/3
    assert random_resized_crop_box(10, 1000, gen) == (0, 493, 10, 13)


def test_corrupt_file_is_named(tmp_path, folder):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    with open(root / "train" / "ants" / "0.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 certainly not a jpeg")
    for val in (None, 3):  # with a validation split the loader sees a Subset
        tl, _, _, _ = D.image_folder_loaders(str(root), 4, 0, 32, 0, 1, 0, val, decode="device")
        with pytest.raises(D.DataError, match=r"ants.0\.jpg"):
            for _ in tl:
                pass


def test_paam_train_on_an_image_folder_decoding_on_the_device(tmp_path, folder):
    out = str(tmp_path / "run")
    assert main(["--dataset", "imagefolder", "--data", folder, "--arch", "resnet20",
                 "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--workers", "0",
                 "--decode", "device", "--val", "4", "--out", out, "--quiet"]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["dataset"] == "imagefolder" and rep["val_top1"] is not None
    assert rep["params_final"] < rep["params_dense"]
