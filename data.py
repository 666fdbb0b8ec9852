"""Data sets, the paper's transform recipes, and the loader. Nothing model-related lives here.

`--data` is a name (fashion_mnist, cifar10, cifar100, flowers, pets, aircraft, cars, synthetic) or the
path of a folder in ImageNet layout: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg. Every image,
whatever its size and mode (grayscale, RGBA, palette), becomes a 3-channel tensor of --img-size.
"""
import gzip
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A grayscale data set is normalised with its own statistics, equal in the three channels, so that a
# grey image stays grey (with ImageNet's per-channel ones a flat grey patch becomes three different
# offsets, and MAE's norm-pix target of a flat patch a colour pattern). Colour data: ImageNet's.
GRAYSCALE_STATS = {'fashion_mnist': (0.2860, 0.3530)}     # mean, std of the 60,000 training images
BICUBIC = InterpolationMode.BICUBIC
PIL_BICUBIC = Image.Resampling.BICUBIC
NAMED = ('fashion_mnist', 'cifar10', 'cifar100', 'flowers', 'pets', 'aircraft', 'cars', 'synthetic')
DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')


class DataError(Exception):
    """Missing, empty or unreadable data: reported as one line that says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Transforms: the pre-training, fine-tuning, probing and evaluation recipes
# --------------------------------------------------------------------------------------------------
def normalization(data):
    """(mean, std) per channel for the data set `data` (a name or a folder)."""
    if data in GRAYSCALE_STATS:
        mean, std = GRAYSCALE_STATS[data]
        return (mean,) * 3, (std,) * 3
    return IMAGENET_MEAN, IMAGENET_STD


def fill_colour(stats):
    """The colour RandAugment fills in where an image was moved away: the data set's mean colour,
    round(255 x mean) per channel (timm's img_mean): (124, 116, 104) with ImageNet's statistics."""
    return tuple(min(255, round(255 * m)) for m in stats[0])


IMAGENET_FILL = fill_colour((IMAGENET_MEAN, IMAGENET_STD))     # (124, 116, 104)


@dataclass(frozen=True)
class Augmentation:
    """A training recipe's augmentation: the one definition that both data paths apply, per image
    (`per_image_transform`, the DataLoader's) and in batches on the device (`DeviceLoader`).

    RandomResizedCrop (area share ~ U(min_scale, 1), bicubic) and a horizontal flip, then timm's
    RandAugment (num_ops, magnitude, magnitude_std) if rand_aug, normalisation with the data set's
    statistics, and random erasing with probability reprob. The recipes:
      pre-training  Augmentation(min_scale=0.08)               MAE-Lite's crop (MAE's: 0.2) + flip
      fine-tuning   Augmentation(0.08, (2, 10, 0.5), reprob=0)  + 'rand-m10-mstd0.5-inc1'
      probing       Augmentation()                              MAE's linear probe: crop + flip
    (evaluation: no augmentation, `eval_transform`.) MixUp/CutMix act on batches, in finetune.py."""
    min_scale: float = 0.08
    rand_aug: tuple | None = None    # (num_ops, magnitude, magnitude_std) of timm's RandAugment, or None
    reprob: float = 0.0

    def per_image_ops(self, stats):
        """-> (RandAugment filling with the data set's mean colour, random erasing with per-pixel normal
        noise (timm's 'pixel' mode)), each None when the recipe has none: the ops drawn image by image
        on both paths."""
        randaugment = RandAugment(*self.rand_aug, fill=fill_colour(stats)) if self.rand_aug else None
        erasing = v2.RandomErasing(p=self.reprob, value='random') if self.reprob > 0 else None
        return randaugment, erasing


def _to_normalized_tensor(stats):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*stats)]


def per_image_transform(augmentation, img_size, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """`augmentation` for one image at a time: PIL image -> float tensor (3, img_size, img_size)."""
    randaugment, erasing = augmentation.per_image_ops(stats)
    return v2.Compose([
        v2.RGB(),
        v2.RandomResizedCrop(img_size, scale=(augmentation.min_scale, 1.0), interpolation=BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        *([randaugment] if randaugment else []),
        *_to_normalized_tensor(stats),
        *([erasing] if erasing else []),
    ])


def center_view(img_size, crop_pct=0.875):
    """The evaluation view: resize the short side to img_size / crop_pct (256 for 224), bicubic, and
    center-crop img_size."""
    return [v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(img_size)]


def eval_transform(img_size, crop_pct=0.875, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """The evaluation view of one image, normalised: PIL image -> float tensor (3, img_size, img_size)."""
    return v2.Compose([v2.RGB(), *center_view(img_size, crop_pct), *_to_normalized_tensor(stats)])


# --------------------------------------------------------------------------------------------------
# RandAugment as timm's 'rand-n{N}-m{M}-mstd{S}-inc1' (the paper's 'rand-m10-mstd0.5-inc1')
# --------------------------------------------------------------------------------------------------
def _signed(value):
    """value or -value at even odds (the signed ops go either way)."""
    return -value if torch.rand(()).item() < 0.5 else value


def _enhance(enhancer):
    """The op of a PIL enhancer at factor 1 +- 0.9 level, at least 0.1 (factor 1 keeps the image)."""
    return lambda img, level, fill: enhancer(img).enhance(max(0.1, 1.0 + _signed(0.9 * level)))


def _affine(img, fill, shear=(0, 0), shift=(0, 0)):
    """Output pixel (x, y) <- input pixel (x + shear_x y + shift_x, shear_y x + y + shift_y), bicubic;
    pixels from outside the image get the fill colour."""
    matrix = (1, shear[0], shift[0], shear[1], 1, shift[1])
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=PIL_BICUBIC, fillcolor=fill)


def _posterize(img, bits):
    """Keep the `bits` high bits of each channel value; 0 bits: black (current Pillow refuses 0 bits;
    older Pillow, which timm was written against, gave black)."""
    return ImageOps.posterize(img, bits) if bits else Image.new(img.mode, img.size)


def _solarize_add(img, add):
    """Channel values v < 128 become min(255, v + add); the others stay."""
    return img.point([min(255, v + add) if v < 128 else v for v in range(256)] * len(img.getbands()))


# op(img, level, fill), level = magnitude / 10 in [0, 1]: timm's '-inc1' set (_RAND_INCREASING_TRANSFORMS),
# each op more severe as the level grows; no identity op
RAND_AUGMENT_OPS = {
    'AutoContrast': lambda img, level, fill: ImageOps.autocontrast(img),
    'Equalize': lambda img, level, fill: ImageOps.equalize(img),
    'Invert': lambda img, level, fill: ImageOps.invert(img),
    'Rotate': lambda img, level, fill: img.rotate(_signed(30 * level), resample=PIL_BICUBIC, fillcolor=fill),
    'PosterizeIncreasing': lambda img, level, fill: _posterize(img, 4 - int(4 * level)),     # 4 .. 0 bits
    'SolarizeIncreasing': lambda img, level, fill: ImageOps.solarize(img, 256 - int(256 * level)),
    'SolarizeAdd': lambda img, level, fill: _solarize_add(img, int(110 * level)),
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, level, fill: _affine(img, fill, shear=(_signed(0.3 * level), 0)),
    'ShearY': lambda img, level, fill: _affine(img, fill, shear=(0, _signed(0.3 * level))),
    'TranslateXRel': lambda img, level, fill: _affine(img, fill, shift=(_signed(0.45 * level) * img.width, 0)),
    'TranslateYRel': lambda img, level, fill: _affine(img, fill, shift=(0, _signed(0.45 * level) * img.height)),
}


class RandAugment:
    """timm's RandAugment with magnitude noise: num_ops times, an op picked uniformly from the 15 of
    RAND_AUGMENT_OPS (with replacement) runs with probability 0.5, at a magnitude drawn for it from
    N(magnitude, magnitude_std) clipped to [0, 10]. Takes a PIL RGB image, or a uint8 tensor (3, H, W),
    which goes through the same PIL ops and comes back to its device, so both paths draw alike."""

    def __init__(self, num_ops=2, magnitude=10, magnitude_std=0.5, fill=IMAGENET_FILL):
        self.num_ops, self.magnitude, self.magnitude_std, self.fill = num_ops, magnitude, magnitude_std, fill

    def draw(self):
        """-> [(op name, magnitude)], the ops to apply to one image, in order."""
        names = list(RAND_AUGMENT_OPS)
        picked = torch.randint(len(names), (self.num_ops,)).tolist()
        runs = (torch.rand(self.num_ops) < 0.5).tolist()
        magnitudes = (self.magnitude + self.magnitude_std * torch.randn(self.num_ops)).clamp(0, 10).tolist()
        return [(names[i], m) for i, run, m in zip(picked, runs, magnitudes) if run]

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            as_pil = v2.functional.to_pil_image(img.cpu())                      # (3, H, W) uint8 -> PIL
            return v2.functional.pil_to_tensor(self(as_pil)).to(img.device)
        for name, magnitude in self.draw():
            img = RAND_AUGMENT_OPS[name](img, magnitude / 10, self.fill)
        return img


def rand_augment(spec):
    """timm's RandAugment spec -> RandAugment (ImageNet's fill), or None for 'none'. 'm10-mstd0.5' (2
    ops, magnitude 10, std 0.5), 'n3-m9' (3 ops, magnitude 9, no noise), optionally as 'rand-...-inc1'.
    The op set is always timm's increasing one ('inc1'), the paper's. A bad spec raises ValueError."""
    if spec.lower() == 'none':
        return None
    match = re.fullmatch(r'(?:rand-)?(?:n(\d+)-)?m(\d+)(?:-mstd(\d+(?:\.\d*)?))?(?:-inc1)?', spec)
    if not match or int(match[2]) > 10:
        raise ValueError(f"'{spec}' is not a RandAugment spec: expected timm's e.g. 'm10-mstd0.5' (2 ops, "
                         f"magnitude 0..10, magnitude std), 'n3-m9', optionally 'rand-...-inc1', or 'none'")
    return RandAugment(int(match[1] or 2), int(match[2]), float(match[3] or 0.0))


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------
def load_rgb(path):
    """Open an image file as RGB; a corrupt or unreadable file stops the run with its name."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); "
                        f"remove or replace this file") from None


def image_folder(root, split, transform):
    """DIR/<split>/<class>/* as an ImageFolder that reads every image as RGB."""
    folder = Path(root) / split
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet layout)"
    if not folder.is_dir():
        raise DataError(f"no folder {folder}: {layout}")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as e:     # no class folders, or class folders without images
        raise DataError(f"no images found under {folder} ({e}): {layout}") from None


