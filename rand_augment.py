"""timm's RandAugment 'rand-n{N}-m{M}-mstd{S}-inc1' (the paper's fine-tuning 'rand-m10-mstd0.5-inc1'),
ported op for op so that a fine-tune here draws what timm's would (tests/test_rand_augment.py checks
the distribution against timm's). A port of another library's code, so it lives apart from data.py,
which applies it through `data.Augmentation`.
"""
import re

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2

PIL_BICUBIC = Image.Resampling.BICUBIC
IMAGENET_FILL = (124, 116, 104)     # round(255 x ImageNet's mean colour), timm's img_mean


def fill_colour(mean):
    """The colour RandAugment fills in where an image was moved away: the data set's mean colour,
    round(255 x mean) per channel (timm's img_mean): IMAGENET_FILL with ImageNet's mean."""
    return tuple(min(255, round(255 * m)) for m in mean)


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


