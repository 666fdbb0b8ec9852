"""Data sets, the paper's transform recipes, and the loader. Nothing model-related lives here.

`--data` is a name (fashion_mnist, cifar10, cifar100, flowers, pets, aircraft, cars, synthetic) or the
path of a folder in ImageNet layout: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg; pre-training
also takes a folder of unlabelled images (any depth, no train/). Every image, whatever its size and
mode (grayscale, RGBA, palette), becomes a 3-channel tensor of --img-size.

Elsewhere, each in a file named for what it is: timm's RandAugment, ported (rand_augment.py); the
in-memory speed path of --data-on-device (data_in_memory.py); MoCo v3's two views (pretrain_moco.py).
"""
import gzip
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from rand_augment import RandAugment, fill_colour

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A grayscale data set is normalised with its own statistics, equal in the three channels, so that a
# grey image stays grey (with ImageNet's per-channel ones a flat grey patch becomes three different
# offsets, and MAE's norm-pix target of a flat patch a colour pattern). Colour data: ImageNet's.
GRAYSCALE_STATS = {'fashion_mnist': (0.2860, 0.3530)}     # mean, std of the 60,000 training images
BICUBIC = InterpolationMode.BICUBIC
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


@dataclass(frozen=True)
class Augmentation:
    """A training recipe's augmentation: the one definition that both data paths apply, per image
    (`per_image_transform`, the DataLoader's) and in batches on the device (data_in_memory.py).

    RandomResizedCrop (area share ~ U(min_scale, 1), bicubic) and a horizontal flip, then timm's
    RandAugment (num_ops, magnitude, magnitude_std; rand_augment.py) if rand_aug, normalisation with the data set's
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
        randaugment = RandAugment(*self.rand_aug, fill=fill_colour(stats[0])) if self.rand_aug else None
        erasing = v2.RandomErasing(p=self.reprob, value='random') if self.reprob > 0 else None
        return randaugment, erasing


def to_normalized_tensor(stats):
    """The transforms PIL image -> float tensor (3, H, W), scaled to [0, 1], then normalised with
    stats = (mean, std)."""
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
        *to_normalized_tensor(stats),
        *([erasing] if erasing else []),
    ])


def center_view(img_size, crop_pct=0.875):
    """The evaluation view: resize the short side to img_size / crop_pct (256 for 224), bicubic, and
    center-crop img_size."""
    return [v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(img_size)]


def eval_transform(img_size, crop_pct=0.875, stats=(IMAGENET_MEAN, IMAGENET_STD)):
    """The evaluation view of one image, normalised: PIL image -> float tensor (3, img_size, img_size)."""
    return v2.Compose([v2.RGB(), *center_view(img_size, crop_pct), *to_normalized_tensor(stats)])


# --------------------------------------------------------------------------------------------------
# Data sets: by name or folder, then --classes and --subset
# --------------------------------------------------------------------------------------------------
def build_dataset(data, root, train, transform, subset=0, classes=(), unlabelled=False):
    """-> (dataset, num_classes). `data`: a name in NAMED or a folder in ImageNet layout; with
    `unlabelled` (the pre-training stages) also a folder without train/, read as UnlabelledImages.
    `classes` keeps only those classes, renumbered 0..k-1 in the order given (e.g. (0, 2, 4, 6, 8));
    `subset` > 0 keeps a fixed sample of that many images, stratified: as equal a share of every class
    as the counts allow (drawn at random where the labels cannot be read without decoding)."""
    dataset, num_classes = whole_dataset(data, root, train, transform, unlabelled)
    if classes and isinstance(dataset, UnlabelledImages):
        raise DataError(f"--classes: --data {data} is a folder of unlabelled images (no train/<class>/ "
                        f"folders), it has no classes to keep; leave --classes out")
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


def whole_dataset(data, root, train, transform, unlabelled=False):
    """-> (the whole split of a named data set or of a folder, num_classes)."""
    if data == 'synthetic':
        return SyntheticImages(512 if train else 128, seed=0 if train else 1, transform=transform), 10
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
    if not (Path(data) / 'train').is_dir():
        if unlabelled:
            return UnlabelledImages(data, transform), 1
        raise DataError(f"--data {data} has no class folders ({data}/train/<class>/*): this stage needs "
                        f"labels; a folder of unlabelled images serves pre-training (pretrain_mae.py, "
                        f"pretrain_distill.py, pretrain_moco.py): pre-train on it, then fine-tune on a "
                        f"labelled set with train/<class>/ and val/<class>/ folders")
    dataset = image_folder(data, 'train' if train else 'val', transform)
    return dataset, len(dataset.classes)


def _named_dataset(name, root, train, transform):
    """torchvision's data set `name` with the paper's splits; downloads to `root` when online."""
    split = 'train' if train else 'test'
    if name == 'fashion_mnist':
        fashion_mnist_from_debian(root)
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


class UnlabelledImages(Dataset):
    """Every image file under `root`, at any depth (torchvision's IMG_EXTENSIONS), in path order, each
    labelled 0: a pre-training set without classes. Its one split serves train and val alike."""

    def __init__(self, root, transform=None):
        self.paths = sorted(p for p in Path(root).rglob('*') if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not self.paths:
            raise DataError(f"no images under {root} (searched at any depth for {', '.join(IMG_EXTENSIONS)}): "
                            f"pass a folder of images, or one with train/<class>/ and val/<class>/ folders")
        self.transform, self.targets = transform, [0] * len(self.paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = load_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), 0


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


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------
def check_one_batch(num_images, batch_size, world_size):
    """A training set must fill one batch on every process (the last partial batch is dropped)."""
    if num_images < batch_size * world_size:
        raise DataError(f"the training set has {num_images} images, fewer than one batch of "
                        f"{batch_size} x {world_size} processes: lower --batch-size")


def build_loader(dataset, batch_size, train, num_workers, device, seed=0, rank=0, world_size=1,
                 strict_images=True):
    """A DataLoader over this process's shard. The sampler's order is a function of (seed, epoch):
    call `loader.sampler.set_epoch(epoch)` before each epoch. Training drops the last partial batch;
    evaluation keeps it (under DDP the sampler pads the shard with a few repeated images).
    An unreadable image stops the run with its name, unless strict_images=False (training without
    --strict-images): then it is skipped and counted (SkippingLoader, below)."""
    if train:
        check_one_batch(len(dataset), batch_size, world_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=train)
    loader_args = dict(sampler=sampler, num_workers=num_workers, pin_memory=device.type == 'cuda',
                       drop_last=train)
    if not strict_images:
        return SkippingLoader(dataset, batch_size, **loader_args)
    return DataLoader(dataset, batch_size=batch_size, **loader_args)


# --------------------------------------------------------------------------------------------------
# Off the reading path: a long training run outlives a few unreadable images
# --------------------------------------------------------------------------------------------------
UNREADABLE_SHARE = 0.01     # of a batch; more, and the data is broken rather than a few files: stop


class SkippingLoader:
    """A training DataLoader, used like one (len, sampler, (inputs, labels) batches), on which an
    unreadable image (load_rgb's DataError) gives way to the next image of the data set. Each such
    file is named once on stderr (per process) and counted in `bad_images`, this epoch's count on
    this process's shard (training.EpochProgress logs the sum over processes). More than 1% of a
    batch unreadable, and more than one image, stops the run with one line. The loader's workers
    send what they skipped along with each batch, so the count holds across worker processes."""

    def __init__(self, dataset, batch_size, **loader_args):
        self.batch_size, self.tolerance = batch_size, max(1, int(batch_size * UNREADABLE_SHARE))
        self.loader = DataLoader(NextReadableImage(dataset, self.tolerance), batch_size=batch_size,
                                 collate_fn=collate_with_skipped, **loader_args)
        self.sampler = self.loader.sampler
        self.named, self.bad_images = set(), 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.bad_images = 0
        for inputs, labels, skipped in self.loader:
            if len(skipped) > self.tolerance:
                raise DataError(too_many_unreadable(skipped, f"one batch of {self.batch_size}"))
            for message in skipped:
                if message not in self.named:
                    self.named.add(message)
                    tqdm.write(f"skipped, training goes on: {message}", file=sys.stderr)
            self.bad_images += len(skipped)
            yield inputs, labels


class NextReadableImage(Dataset):
    """`dataset` in which an unreadable image gives way to the next one (index + 1, + 2, ...):
    item i -> (image, label, the messages of the files passed over). More than `tolerance` in a row
    stops the run (the batch they are for would have too many)."""

    def __init__(self, dataset, tolerance):
        self.dataset, self.tolerance = dataset, tolerance

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        skipped = []
        for offset in range(self.tolerance + 1):
            try:
                return (*self.dataset[(index + offset) % len(self.dataset)], skipped)
            except DataError as e:
                skipped.append(str(e))
        raise DataError(too_many_unreadable(skipped, 'a row'))


def collate_with_skipped(samples):
    """[(image, label, skipped messages)] -> (images, labels, every message skipped for the batch)."""
    inputs, labels = default_collate([sample[:2] for sample in samples])
    return inputs, labels, [message for sample in samples for message in sample[2]]


def too_many_unreadable(skipped, where):
    return (f"{len(skipped)} unreadable images in {where}, more than {UNREADABLE_SHARE:.0%} of a batch: the "
            f"data looks broken, not one file; the first: {skipped[0]}")


# --------------------------------------------------------------------------------------------------
# Off the reading path: Debian's Fashion-MNIST files, and synthetic images for tests
# --------------------------------------------------------------------------------------------------
def fashion_mnist_from_debian(root):
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


class SyntheticImages(Dataset):
    """Random `size` x `size` images with a learnable label (a bright square in one of 16 cells:
    class c's at row c % 4, column c // 4 % 4), deterministic per index; the transforms resize them
    to --img-size. For tests and smoke runs only: it proves nothing about vision."""

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
        row, col = label % 4 * side, label // 4 % 4 * side
        img[row:row + side, col:col + side] = 255
        img = Image.fromarray(img.numpy())
        return (self.transform(img) if self.transform else img), label
