"""The in-memory data path (--data-on-device), a speed path off the reading path: a small data set
(Fashion-MNIST, CIFAR, a few thousand files) is decoded once into a uint8 tensor on the training
device and augmented there in batches, so no per-image Python and no loader workers run during
training. It draws the same recipe (`data.Augmentation`) as the per-image path of data.py, with three
differences: a crop box that does not fit is clipped to the image instead of re-drawn; crops are
cut from the image resized once to --img-size, not from the original file; and the bicubic
resampling has no antialiasing.

    loader, num_images, num_classes = in_memory_loader(data, root, train=True, img_size=28, ...)
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

from data import (IMAGENET_MEAN, IMAGENET_STD, DataError, Selection, build_dataset, center_view,
                  check_one_batch)


def in_memory_loader(data, root, train, img_size, batch_size, augmentation=None,
                     stats=(IMAGENET_MEAN, IMAGENET_STD), crop_pct=1.0, subset=0, classes=(), device='cpu',
                     seed=0, rank=0, world_size=1, unlabelled=False):
    """The training (augmentation given) or evaluation (crop_pct's view) loader of a data set decoded
    into memory on `device` (`unlabelled`: as data.build_dataset's). -> (DeviceLoader, number of
    images, number of classes)."""
    images, labels, num_classes = decode_to_tensor(data, root, train, img_size, crop_pct, subset,
                                                   classes, device, unlabelled)
    loader = DeviceLoader(images, labels, batch_size, train, augmentation, stats, seed, rank, world_size)
    return loader, len(images), num_classes


def decode_to_tensor(data, root, train, size, crop_pct=1.0, subset=0, classes=(), device='cpu', unlabelled=False):
    """-> (images uint8 (N, 3, size, size) on device, labels (N,), num_classes). crop_pct=1 gives the
    training view, each image resized to size x size, in which DeviceLoader draws its crops; 0.875 the
    evaluation view (`center_view`). A training view of non-square images would keep only their center
    square, and crops could not reach the sides: refused, such images train on the per-image path."""
    geometry = center_view(size, crop_pct)
    dataset, num_classes = build_dataset(data, root, train, transform=None,
                                         subset=subset, classes=classes, unlabelled=unlabelled)
    base, keep = (dataset.dataset, dataset.indices) if isinstance(dataset, Selection) else (dataset, None)
    raw = getattr(base, 'data', None)
    if isinstance(raw, torch.Tensor) or type(raw).__name__ == 'ndarray':   # MNIST / CIFAR: one array
        images, labels = torch.as_tensor(raw), torch.as_tensor(base.targets)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        if classes:
            labels = torch.tensor([dataset.relabel[int(label)] for label in labels])
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)   # (N, C, H, W)
        images = v2.Compose(geometry)(images.expand(-1, 3, -1, -1).to(device))
    else:                                                   # image files: decode one by one, once
        to_tensor = v2.Compose([v2.RGB(), *geometry, v2.PILToTensor()])
        pairs = [dataset[i] for i in range(len(dataset))]
        not_square = [img.size for img, _ in pairs if img.width != img.height]
        if crop_pct == 1.0 and not_square:
            raise DataError(f"--data-on-device: {len(not_square)} of {len(pairs)} training images of "
                            f"{data} are not square (e.g. {not_square[0][0]}x{not_square[0][1]}); the "
                            f"in-memory path keeps a square of each, which cuts off sides that crops "
                            f"reach: train without --data-on-device (the per-image path crops from the "
                            f"whole image)")
        pairs = [(to_tensor(img), label) for img, label in pairs]
        images = torch.stack([img for img, _ in pairs]).to(device)
        labels = torch.tensor([label for _, label in pairs])
    return images.contiguous(), labels.to(device), num_classes


def batched_resized_crop_flip(imgs, size, min_scale=0.08, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + horizontal flip for a whole batch at once on its device: each image gets
    its own crop box (area share ~ U(min_scale, 1), log aspect ratio ~ U(log 3/4, log 4/3)) and flip,
    applied with one affine grid_sample (bicubic). Unlike torchvision, a box that does not fit is
    clipped to the image instead of re-drawn. imgs (B, C, H, W) float -> (B, C, size, size)."""
    B, device = imgs.shape[0], imgs.device
    area = torch.empty(B, device=device).uniform_(min_scale, 1.0)
    log_ratio = torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)     # shares of the image side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    center_x = (torch.rand(B, device=device) * 2 - 1) * (1 - width)    # in [-1, 1] grid units
    center_y = (torch.rand(B, device=device) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)                # output grid -> input grid
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, center_x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, (B, imgs.shape[1], size, size), align_corners=False)
    return F.grid_sample(imgs, grid, mode='bicubic', padding_mode='border', align_corners=False)


class TensorBatches:
    """Mini-batches of tensors already in memory, inputs (N, ...) and labels (N,), used like the
    DataLoader of `build_loader`: len(), iteration over (inputs, labels), sampler.set_epoch. Training
    visits this process's shard in its DistributedSampler's order without the last partial batch, as
    the DataLoader does; evaluation visits all, in turn."""

    def __init__(self, inputs, labels, batch_size, train, seed=0, rank=0, world_size=1):
        if train:
            check_one_batch(len(labels), batch_size, world_size)
        self.inputs, self.labels, self.batch_size, self.train = inputs, labels, batch_size, train
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=world_size, rank=rank,
                                          shuffle=train, seed=seed, drop_last=train)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def batch_indices(self):
        order = torch.tensor(list(self.sampler), device=self.labels.device)
        for step in range(len(self)):
            yield order[step * self.batch_size:(step + 1) * self.batch_size]

    def __iter__(self):
        for idx in self.batch_indices():
            yield self.inputs[idx], self.labels[idx]


class DeviceLoader(TensorBatches):
    """Batches of a decoded data set (uint8 images (N, 3, S, S)), sliced, augmented and normalised on
    its device. `augmentation` (None: the images as decoded) is applied as `per_image_transform` does:
    the crop and flip for the whole batch at once, RandAugment and random erasing image by image (each
    draws one choice per call, and each image needs its own); RandAugment's ops are PIL's."""

    def __init__(self, images, labels, batch_size, train, augmentation=None,
                 stats=(IMAGENET_MEAN, IMAGENET_STD), seed=0, rank=0, world_size=1):
        super().__init__(images, labels, batch_size, train, seed, rank, world_size)
        self.augmentation = augmentation
        self.randaugment, self.erasing = augmentation.per_image_ops(stats) if augmentation else (None, None)
        self.mean = torch.tensor(stats[0], device=images.device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats[1], device=images.device).view(1, 3, 1, 1)

    def __iter__(self):
        for idx in self.batch_indices():
            imgs = self.inputs[idx].float() / 255                                   # (B, 3, S, S)
            if self.augmentation:
                imgs = batched_resized_crop_flip(imgs, imgs.shape[-1], self.augmentation.min_scale)
                imgs = imgs.clamp(0, 1)
            if self.randaugment:     # PIL ops on uint8 images, as per image: to the CPU and back once
                as_uint8 = (imgs * 255).round().to(torch.uint8).cpu()
                imgs = torch.stack([self.randaugment(img) for img in as_uint8]).to(imgs.device) / 255
            imgs = (imgs - self.mean) / self.std
            if self.erasing:
                imgs = torch.stack([self.erasing(img) for img in imgs])
            yield imgs, self.labels[idx]


