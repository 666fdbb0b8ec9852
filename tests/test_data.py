"""data.py: any image becomes a 3-channel tensor of --img-size; bad data stops with one clear line."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

import data
import data_in_memory
from rand_augment import RandAugment
from data import Augmentation, DataError, build_dataset, eval_transform, per_image_transform

PRETRAINING = Augmentation(min_scale=0.2)                              # MAE's crop + flip
FINETUNING = Augmentation(0.08, rand_aug=(2, 10, 0.5), reprob=0.25)    # MAE's fine-tuning recipe
PROBING = Augmentation()


@pytest.fixture
def mixed_folder(tmp_path):
    """Images of every mode and several sizes, two classes, train and val."""
    modes = {'gray.png': ('L', (40, 30)), 'rgba.png': ('RGBA', (50, 50)),
             'palette.png': ('P', (33, 61)), 'rgb.jpg': ('RGB', (64, 48))}
    for split in ('train', 'val'):
        for cls in ('a', 'b'):
            (tmp_path / split / cls).mkdir(parents=True)
            for name, (mode, size) in modes.items():
                Image.new(mode, size, color=128 if mode in ('L', 'P') else None).save(tmp_path / split / cls / name)
    return tmp_path


@pytest.mark.parametrize('transform', [per_image_transform(PRETRAINING, 32),
                                       per_image_transform(FINETUNING, 32), eval_transform(32)])
def test_images_of_any_mode_and_size_become_3_channel_tensors(mixed_folder, transform):
    dataset, num_classes = build_dataset(str(mixed_folder), 'unused', train=True, transform=transform)
    assert num_classes == 2 and len(dataset) == 8
    for img, _ in dataset:
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32


def test_fashion_mnist_loads_from_the_debian_package_without_download(fashion_root):
    train, classes = build_dataset('fashion_mnist', fashion_root, train=True, transform=eval_transform(32))
    test, _ = build_dataset('fashion_mnist', fashion_root, train=False, transform=eval_transform(32))
    assert (len(train), len(test), classes) == (60000, 10000, 10)
    assert train[0][0].shape == (3, 32, 32)


def test_subset_is_a_fixed_sample(fashion_root):
    a, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=100)
    b, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=100)
    assert len(a) == 100 and a.indices == b.indices


def test_offline_without_the_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'DEBIAN_FASHION_MNIST', tmp_path / 'nowhere')

    def offline(self):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(datasets.FashionMNIST, 'download', offline)
    with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist.*--data DIR') as error:
        build_dataset('fashion_mnist', tmp_path / 'empty', train=True, transform=None)
    assert '\n' not in str(error.value)


def test_a_corrupt_image_names_the_file(mixed_folder):
    bad = mixed_folder / 'train' / 'a' / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    dataset, _ = build_dataset(str(mixed_folder), 'unused', train=True, transform=eval_transform(32))
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(DataError, match=f'cannot read image {bad}'):
        dataset[index]


def test_missing_or_empty_folders_say_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError, match=r'has no class folders \(.*/train/<class>/\*\): this stage needs labels'):
        build_dataset(str(tmp_path), 'unused', train=True, transform=None)
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    with pytest.raises(DataError, match=r'no folder .*/val: expected .*val/<class>/<image>'):
        build_dataset(str(tmp_path), 'unused', train=False, transform=None)
    with pytest.raises(DataError, match='no images found'):
        build_dataset(str(tmp_path), 'unused', train=True, transform=None)
    with pytest.raises(DataError, match='neither a known name'):
        build_dataset(str(tmp_path / 'typo'), 'unused', train=True, transform=None)


def test_each_synthetic_class_puts_its_bright_square_in_a_cell_of_its_own():
    """The background stays below 128, so the pixels at 255 are the square: 10 classes, 10 places."""
    dataset = data.SyntheticImages(20)
    places = {}
    for index in range(20):
        img, label = dataset[index]
        rows, cols = np.nonzero(np.array(img)[..., 0] == 255)
        places.setdefault(label, set()).add((rows.min().item(), cols.min().item()))
    assert all(len(cells) == 1 for cells in places.values())          # a class's square never moves
    assert len(set().union(*places.values())) == 10


def test_a_training_set_smaller_than_one_batch_is_refused():
    dataset = data.SyntheticImages(10)
    with pytest.raises(DataError, match='fewer than one batch'):
        data.build_loader(dataset, 16, train=True, num_workers=0, device=torch.device('cpu'))


def test_device_loader_draws_rand_augment_and_erasing_per_image(monkeypatch):
    """On the in-memory path RandAugment and random erasing run image by image, so 16 copies of one
    image come out 16 different ways, as from the per-image pipeline (the batched crop is switched off
    here to see them alone)."""
    monkeypatch.setattr(data_in_memory, 'batched_resized_crop_flip', lambda imgs, size, min_scale: imgs)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(16, -1, -1, -1)
    labels = torch.zeros(16, dtype=torch.long)

    def distinct_images(**augment):
        loader = data_in_memory.DeviceLoader(image, labels, 16, train=True, augmentation=Augmentation(**augment))
        imgs, _ = next(iter(loader))
        assert imgs.shape == (16, 3, 32, 32) and imgs.isfinite().all()
        return len(torch.unique(imgs.flatten(1), dim=0))

    assert distinct_images() == 1
    assert distinct_images(rand_aug=(2, 9, 0.5)) >= 8            # up to 2 of 15 ops, magnitudes around 9
    assert distinct_images(reprob=1.0) == 16                      # a random box of noise in each


def per_image_ops(transform):
    """[(op, its parameters)] that a per-image transform applies after the crop and flip, which lead."""
    names = [type(op).__name__ for op in transform.transforms]
    assert names[:3] == ['RGB', 'RandomResizedCrop', 'RandomHorizontalFlip'], names
    ops = [('crop+flip', transform.transforms[1].scale)]
    for op in transform.transforms[3:]:
        if isinstance(op, RandAugment):
            ops.append(('RandAugment', vars(op)))
        elif isinstance(op, v2.RandomErasing):
            ops.append(('erasing', op.p, op.value))
    return ops


def device_loader_ops(loader, crop_scales):
    """The same list for a DeviceLoader, whose batched crop was called with `crop_scales`."""
    ops = [('crop+flip', (scale, 1.0)) for scale in crop_scales]
    if loader.randaugment:
        ops.append(('RandAugment', vars(loader.randaugment)))
    if loader.erasing:
        ops.append(('erasing', loader.erasing.p, loader.erasing.value))
    return ops


@pytest.mark.parametrize('recipe', [PRETRAINING, FINETUNING, PROBING], ids=['pretrain', 'finetune', 'probe'])
def test_both_data_paths_apply_the_ops_of_one_recipe(recipe, monkeypatch):
    """The per-image transform and the in-memory loader make the same ops with the same parameters
    from one Augmentation, and normalise alike (the grey, flat image is the same after both)."""
    stats = data.normalization('fashion_mnist')
    crop_scales = []
    monkeypatch.setattr(data_in_memory, 'batched_resized_crop_flip',
                        lambda imgs, size, min_scale: crop_scales.append(min_scale) or imgs)
    grey = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    loader = data_in_memory.DeviceLoader(grey, torch.zeros(1, dtype=torch.long), 1, train=True, augmentation=recipe,
                               stats=stats)
    on_device, _ = next(iter(loader))                                                  # (1, 3, 32, 32)
    transform = per_image_transform(recipe, 32, stats)
    per_image = transform(Image.new('RGB', (32, 32), (100, 100, 100)))                  # (3, 32, 32)

    assert per_image_ops(transform) == device_loader_ops(loader, crop_scales)
    if recipe.rand_aug:       # grey images stay grey: RandAugment fills with the data set's mean grey
        assert loader.randaugment.fill == (73, 73, 73)
    assert on_device.shape[1:] == per_image.shape and on_device.dtype == per_image.dtype
    if not recipe.rand_aug and not recipe.reprob:     # only the crop, which keeps a flat image flat
        torch.testing.assert_close(on_device[0], per_image)


def test_the_training_view_in_memory_refuses_images_that_are_not_square(mixed_folder):
    """Its crops are drawn from a square per image: from a center square of a wide image they would
    miss its sides, which the per-image path crops from. The evaluation view is a center crop anyway."""
    with pytest.raises(DataError, match='6 of 8 training images .* not square .* without --data-on-') as e:
        data_in_memory.decode_to_tensor(str(mixed_folder), 'unused', train=True, size=32)
    assert '\n' not in str(e.value)
    images, labels, num_classes = data_in_memory.decode_to_tensor(str(mixed_folder), 'unused', train=True, size=32,
                                                        crop_pct=0.875)
    assert images.shape == (8, 3, 32, 32) and num_classes == 2


def test_square_images_train_in_memory(tmp_path):
    for cls in ('a', 'b'):
        (tmp_path / 'train' / cls).mkdir(parents=True)
        Image.new('RGB', (40, 40), (10, 200, 30)).save(tmp_path / 'train' / cls / 'square.png')
    images, labels, _ = data_in_memory.decode_to_tensor(str(tmp_path), 'unused', train=True, size=32)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
