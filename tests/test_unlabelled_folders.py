"""A folder of unlabelled images (no class folders, no val split, images at any depth): the
pre-training stages and the analyses take it, the stages that need labels refuse it in one line."""
import pytest
import torch

import analyze
import pretrain_mae
import pretrain_moco
from conftest import assert_one_line_error, read_log, run_script
from data import DataError, UnlabelledImages, build_dataset, eval_transform, normalization
from pretrain_mae import build_mae, pretrain_data
from training import Processes


def test_every_image_at_any_depth_is_read_labelled_0(unlabelled_folder):
    dataset, num_classes = build_dataset(str(unlabelled_folder), 'unused', train=True,
                                         transform=eval_transform(16), unlabelled=True)
    assert isinstance(dataset, UnlabelledImages) and num_classes == 1 and len(dataset) == 160
    assert {len(p.relative_to(unlabelled_folder).parts) for p in dataset.paths} == {1, 2, 3, 4}
    assert all(p.suffix == '.png' for p in dataset.paths)                  # notes.txt is no image
    img, label = dataset[0]
    assert img.shape == (3, 16, 16) and label == 0 and set(dataset.targets) == {0}


def test_its_one_split_serves_as_val_and_subset_samples_it(unlabelled_folder):
    train, _ = build_dataset(str(unlabelled_folder), 'unused', train=True, transform=None, unlabelled=True)
    val, _ = build_dataset(str(unlabelled_folder), 'unused', train=False, transform=None, unlabelled=True)
    assert train.paths == val.paths
    sample, _ = build_dataset(str(unlabelled_folder), 'unused', train=True, transform=None, subset=32,
                              unlabelled=True)
    assert len(sample) == 32 and len(set(sample.indices)) == 32


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'readme.txt').write_text('no images here')
    with pytest.raises(DataError, match=r'no images under .* \(searched at any depth for \.jpg') as error:
        build_dataset(str(tmp_path), 'unused', train=True, transform=None, unlabelled=True)
    assert '\n' not in str(error.value)


def test_classes_cannot_be_picked_from_it(unlabelled_folder):
    with pytest.raises(DataError, match='--classes: .* is a folder of unlabelled images'):
        build_dataset(str(unlabelled_folder), 'unused', train=True, transform=None, classes=[0, 1],
                      unlabelled=True)


def test_a_labelled_folder_is_read_as_before_when_unlabelled_folders_are_allowed(fashion_folder):
    dataset, num_classes = build_dataset(str(fashion_folder), 'unused', train=False, transform=None,
                                         unlabelled=True)
    assert num_classes == 4 and len(dataset) == 80 and sorted(set(dataset.targets)) == [0, 1, 2, 3]


def quick(folder, out, *extra):
    return [str(a) for a in ('--data', folder, '--img-size', 16, '--patch-size', 4, '--subset', 32,
                             '--batch-size', 16, '--epochs', 1, '--warmup-epochs', 0, '--num-workers', 0,
                             '--output-dir', out, *extra)]


@pytest.mark.parametrize('on_device', [False, True], ids=['per-image', 'data-on-device'])
def test_mae_pretrains_on_it_and_draws_its_training_images(unlabelled_folder, tmp_path, on_device):
    pretrain_mae.main(quick(unlabelled_folder, tmp_path, *(['--data-on-device'] if on_device else [])))
    assert [line['epoch'] for line in read_log(tmp_path)] == [0]
    assert (tmp_path / 'reconstruction.png').stat().st_size > 0


def test_the_figure_shows_the_first_training_images_in_the_eval_view(unlabelled_folder, tmp_path):
    args = pretrain_mae.build_parser().parse_args(quick(unlabelled_folder, tmp_path))
    _, shown = pretrain_data(args, Processes('cpu'))
    images = UnlabelledImages(unlabelled_folder, eval_transform(16, stats=normalization(str(unlabelled_folder))))
    assert torch.equal(shown, torch.stack([images[i][0] for i in range(6)]))


def test_moco_pretrains_on_it(unlabelled_folder, tmp_path):
    pretrain_moco.main(quick(unlabelled_folder, tmp_path, '--patch-size', 8, '--mlp-dim', 64, '--out-dim', 32))
    assert [line['epoch'] for line in read_log(tmp_path)] == [0]


def test_the_analyses_read_its_images(unlabelled_folder, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / 'mae.pth'
    torch.save({'model': build_mae('vit_tiny', img_size=16, patch_size=4).state_dict()}, ckpt)
    analyze.main([str(a) for a in ('reconstruct', '--ckpt', ckpt, '--data', unlabelled_folder,
                                   '--num-images', 8, '--device', 'cpu', '--output-dir', tmp_path)])
    analyze.main([str(a) for a in ('attention', '--ckpt', ckpt, '--data', unlabelled_folder, '--num-images', 8,
                                   '--batch-size', 8, '--num-workers', 0, '--device', 'cpu',
                                   '--output-dir', tmp_path)])
    assert (tmp_path / 'reconstruction.png').exists() and (tmp_path / 'attention.json').exists()


@pytest.mark.parametrize('script', ['finetune.py', 'linear_probe.py'])
def test_stages_that_need_labels_refuse_it_in_one_line(script, unlabelled_folder, tmp_path):
    result = run_script(script, '--data', unlabelled_folder, '--img-size', 16, '--patch-size', 4,
                        '--num-workers', 0, '--output-dir', tmp_path)
    assert_one_line_error(result, f'--data {unlabelled_folder} has no class folders', 'this stage needs labels',
                          'pre-train on it, then fine-tune on a labelled set')


def test_classes_on_it_is_one_error_line(unlabelled_folder, tmp_path):
    result = run_script('pretrain_mae.py', *quick(unlabelled_folder, tmp_path, '--classes', '0,1'))
    assert_one_line_error(result, 'is a folder of unlabelled images', 'no classes to keep')
