"""data.py: choosing images (--classes, the stratified --subset), grayscale normalisation, and the
loader's default number of worker processes."""
import warnings

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import data
import finetune
from data import DataError, build_dataset, eval_transform, normalization, stratified_sample
from data_in_memory import decode_to_tensor


def labels_of(dataset):
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])


def test_classes_keeps_those_classes_renumbered_in_the_order_given(fashion_root):
    full, _ = build_dataset('fashion_mnist', fashion_root, train=False, transform=None)
    kept, num_classes = build_dataset('fashion_mnist', fashion_root, train=False, transform=None, classes=[7, 5])
    assert num_classes == 2 and len(kept) == 2000                  # 1,000 test images per class
    for i in (0, 1, 500, 1999):
        img, label = kept[i]
        original_img, original_label = full[kept.indices[i]]
        assert original_label == [7, 5][label] and img.tobytes() == original_img.tobytes()


def test_subset_is_stratified_fixed_and_a_prefix_of_any_larger_one(fashion_root):
    a, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=100)
    b, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=100)
    assert a.indices == b.indices and torch.bincount(labels_of(a)).tolist() == [10] * 10
    few, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=50, classes=[0, 1])
    assert torch.bincount(labels_of(few)).tolist() == [25, 25]
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 65)
    small, large = stratified_sample(labels, 100, 20), stratified_sample(labels, 100, 40)
    assert set(small.tolist()) <= set(large.tolist())             # the clean-train sample of a fine-tune
    counts = torch.bincount(labels[large]).tolist()
    assert counts[1] == 5 and abs(counts[0] - counts[2]) <= 1      # class 1 runs out, the others share


def test_the_in_memory_path_selects_the_same_images_and_labels(fashion_root):
    dataset, _ = build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=40,
                               classes=[3, 8])
    images, labels, num_classes = decode_to_tensor('fashion_mnist', fashion_root, True, 28, subset=40,
                                                   classes=[3, 8])
    assert num_classes == 2 and labels.tolist() == labels_of(dataset).tolist()
    assert torch.equal(images[5, 0], v2.functional.pil_to_tensor(dataset[5][0])[0])


def test_classes_out_of_range_is_a_clear_error(fashion_root):
    with pytest.raises(DataError, match='expected distinct class indices in 0..9'):
        build_dataset('fashion_mnist', fashion_root, train=True, transform=None, classes=[3, 12])


def test_a_grey_image_stays_grey_with_the_data_sets_own_statistics():
    mean, std = normalization('fashion_mnist')
    assert len(set(mean)) == 1 and len(set(std)) == 1
    assert normalization('cifar10') == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    grey = Image.new('RGB', (28, 28), (90, 90, 90))
    tensor = eval_transform(28, 1.0, normalization('fashion_mnist'))(grey)      # (3, 28, 28)
    assert torch.allclose(tensor[0], tensor[1]) and torch.allclose(tensor[1], tensor[2])
    assert tensor[0, 0, 0].item() == pytest.approx((90 / 255 - mean[0]) / std[0], abs=1e-5)


def test_the_default_worker_count_starts_no_more_loader_processes_than_this_machine_suggests():
    """DataLoader warns when asked for more workers than the CPUs it may use; the stages' default
    must never make it warn, on a 2-core laptop or a 64-core node."""
    args = finetune.build_parser().parse_args([])
    assert args.num_workers >= 1
    loader = data.build_loader(data.SyntheticImages(8, transform=v2.PILToTensor()), 4, train=False,
                               num_workers=args.num_workers,
                               device=torch.device('cpu'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        next(iter(loader))
    assert not [w for w in caught if 'worker' in str(w.message)], [str(w.message) for w in caught]