class SyntheticImages(Dataset):
    """Random images with a learnable label (a bright square whose position depends on the class),
    deterministic per index. For tests and smoke runs only: it proves nothing about vision."""

    def __init__(self, num_images, num_classes=10, size=32, seed=0, transform=None):
        self.num_images, self.num_classes, self.size, self.seed = num_images, num_classes, size, seed
        self.transform = transform
        self.targets = [index % num_classes for index in range(num_images)]

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = self.targets[index]
        img = torch.randint(0, 128, (self.size, self.size, 3), generator=gen, dtype=torch.uint8)
        side = self.size // 4
        row = (label * 7 % 4) * side
        col = (label * 3 % 4) * side
        img[row:row + side, col:col + side] = 255
        img = Image.fromarray(img.numpy())
        return (self.transform(img) if self.transform else img), label


def _fashion_mnist_from_debian(root):
    """Debian's dataset-fashion-mnist ships the IDX files gzipped (recompressed, so torchvision's
    md5 check of the .gz fails): gunzip them where torchvision looks, so nothing is downloaded."""
    raw = Path(root) / 'FashionMNIST' / 'raw'
    for gz in sorted(DEBIAN_FASHION_MNIST.glob('*-ubyte.gz')):
        target = raw / gz.name[:-3]
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix('.partial')
            with gzip.open(gz) as src, open(partial, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(target)


def _named_dataset(name, root, train, transform):
    """torchvision's data set `name` with the paper's splits; downloads to `root` when online."""
    split = 'train' if train else 'test'
    if name == 'fashion_mnist':
        _fashion_mnist_from_debian(root)
        return datasets.FashionMNIST(root, train=train, transform=transform, download=True), 10
    if name == 'cifar10':
        return datasets.CIFAR10(root, train=train, transform=transform, download=True), 10
    if name == 'cifar100':
        return datasets.CIFAR100(root, train=train, transform=transform, download=True), 100
    if name == 'flowers':     # train on train + val, test on test
        parts = ['train', 'val'] if train else ['test']
        return ConcatDataset([datasets.Flowers102(root, split=s, transform=transform, download=True)
                              for s in parts]), 102
    if name == 'pets':        # train on trainval, test on test
        return datasets.OxfordIIITPet(root, split='trainval' if train else 'test', transform=transform,
                                      download=True), 37
    if name == 'aircraft':    # the 100 'variant' classes, trainval / test
        return datasets.FGVCAircraft(root, split='trainval' if train else 'test',
                                     annotation_level='variant', transform=transform, download=True), 100
    if name == 'cars':        # Stanford's download link is gone: place the files in ROOT/stanford_cars
        return datasets.StanfordCars(root, split=split, transform=transform, download=False), 196
    raise AssertionError(name)


def build_dataset(data, root, train, transform, synthetic_size=32, subset=0, classes=()):
    """-> (dataset, num_classes). `data`: a name in NAMED or a folder in ImageNet layout.
    `classes` keeps only those classes, renumbered 0..k-1 in the order given (e.g. (0, 2, 4, 6, 8));
    `subset` > 0 keeps a fixed sample of that many images, stratified: as equal a share of every class
    as the counts allow (drawn at random where the labels cannot be read without decoding)."""
    dataset, num_classes = _build_full_dataset(data, root, train, transform, synthetic_size)
    if not classes and not 0 < subset < len(dataset):
        return dataset, num_classes
    labels = dataset_labels(dataset)
    keep = torch.arange(len(dataset))
    if classes:
        if labels is None:
            raise DataError(f"--classes: the labels of '{data}' cannot be read without decoding every "
                            f"image; make a folder with only the classes you want instead")
        wrong = [c for c in classes if not 0 <= c < num_classes]
        if wrong or len(set(classes)) != len(classes):
            raise DataError(f"--classes {','.join(map(str, classes))}: expected distinct class "
                            f"indices in 0..{num_classes - 1}")
        keep = keep[torch.isin(labels, torch.tensor(classes))]
    if 0 < subset < len(keep):
        keep = keep[stratified_sample(labels[keep] if labels is not None else None, len(keep), subset)]
    return Selection(dataset, keep.tolist(), classes), (len(classes) if classes else num_classes)


def dataset_labels(dataset):
    """Every image's label as a tensor (N,), when the data set holds them as a list; else None."""
    labels = getattr(dataset, 'targets', getattr(dataset, '_labels', None))
    return None if labels is None else torch.as_tensor(labels)


def stratified_sample(labels, num_images, subset):
    """Indices of a fixed random sample of `subset` of `num_images` images: round-robin over the
    classes of `labels` (N,) in a fixed random order, so each class gets an equal share while it has
    images left; a plain random sample when labels is None."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(0))
    if labels is None:
        return order[:subset].sort().values
    shuffled = labels[order]
    rank_in_class = torch.zeros(num_images, dtype=torch.long)      # 0 for a class's first image, ...
    for c in shuffled.unique():
        is_c = shuffled == c
        rank_in_class[is_c] = torch.arange(int(is_c.sum()))
    return order[torch.argsort(rank_in_class, stable=True)[:subset]].sort().values


class Selection(Dataset):
    """Some images of a data set (`indices`), with labels renumbered 0..k-1 when only `classes` are
    kept."""

    def __init__(self, dataset, indices, classes=()):
        self.dataset, self.indices = dataset, indices
        self.relabel = {c: i for i, c in enumerate(classes)} if classes else None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.dataset[self.indices[i]]
        return img, (self.relabel[label] if self.relabel else label)


def _build_full_dataset(data, root, train, transform, synthetic_size):
    if data == 'synthetic':
        return SyntheticImages(512 if train else 128, size=synthetic_size, seed=0 if train else 1,
                               transform=transform), 10
    if data in NAMED:
        try:
            return _named_dataset(data, root, train, transform)
        except DataError:
            raise
        except Exception as e:  # offline download, missing files, bad archive
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            hint = ("`apt-get install dataset-fashion-mnist` (Debian), " if data == 'fashion_mnist' else "")
            raise DataError(f"cannot load data set '{data}' from {root} ({reason}); get it with "
                            f"{hint}a run with internet access (it downloads to --data-root), "
                            f"or pass --data DIR with train/<class>/ and val/<class>/ folders") from None
    if not Path(data).exists():
        raise DataError(f"--data {data}: neither a known name ({', '.join(NAMED)}) nor an existing "
                        f"folder")
    dataset = image_folder(data, 'train' if train else 'val', transform)
    return dataset, len(dataset.classes)


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------
def check_one_batch(num_images, batch_size, world_size):
    """A training set must fill one batch on every process (the last partial batch is dropped)."""
    if num_images < batch_size * world_size:
        raise DataError(f"the training set has {num_images} images, fewer than one batch of "
                        f"{batch_size} x {world_size} processes: lower --batch-size")


def build_loader(dataset, batch_size, train, num_workers, device, seed=0, rank=0, world_size=1):
    """A DataLoader over this process's shard. The sampler's order is a function of (seed, epoch):
    call `loader.sampler.set_epoch(epoch)` before each epoch. Training drops the last partial batch;
    evaluation keeps it (under DDP the sampler pads the shard with a few repeated images)."""
    if train:
        check_one_batch(len(dataset), batch_size, world_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=train)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == 'cuda', drop_last=train)


# --------------------------------------------------------------------------------------------------
# The in-memory path (--data-on-device): a small data set decoded once into a uint8 tensor on the
# training device and augmented there in batches, so no per-image Python runs during training
# --------------------------------------------------------------------------------------------------
def decode_to_tensor(data, root, train, size, crop_pct=1.0, subset=0, classes=(), device='cpu'):
    """-> (images uint8 (N, 3, size, size) on device, labels (N,), num_classes). crop_pct=1 gives the
    training view, each image resized to size x size, in which DeviceLoader draws its crops; 0.875 the
    evaluation view (`center_view`). A training view of non-square images would keep only their center
    square, and crops could not reach the sides: refused, such images train on the per-image path."""
    geometry = center_view(size, crop_pct)
    dataset, num_classes = build_dataset(data, root, train, transform=None, synthetic_size=size,
                                         subset=subset, classes=classes)
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


# --------------------------------------------------------------------------------------------------
# MoCo v3's two views (pretrain_moco.py): BYOL's asymmetric augmentation, drawn image by image
# --------------------------------------------------------------------------------------------------
def byol_view(img_size, stats, blur_p, solarize_p, min_scale=0.08):
    """One of BYOL's two augmentations (Grill et al. 2020) as MoCo v3 applies it, PIL image -> float
    tensor (3, img_size, img_size), in this order: RandomResizedCrop (area share ~ U(min_scale, 1),
    bilinear, as MoCo v3), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with
    p 0.8, grayscale with p 0.2, Gaussian blur with p `blur_p`, solarize (values >= 128 inverted) with
    p `solarize_p`, horizontal flip, normalisation with `stats`. The blur's sigma ~ U(0.1, 2.0) px
    with a 23 px kernel at 224 px, both scaled with the image size, so it blurs the same share of
    any image."""
    scale = img_size / 224
    return v2.Compose([
        v2.RGB(),
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(2 * round(11 * scale) + 1, sigma=(0.1 * scale, 2.0 * scale))],
                       p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.RandomHorizontalFlip(),
        *_to_normalized_tensor(stats),
    ])


class TwoViews:
    """Two augmentations of one image: PIL image -> (2, 3, H, W); the default collate makes a batch
    of them (B, 2, 3, H, W)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return torch.stack([self.first(img), self.second(img)])


def moco_views(img_size, stats=(IMAGENET_MEAN, IMAGENET_STD), min_scale=0.08):
    """MoCo v3's asymmetric pair: the first view always blurred and never solarised, the second
    blurred with p 0.1 and solarised with p 0.2 (BYOL's recipe)."""
    return TwoViews(byol_view(img_size, stats, blur_p=1.0, solarize_p=0.0, min_scale=min_scale),
                    byol_view(img_size, stats, blur_p=0.1, solarize_p=0.2, min_scale=min_scale))
