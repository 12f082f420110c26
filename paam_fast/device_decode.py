"""ImageFolder batches decoded and augmented on the training device.

DataLoader workers only read the files' bytes; the main process decodes each batch at once with
``torchvision.io.decode_jpeg(..., device=dev)`` (nvJPEG on a GPU) and crops, resizes, flips and
normalises the images there.  On ImageNet this moves the dominant CPU cost of the input pipeline
(Pillow decoding, ~5 ms a picture) off the host's cores.  Files nvJPEG cannot read (PNG or CMYK
pictures with a .JPEG name, a handful in ImageNet) are decoded on the CPU with
``torchvision.io.decode_image`` and moved; a file nobody can decode raises
:class:`paam_fast.data.DataError` naming it.

Augmentation matches torchvision's ``RandomResizedCrop(size) + RandomHorizontalFlip`` (scale
0.08-1, ratio 3/4-4/3, bilinear with antialias) for training and ``Resize(size·8/7) +
CenterCrop(size)`` for evaluation.  The random draws come from a generator seeded by (seed,
epoch, rank), so an epoch replays exactly on resume.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DataError

__all__ = ["EncodedImages", "DeviceDecodeLoader", "collate_encoded", "random_resized_crop_box"]


class EncodedImages(torch.utils.data.Dataset):
    """(path, label) samples served as (raw file bytes as a uint8 tensor, label, index)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.io import read_file

        return read_file(self.samples[i][0]), self.samples[i][1], i


def collate_encoded(batch):
    """(all files' bytes in one uint8 tensor, their lengths, labels, indices): one shared-memory
    tensor per batch crosses from a worker, not one per picture (file descriptors)."""
    return (torch.cat([b[0] for b in batch]), [b[0].numel() for b in batch],
            torch.tensor([b[1] for b in batch], dtype=torch.int64), [b[2] for b in batch])


def random_resized_crop_box(h: int, w: int, gen: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of torchvision's RandomResizedCrop.get_params, drawn from
    ``gen`` instead of the global generator."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return i, j, ch, cw
    in_ratio = w / h  # fallback: the central crop of the clamped ratio
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> float (C, h, w), bilinear with antialias (torchvision's Resize)."""
    return F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


class DeviceDecodeLoader:
    """Iterates (x float (B, 3, S, S) normalised on ``device``, y int64 (B,)) over a DataLoader of
    :class:`EncodedImages`."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device | str, *,
                 train: bool, image_size: int, mean, std, seed: int = 0, rank: int = 0,
                 sampler=None, channels_last: bool = False) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.train, self.size = train, image_size
        self.seed, self.rank, self.sampler = seed, rank, sampler
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch = 0

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _path(self, i: int) -> str:
        """The file of sample ``i``, an index of the innermost dataset (EncodedImages returns
        its own index, already mapped through any Subset)."""
        ds = self.loader.dataset
        while isinstance(ds, torch.utils.data.Subset):
            ds = ds.dataset
        return ds.samples[i][0]

    def decode(self, datas: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
        """uint8 (3, H, W) images on the device; batched nvJPEG first, then one by one."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass  # one bad or non-JPEG file fails the whole batch: go one by one
        out = []
        for data, i in zip(datas, idx):
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                continue
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                pass
            try:
                out.append(decode_image(data, mode=ImageReadMode.RGB).to(self.device))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                raise DataError(f"cannot decode image {self._path(i)}: {e}") from e
        return out

    def _augment(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        _, h, w = img.shape
        top, left, ch, cw = random_resized_crop_box(h, w, gen)
        out = _resize(img[:, top:top + ch, left:left + cw], (self.size, self.size))
        if float(torch.rand((), generator=gen)) < 0.5:
            out = out.flip(-1)
        return out

    def _center(self, img: torch.Tensor) -> torch.Tensor:
        _, h, w = img.shape
        short = round(self.size * 8 / 7)
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        out = _resize(img, (nh, nw))
        # torchvision's CenterCrop rounds the offset (a floor would shift odd sizes by one)
        top, left = int(round((nh - self.size) / 2)), int(round((nw - self.size) / 2))
        return out[:, top:top + self.size, left:left + self.size]

    def __iter__(self):
        gen = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 64 + self.rank)
        for flat, lengths, y, idx in self.loader:
            imgs = self.decode(list(flat.split(lengths)), idx)
            crops = [self._augment(im, gen) if self.train else self._center(im) for im in imgs]
            x = (torch.stack(crops) - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
