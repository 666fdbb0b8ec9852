"""A long training run outlives a few unreadable images: each is skipped, named once and counted in
log.jsonl; --strict-images, a broken data set (more than 1% of a batch) and evaluation stop with one
line naming the file."""
import io

import pytest
import torch
from PIL import Image
from torchvision import datasets

import pretrain_mae
from conftest import assert_one_line_error, read_log, run_script
from data import DataError, build_dataset, build_loader, eval_transform
from vit import vit

TRAIN_IMAGES = 200      # 198 readable + 2 unreadable: one batch of 200, whose 1% are 2 images


def write_unreadable(folder):
    """A truncated JPEG and a zero-byte PNG in `folder`'s two class folders; -> their paths."""
    buffer = io.BytesIO()
    Image.new('RGB', (28, 28), (90, 40, 200)).save(buffer, 'JPEG')
    truncated, empty = folder / 'c0' / 'truncated.jpg', folder / 'c1' / 'empty.png'
    truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    empty.write_bytes(b'')
    return truncated, empty


@pytest.fixture(scope='module')
def broken_folder(fashion_root, tmp_path_factory):
    """DIR/train with 198 real Fashion-MNIST images and 2 unreadable files in two classes; DIR/val
    with 20 readable images. -> (DIR, the unreadable files)."""
    root = tmp_path_factory.mktemp('broken')
    fashion = datasets.FashionMNIST(fashion_root, train=True)
    for split, count in (('train', TRAIN_IMAGES - 2), ('val', 20)):
        for i in range(count):
            img, label = fashion[i if split == 'train' else 1000 + i]
            folder = root / split / f'c{label % 2}'
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{i:03d}.png')
    return root, write_unreadable(root / 'train')


def pretrain_args(folder, out, *extra):
    return [str(a) for a in ('--data', folder, '--img-size', 8, '--patch-size', 4, '--batch-size', TRAIN_IMAGES,
                             '--warmup-epochs', 1, '--output-dir', out, *extra)]


def test_training_skips_unreadable_images_names_each_once_and_logs_the_count(broken_folder, tmp_path, capsys):
    folder, unreadable = broken_folder
    pretrain_mae.main(pretrain_args(folder, tmp_path, '--epochs', 2, '--num-workers', 2))   # counted across workers
    assert [record['bad_images'] for record in read_log(tmp_path)] == [2, 2]
    stderr = capsys.readouterr().err
    for path in unreadable:
        named = [line for line in stderr.splitlines() if str(path) in line]
        assert len(named) == 1 and 'cannot read image' in named[0], stderr    # once, in two epochs


def test_strict_images_stops_at_the_first_unreadable_image_with_its_name(broken_folder, tmp_path):
    folder, unreadable = broken_folder
    result = run_script('pretrain_mae.py', *pretrain_args(folder, tmp_path, '--epochs', 1, '--num-workers', 0,
                                                          '--strict-images'))
    assert_one_line_error(result, 'cannot read image')
    assert any(str(path) in result.stderr for path in unreadable)


@pytest.mark.parametrize('apart', [True, False], ids=['in-one-batch', 'in-a-row'])
def test_more_than_one_percent_of_a_batch_unreadable_stops_the_run(broken_folder, apart):
    """A batch of 4 tolerates one unreadable image (1% of it is less than one); two in one batch,
    apart or one after the other (the next image is unreadable too), mean broken data."""
    folder, _ = broken_folder
    dataset, _ = build_dataset(str(folder), 'unused', train=True, transform=eval_transform(8))
    empty, truncated = len(dataset) - 1, dataset.targets.index(1) - 1        # the last of each class
    order = [empty, 0, truncated, 1] if apart else [0, 1, empty, truncated]
    loader = build_loader(torch.utils.data.Subset(dataset, order), 4, train=True, num_workers=0,
                          device=torch.device('cpu'), strict_images=False)
    where = 'one batch of 4' if apart else 'a row'
    with pytest.raises(DataError, match=f'2 unreadable images in {where}, more than 1%') as error:
        list(loader)
    assert '\n' not in str(error.value) and 'cannot read image' in str(error.value)


def test_evaluation_stops_at_an_unreadable_image(broken_folder, tmp_path):
    """Fine-tuning's --eval-only on a val split holding a zero-byte file: one line, its name."""
    folder, _ = broken_folder
    eval_folder = tmp_path / 'data'
    (eval_folder / 'val').mkdir(parents=True)
    (eval_folder / 'val' / 'c0').symlink_to(folder / 'val' / 'c0')
    (eval_folder / 'val' / 'c1').mkdir()
    (eval_folder / 'val' / 'c1' / 'empty.png').write_bytes(b'')
    (eval_folder / 'train').symlink_to(folder / 'train')
    classifier = vit('vit_tiny', img_size=8, patch_size=4, num_classes=2, global_pool=True)
    torch.save({'model': classifier.state_dict()}, tmp_path / 'finetuned.pth')
    result = run_script('finetune.py', '--eval-only', '--init', tmp_path / 'finetuned.pth', '--data', eval_folder,
                        '--img-size', 8, '--patch-size', 4, '--batch-size', 8, '--num-workers', 0,
                        '--device', 'cpu', '--output-dir', tmp_path / 'out')
    assert_one_line_error(result, 'cannot read image', str(eval_folder / 'val' / 'c1' / 'empty.png'))
