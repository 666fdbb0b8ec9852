"""rand_augment.py: timm's RandAugment 'rand-m10-mstd0.5-inc1', checked by its distribution on one
image against timm's own transform (1,200 seeded draws each), and its spec, tensors and Posterize."""
import collections
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, rand_augment_transform
from torchvision.transforms.v2.functional import pil_to_tensor

import rand_augment as rand_augment_module
from rand_augment import RandAugment, rand_augment

DRAWS = 1200


def gradient_image(size=48):
    """A colour gradient with some noise and a red square: every op of the set changes it."""
    gen = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    rgb = torch.stack([x * 200 + 20, y * 180 + 40, (1 - x) * 120 + 60])                  # (3, H, W)
    rgb = rgb + torch.randint(0, 30, (3, size, size), generator=gen)
    rgb[:, size // 4:size // 2, size // 4:size // 2] = torch.tensor([230.0, 30, 30])[:, None, None]
    return Image.fromarray(rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def recording(name, op, ran):
    """op, which also appends its name to `ran` each time it runs."""
    def op_that_records(*args, **kwargs):
        ran.append(name)
        return op(*args, **kwargs)
    return op_that_records


def measure(augment, img, ran):
    """DRAWS augmentations of img: the share left unchanged, the mean absolute pixel change (0..255),
    the ops run per image and each op's share of the ops run."""
    before = np.asarray(img, dtype=np.float32)
    change = np.array([np.abs(np.asarray(augment(img), dtype=np.float32) - before).mean()
                       for _ in range(DRAWS)])
    counts = collections.Counter(ran)
    return {'unchanged': (change == 0).mean(), 'mean_change': change.mean(), 'ops_per_image': len(ran) / DRAWS,
            'op_share': {name: count / len(ran) for name, count in counts.items()}}


def timm_rand_augment():
    """timm's transform as its create_transform builds it for MAE's fine-tuning (bicubic, mean fill);
    its 0-bit Posterize made black, as our `_posterize` (current Pillow refuses 0 bits)."""
    augment = rand_augment_transform('rand-m10-mstd0.5-inc1', {
        'translate_const': 21, 'img_mean': (124, 116, 104), 'interpolation': Image.Resampling.BICUBIC})
    for op in augment.ops:
        if op.name == 'PosterizeIncreasing':
            posterize = op.aug_fn
            op.aug_fn = lambda img, bits, **kwargs: (posterize(img, bits, **kwargs) if bits
                                                     else Image.new(img.mode, img.size))
    return augment


@pytest.fixture(scope='module')
def measured():
    """{'ours': measure(...), 'timm': measure(...)} on the same image, every op instrumented."""
    img = gradient_image()
    with pytest.MonkeyPatch.context() as patch:
        ours_ran = []
        for name, op in list(rand_augment_module.RAND_AUGMENT_OPS.items()):
            patch.setitem(rand_augment_module.RAND_AUGMENT_OPS, name, recording(name, op, ours_ran))
        torch.manual_seed(0)
        ours = measure(rand_augment('rand-m10-mstd0.5-inc1'), img, ours_ran)
    augment, timm_ran = timm_rand_augment(), []
    for op in augment.ops:
        op.aug_fn = recording(op.name, op.aug_fn, timm_ran)
    random.seed(0)
    np.random.seed(0)
    return {'ours': ours, 'timm': measure(augment, img, timm_ran)}


def test_about_a_quarter_of_the_images_pass_unchanged_as_in_timm(measured):
    """Each of the 2 ops runs at odds 1:1, so 1/4 of the images get none (torchvision's RandAugment,
    which always runs both and draws 'Identity' 1 time in 14: 1.4%)."""
    ours, timm = measured['ours']['unchanged'], measured['timm']['unchanged']
    assert 0.18 < ours < 0.32 and abs(ours - timm) < 0.07, (ours, timm)


def test_the_mean_pixel_change_is_timms(measured):
    """~41 of 255 on this image (torchvision's RandAugment at magnitude 10: ~65)."""
    ours, timm = measured['ours']['mean_change'], measured['timm']['mean_change']
    assert abs(ours - timm) < 0.12 * timm, (ours, timm)


def test_one_op_runs_per_image_on_average_as_in_timm(measured):
    ours, timm = measured['ours']['ops_per_image'], measured['timm']['ops_per_image']
    assert abs(ours - 1) < 0.1 and abs(ours - timm) < 0.1, (ours, timm)


def test_each_of_timms_15_increasing_ops_runs_as_often_as_in_timm(measured):
    ours, timm = measured['ours']['op_share'], measured['timm']['op_share']
    assert set(ours) == set(timm) == set(_RAND_INCREASING_TRANSFORMS) and len(ours) == 15
    for name in ours:           # each 1/15 = 0.067 of the ops run
        assert abs(ours[name] - timm[name]) < 0.04, (name, ours[name], timm[name])


def test_the_magnitude_is_drawn_around_its_mean():
    augment = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    drawn = {round(magnitude) for _ in range(200) for _, magnitude in augment.draw()}
    assert drawn <= {7, 8, 9, 10, 11} and {8, 9, 10} <= drawn


def test_posterize_at_0_bits_gives_black():
    black = rand_augment_module.RAND_AUGMENT_OPS['PosterizeIncreasing'](gradient_image(), 1.0, (124, 116, 104))
    assert not np.asarray(black).any()


def test_a_tensor_goes_through_the_same_ops_and_stays_a_tensor():
    img, augment = gradient_image(32), rand_augment('m10-mstd0.5')
    tensor = pil_to_tensor(img)                                                   # (3, H, W) uint8
    for seed in range(20):
        torch.manual_seed(seed)
        as_pil = augment(img)
        torch.manual_seed(seed)
        as_tensor = augment(tensor)
        assert isinstance(as_pil, Image.Image) and as_pil.mode == 'RGB' and as_pil.size == (32, 32)
        assert as_tensor.dtype == torch.uint8 and as_tensor.shape == (3, 32, 32)
        assert torch.equal(as_tensor, pil_to_tensor(as_pil))


def test_specs_as_timm_writes_them():
    def numbers(spec):
        augment = rand_augment(spec)
        return augment.num_ops, augment.magnitude, augment.magnitude_std
    assert numbers('m10-mstd0.5') == numbers('rand-m10-mstd0.5-inc1') == (2, 10, 0.5)
    assert numbers('m9-mstd0.5') == (2, 9, 0.5) and numbers('n3-m9') == (3, 9, 0.0)
    assert rand_augment('none') is None


@pytest.mark.parametrize('spec', ['m12', 'rand-m9-mstd0.5-inc0', 'm9-p0.5', ''])
def test_a_bad_spec_is_one_clear_error(spec):
    with pytest.raises(ValueError, match="expected timm's e.g. 'm10-mstd0.5'") as error:
        rand_augment(spec)
    assert '\n' not in str(error.value)
