"""data.py: any image becomes a 3-channel tensor of --img-size; bad data stops with one clear line."""
import urllib.error

import pytest
import torch
from PIL import Image
from torchvision import datasets

import data
from data import DataError, build_dataset, eval_transform, finetune_transform, pretrain_transform


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


@pytest.mark.parametrize('transform', [pretrain_transform(32), finetune_transform(32), eval_transform(32)])
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
    with pytest.raises(DataError, match=r'no folder .*/train: expected .*train/<class>/<image>'):
        build_dataset(str(tmp_path), 'unused', train=True, transform=None)
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    with pytest.raises(DataError, match='no images found'):
        build_dataset(str(tmp_path), 'unused', train=True, transform=None)
    with pytest.raises(DataError, match='neither a known name'):
        build_dataset(str(tmp_path / 'typo'), 'unused', train=True, transform=None)


def test_rand_augment_magnitude_is_drawn_around_its_mean():
    augment = data.RandAugmentWithStd(num_ops=2, magnitude=9, magnitude_std=0.5)
    img = Image.new('RGB', (32, 32))
    drawn = set()
    for _ in range(200):
        augment(img)
        drawn.add(augment.magnitude)
    assert drawn <= {7, 8, 9, 10, 11} and {8, 9, 10} <= drawn


def test_a_training_set_smaller_than_one_batch_is_refused():
    dataset = data.SyntheticImages(10)
    with pytest.raises(DataError, match='fewer than one batch'):
        data.build_loader(dataset, 16, train=True, num_workers=0, device=torch.device('cpu'))


def test_device_loader_draws_rand_augment_and_erasing_per_image(monkeypatch):
    """On the in-memory path RandAugment and random erasing run image by image, so 16 copies of one
    image come out 16 different ways, as from the per-image pipeline (the batched crop is switched off
    here to see them alone)."""
    monkeypatch.setattr(data, 'batched_resized_crop_flip', lambda imgs, size, min_scale: imgs)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(16, -1, -1, -1)
    labels = torch.zeros(16, dtype=torch.long)

    def distinct_images(**augment):
        imgs, _ = next(iter(data.DeviceLoader(image, labels, 16, train=True, **augment)))
        assert imgs.shape == (16, 3, 32, 32) and imgs.isfinite().all()
        return len(torch.unique(imgs.flatten(1), dim=0))

    assert distinct_images() == 1
    assert distinct_images(rand_aug=(2, 9, 0.5)) >= 8            # 2 of 14 ops, magnitudes around 9
    assert distinct_images(reprob=1.0) == 16                      # a random box of noise in each
