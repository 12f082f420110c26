"""Datasets for ``paam-train``: the embedded digits set, CIFAR-10 and ImageFolder / ImageNet.

Small datasets (digits, CIFAR-10) are decoded once into a cached uint8 array and served by
:class:`TensorLoader`, which keeps the whole set on the training device and augments each batch
there (pad-and-crop, flip, normalise): no worker processes and no host work per step.
Large ones (ImageNet, any ImageFolder) go through a ``DataLoader``: either its workers decode
with Pillow, or they only read bytes and each batch is decoded on the training device with
``torchvision.io.decode_jpeg`` (nvJPEG on a GPU; :mod:`paam_fast.device_decode`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

__all__ = ["ArrayData", "DataError", "load_digits", "load_cifar10", "load_array_folder",
           "split_validation", "TensorLoader", "image_folder_loaders", "LAYOUTS"]

LAYOUTS = """accepted --data layouts:
  * a .tar.gz (or .tar) holding train/<class>/*.jpg|png and test/<class>/*.jpg|png
  * a folder holding train/<class>/... and test/<class>/... (ImageFolder layout)
  * torchvision's CIFAR-10 binary folder (cifar-10-batches-py, or the folder that holds it)"""

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ArrayData:
    """Images as uint8 (N, H, W, C) and labels int64 (N,), with class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, idx: torch.Tensor) -> ArrayData:
        return ArrayData(self.x[idx], self.y[idx], self.classes)


# --------------------------------------------------------------------------- sources
def load_digits(size: int = 32) -> tuple[ArrayData, ArrayData]:
    """scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels; shipped with the package,
    offline), upsampled to ``size``×``size`` and repeated to 3 channels. A fixed, stratified
    80/20 train/test split (1,437 / 360 images)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # a dependency of the package; say what to install
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    d = sk_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(1234)
    test_idx = []
    for c in range(10):  # stratified: 20% of every class
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        test_idx.append(idx[: round(0.2 * idx.numel())])
    test = torch.sort(torch.cat(test_idx)).values
    is_test = torch.zeros(y.numel(), dtype=torch.bool)
    is_test[test] = True
    classes = [str(c) for c in range(10)]
    return (ArrayData(x[~is_test], y[~is_test], classes),
            ArrayData(x[is_test], y[is_test], classes))


def _decode(data: bytes, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many kinds for a corrupt image
        raise DataError(f"cannot decode image {name}: {e}") from e


def _split_of(path: str) -> tuple[str, str] | None:
    """('train'|'test', class) for a member path like [prefix/]train/cat/0001.jpg."""
    parts = [p for p in path.replace("\\", "/").split("/") if p and p != "."]
    if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
        return None
    split, cls = parts[-3], parts[-2]
    if split not in ("train", "test"):
        return None
    return split, cls


def _stack(items: dict[str, list], split: str, where: str) -> tuple[np.ndarray, np.ndarray, list]:
    classes = sorted(items)
    if not classes:
        raise DataError(f"no {split}/<class>/ images found in {where}\n{LAYOUTS}")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for _, arr in sorted(items[c], key=lambda t: t[0]):
            xs.append(arr)
            ys.append(ci)
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"images in {where} differ in size ({sorted(shapes)[:3]}); use "
                        "--dataset imagefolder for images of mixed sizes")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _read_archive(path: str) -> dict[str, np.ndarray]:
    found: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                where = _split_of(m.name)
                if where is None:
                    continue
                f = tar.extractfile(m)
                if f is None:
                    continue
                found[where[0]].setdefault(where[1], []).append((m.name, _decode(f.read(), m.name)))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read the archive {path}: {e}\n{LAYOUTS}") from e
    return _arrays(found, path)


def _read_folder(path: str) -> dict[str, np.ndarray]:
    found: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for split in ("train", "test"):
        root = os.path.join(path, split)
        if not os.path.isdir(root):
            continue
        for cls in sorted(os.listdir(root)):
            cdir = os.path.join(root, cls)
            if not os.path.isdir(cdir):
                continue
            for fn in sorted(os.listdir(cdir)):
                if fn.lower().endswith((".jpg", ".jpeg", ".png")):
                    full = os.path.join(cdir, fn)
                    with open(full, "rb") as f:
                        found[split].setdefault(cls, []).append((fn, _decode(f.read(), full)))
    return _arrays(found, path)


def _arrays(found, where: str) -> dict[str, np.ndarray]:
    xtr, ytr, ctr = _stack(found["train"], "train", where)
    xte, yte, cte = _stack(found["test"], "test", where)
    if ctr != cte:
        raise DataError(f"train and test classes differ in {where}: {ctr} vs {cte}")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
            "classes": np.asarray(ctr)}


def _read_cifar_binary(path: str) -> dict[str, np.ndarray]:
    import torchvision

    root = os.path.dirname(path) if os.path.basename(path) == "cifar-10-batches-py" else path
    try:
        tr = torchvision.datasets.CIFAR10(root, train=True, download=False)
        te = torchvision.datasets.CIFAR10(root, train=False, download=False)
    except Exception as e:  # torchvision raises RuntimeError / OSError on missing batches
        raise DataError(f"cannot read CIFAR-10 batches under {root}: {e}\n{LAYOUTS}") from e
    return {"x_train": tr.data, "y_train": np.asarray(tr.targets, dtype=np.int64),
            "x_test": te.data, "y_test": np.asarray(te.targets, dtype=np.int64),
            "classes": np.asarray(tr.classes)}


def default_cache_dir() -> str:
    return os.environ.get("PAAM_FAST_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "paam_fast"))


def load_array_folder(path: str, cache_dir: str | None = None) -> tuple[ArrayData, ArrayData]:
    """Train and test sets of an archive or folder (see ``LAYOUTS``), decoded once and cached
    as uint8 arrays (``cache_dir``, default ``$PAAM_FAST_CACHE`` or ~/.cache/paam_fast)."""
    if not path or not os.path.exists(path):
        raise DataError(f"--data {path!r} does not exist\n{LAYOUTS}")
    if not os.access(path, os.R_OK):
        raise DataError(f"--data {path!r} is not readable\n{LAYOUTS}")
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|v1".encode())
    cache_dir = cache_dir or default_cache_dir()
    cache = os.path.join(cache_dir, f"images-{key.hexdigest()[:16]}.npz")
    arrays = None
    if os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            arrays = None  # a damaged cache is rebuilt
    if arrays is None:
        if os.path.isdir(path):
            if os.path.isdir(os.path.join(path, "train")):
                arrays = _read_folder(path)
            elif os.path.isdir(os.path.join(path, "cifar-10-batches-py")) or \
                    os.path.basename(os.path.normpath(path)) == "cifar-10-batches-py":
                arrays = _read_cifar_binary(os.path.normpath(path))
            else:
                raise DataError(f"--data {path!r} has no train/ folder\n{LAYOUTS}")
        elif tarfile.is_tarfile(path):
            arrays = _read_archive(path)
        else:
            raise DataError(f"--data {path!r} is neither a folder nor a tar archive\n{LAYOUTS}")
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = cache + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache only costs the decode next time
    classes = [str(c) for c in arrays["classes"].tolist()]
    return (ArrayData(torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]),
                      classes),
            ArrayData(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]),
                      classes))


def load_cifar10(path: str, cache_dir: str | None = None) -> tuple[ArrayData, ArrayData]:
    train, test = load_array_folder(path, cache_dir)
    if tuple(train.x.shape[1:]) != (32, 32, 3):
        raise DataError(f"CIFAR-10 images are 32×32 RGB; {path} holds {tuple(train.x.shape[1:])}")
    return train, test


def split_validation(train: ArrayData, val: float | int) -> tuple[ArrayData, ArrayData]:
    """Carve a validation set from ``train``: ``val`` images (int) or a fraction (float), drawn
    per class with a fixed seed, so every run (whatever its --seed) sees the same split."""
    n = len(train)
    k = int(val) if isinstance(val, int) or val >= 1 else round(val * n)
    if not (0 < k < n):
        raise DataError(f"--val must leave images on both sides, got {val} of {n}")
    gen = torch.Generator().manual_seed(20221020)
    picks = []
    for c in torch.unique(train.y).tolist():  # stratified: the same share of every class
        idx = torch.nonzero(train.y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        picks.append(idx[: round(k * idx.numel() / n)])
    pick = torch.cat(picks)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[pick] = True
    return train.subset(torch.nonzero(~is_val).flatten()), train.subset(pick.sort().values)


# --------------------------------------------------------------------------- loading
class TensorLoader:
    """Batches of a uint8 array held on ``device``, augmented there.

    Each epoch's order and augmentation come from a generator seeded by (seed, epoch), so a run
    resumed at an epoch boundary replays exactly.  Under DDP each rank takes an equal, disjoint
    share of the epoch's permutation.  ``train=True`` drops the last partial batch (static shapes
    for CUDA graphs) and augments: random crop after zero-padding by ``pad``, horizontal flip
    (``flip``), then normalisation.  Yields (x float (B, C, H, W), y int64 (B,)).
    """

    def __init__(self, data: ArrayData, batch_size: int, device: torch.device | str, *,
                 train: bool, mean, std, pad: int = 4, flip: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.x = data.x.to(self.device).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W) uint8
        self.y = data.y.to(self.device)
        self.batch_size, self.train = batch_size, train
        self.pad, self.flip, self.seed = pad, flip, seed
        self.rank, self.world = rank, world
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch = 0
        if train and len(self) == 0:
            raise DataError(f"batch size {batch_size} is larger than the {len(data)} training "
                            f"images{' per rank' if world > 1 else ''}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = self.y.numel()
        if not self.train:
            idx = torch.arange(n)
            return idx[self.rank::self.world]
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(n, generator=gen)
        per = n // self.world
        return perm[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        n = self.y.numel() // self.world if self.train else -(-self.y.numel() // self.world)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.pad:
            xp = F.pad(x, (self.pad,) * 4)
            oy = torch.randint(0, 2 * self.pad + 1, (b,), generator=gen, device=x.device)
            ox = torch.randint(0, 2 * self.pad + 1, (b,), generator=gen, device=x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = xp[bi, ci, rows, cols]
        if self.flip:
            f = torch.rand(b, generator=gen, device=x.device) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(3), x)
        return x

    def __iter__(self):
        idx = self._indices().to(self.device)
        # augmentation draws on the device itself: no host round trip per batch
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100003 + self.epoch
                                                              + 7919)
        nb = len(self)
        for i in range(nb):
            j = idx[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[j].float()
            if self.train:
                x = self._augment(x, gen)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[j]


def image_folder_loaders(root: str, batch_size: int, workers: int, image_size: int,
                         rank: int, world: int, seed: int, val: float | int | None,
                         decode: str = "workers", device: torch.device | str = "cpu",
                         channels_last: bool = False):
    """Loaders over ImageFolder trees (ImageNet: ``root/train``, ``root/val``).
    RandomResizedCrop(image_size) + flip for training; Resize(image_size·8/7) + CenterCrop for
    evaluation.  ``decode="workers"``: DataLoader workers decode with Pillow and yield CPU
    tensors; ``decode="device"``: workers read bytes and each batch is decoded and augmented
    on ``device`` (:mod:`paam_fast.device_decode`).  Returns (train_loader, eval_loader,
    classes, sampler)."""
    import torchvision
    from torchvision import transforms as T

    tr_dir = os.path.join(root, "train")
    ev_dir = next((os.path.join(root, d) for d in ("val", "test")
                   if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(tr_dir) or ev_dir is None:
        raise DataError(f"--data {root!r} must hold train/ and val/ (or test/) in ImageFolder "
                        f"layout\n{LAYOUTS}")
    if decode not in ("workers", "device"):
        raise ValueError(f"decode must be 'workers' or 'device', got {decode!r}")
    try:
        if decode == "device":
            from .device_decode import EncodedImages

            scan_tr = torchvision.datasets.ImageFolder(tr_dir)
            scan_ev = torchvision.datasets.ImageFolder(ev_dir)
            train = EncodedImages(scan_tr.samples)
            evald = EncodedImages(scan_ev.samples)
            train_as_eval = train
            classes = scan_tr.classes
        else:
            norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
            t_train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                 T.ToTensor(), norm])
            t_eval = T.Compose([T.Resize(round(image_size * 8 / 7)), T.CenterCrop(image_size),
                                T.ToTensor(), norm])
            train = torchvision.datasets.ImageFolder(tr_dir, t_train)
            evald = torchvision.datasets.ImageFolder(ev_dir, t_eval)
            train_as_eval = torchvision.datasets.ImageFolder(tr_dir, t_eval) if val else None
            classes = train.classes
    except (FileNotFoundError, OSError) as e:  # e.g. a class folder without images
        raise DataError(f"--data {root!r}: {e}\n{LAYOUTS}") from e
    if val:
        n = len(train)
        k = int(val) if isinstance(val, int) or val >= 1 else round(val * n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(20221020)).tolist()
        evald = torch.utils.data.Subset(train_as_eval, perm[:k])
        train = torch.utils.data.Subset(train, perm[k:])
    sampler = torch.utils.data.distributed.DistributedSampler(
        train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    ev_sampler = torch.utils.data.distributed.DistributedSampler(
        evald, num_replicas=world, rank=rank, shuffle=False)
    kw = {"num_workers": workers, "pin_memory": torch.cuda.is_available(),
          "persistent_workers": workers > 0}
    if decode == "device":
        from .device_decode import DeviceDecodeLoader, collate_encoded

        kw["collate_fn"] = collate_encoded
        kw["pin_memory"] = False  # ragged byte strings: nothing worth pinning
    tl = torch.utils.data.DataLoader(train, batch_size, sampler=sampler, drop_last=True, **kw)
    el = torch.utils.data.DataLoader(evald, batch_size, sampler=ev_sampler, **kw)
    if decode == "device":
        common = {"image_size": image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                  "seed": seed, "rank": rank, "channels_last": channels_last}
        tl = DeviceDecodeLoader(tl, device, train=True, sampler=sampler, **common)
        el = DeviceDecodeLoader(el, device, train=False, **common)
    return tl, el, classes, sampler
