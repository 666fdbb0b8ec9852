"""--knn-every: the pre-training stages' weighted kNN readout of the encoder's features (training.py's
knn_sets / knn_readout / knn_top1, linear_probe.py's readout too), logged as knn_top1."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain_distill
import pretrain_mae
import pretrain_moco
import training
from conftest import ROOT, assert_one_line_error, read_log, run_script
from data import build_dataset, eval_transform, normalization
from pretrain_mae import build_mae
from pretrain_moco import moco_vit
from training import knn_sets, knn_top1, parse_args

TORCHRUN = shutil.which('torchrun', path=str(Path(sys.executable).parent)) or shutil.which('torchrun')


def tiny(data, out, *extra):
    """test_flags' tiny settings: 16 px images of 16 patches, 2 steps of 16 images per epoch."""
    return [str(a) for a in ('--data', data, '--img-size', 16, '--patch-size', 4, '--subset', 32,
                             '--batch-size', 16, '--warmup-epochs', 1, '--num-workers', 0,
                             '--output-dir', out, *extra)]


@pytest.fixture(scope='module')
def teacher(fashion_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    pretrain_mae.main(tiny(fashion_folder, out, '--epochs', 1))
    return out / 'checkpoint.pth'


def stage_run(name, teacher):
    """(main, extra flags) of each pre-training stage at test size."""
    return {'mae': (pretrain_mae.main, []),
            'dmae': (pretrain_distill.main, ['--teacher', teacher, '--teacher-model', 'vit_tiny']),
            'moco': (pretrain_moco.main, ['--mlp-dim', 64, '--out-dim', 32])}[name]


def by_hand(feature, data, batch_size=16):
    """The readout recomputed here: every train and val image of the folder `data` in the eval view,
    `feature` of each, knn_top1 of the val images against the train images."""
    transform = eval_transform(16, stats=normalization(str(data)))
    sides = []
    for train in (True, False):
        dataset, _ = build_dataset(str(data), 'unused', train=train, transform=transform)
        imgs = torch.stack([img for img, _ in dataset])                    # (N, 3, 16, 16)
        with torch.no_grad():
            features = torch.cat([feature(imgs[i:i + batch_size]) for i in range(0, len(imgs), batch_size)])
        sides += [features, torch.tensor(dataset.targets)]
    return knn_top1(*sides)


# -- when it runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize('stage', ['mae', 'dmae', 'moco'])
def test_the_readout_is_logged_every_n_epochs_and_after_the_last(stage, fashion_folder, teacher, tmp_path,
                                                                  capsys):
    main, extra = stage_run(stage, teacher)
    main(tiny(fashion_folder, tmp_path, '--epochs', 3, '--knn-every', 2, *extra))
    log = read_log(tmp_path)
    assert [r['epoch'] for r in log if 'knn_top1' in r] == [1, 2]              # epoch 2 is the last
    assert [r['epoch'] for r in log if 'knn_time_s' in r] == [1, 2]
    assert all(0 <= r['knn_top1'] <= 100 and r['knn_time_s'] > 0 for r in log if 'knn_top1' in r)
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch ')]
    assert len(epoch_lines) == 3
    for record, line in zip(log, epoch_lines):
        assert f"kNN top-1 {record['knn_top1']:.1f}%" in line if 'knn_top1' in record else 'kNN' not in line


def test_the_readout_is_off_by_default(fashion_folder, tmp_path):
    pretrain_mae.main(tiny(fashion_folder, tmp_path, '--epochs', 1))
    assert 'knn_top1' not in read_log(tmp_path)[0]


# -- what it reads out ------------------------------------------------------------------------------
def test_mae_logs_the_knn_top1_of_the_mean_patch_token_of_its_saved_encoder(fashion_folder, tmp_path):
    pretrain_mae.main(tiny(fashion_folder, tmp_path, '--epochs', 2, '--knn-every', 2))
    model = build_mae('vit_tiny', img_size=16, patch_size=4)
    model.load_state_dict(torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model'])
    model.eval()
    expected = by_hand(lambda imgs: model.encode(imgs).tokens[:, 1:].mean(dim=1), fashion_folder)
    assert read_log(tmp_path)[-1]['knn_top1'] == expected


def test_moco_logs_the_knn_top1_of_the_cls_feature_of_its_saved_encoder(fashion_folder, tmp_path):
    pretrain_moco.main(tiny(fashion_folder, tmp_path, '--epochs', 1, '--knn-every', 1, '--mlp-dim', 64,
                            '--out-dim', 32))
    encoder = moco_vit('vit_tiny', img_size=16, patch_size=4)
    encoder.load_state_dict(torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model'])
    expected = by_hand(encoder.eval(), fashion_folder)                    # the normed cls token (B, D)
    assert read_log(tmp_path)[-1]['knn_top1'] == expected


# -- which images ---------------------------------------------------------------------------------
def readout_args(data, *extra):
    return parse_args(pretrain_mae.build_parser(), ['--data', str(data), '--img-size', '16', '--knn-every', '1',
                                                    *map(str, extra)])


def labels_of(dataset):
    return sorted(label for _, label in dataset)


def test_the_neighbours_and_queries_are_fixed_stratified_samples_of_data_with_its_classes(fashion_folder,
                                                                                           monkeypatch):
    monkeypatch.setattr(training, 'KNN_BANK', 40)
    monkeypatch.setattr(training, 'KNN_QUERIES', 20)
    bank, queries = knn_sets(readout_args(fashion_folder, '--classes', '1,3'))
    assert labels_of(bank) == [0] * 20 + [1] * 20 and labels_of(queries) == [0] * 10 + [1] * 10
    again, _ = knn_sets(readout_args(fashion_folder, '--classes', '1,3'))
    assert again.indices == bank.indices
    assert knn_sets(readout_args(fashion_folder, '--classes', '1,3', '--knn-every', 0)) is None


def test_knn_data_names_another_labelled_set_to_which_classes_do_not_apply(fashion_folder, unlabelled_folder,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setattr(training, 'KNN_BANK', 40)
    bank, queries = knn_sets(readout_args(fashion_folder, '--classes', '1,3', '--knn-data', fashion_folder))
    assert labels_of(bank) == sorted([0, 1, 2, 3] * 10) and len(queries) == 80
    # pre-training on unlabelled images, read out on a labelled folder
    pretrain_mae.main(tiny(unlabelled_folder, tmp_path, '--epochs', 2, '--knn-every', 1,
                           '--knn-data', fashion_folder))
    assert [r['epoch'] for r in read_log(tmp_path) if 'knn_top1' in r] == [0, 1]


# -- bad input: one line ----------------------------------------------------------------------------
@pytest.mark.parametrize('script', ['pretrain_mae.py', 'pretrain_moco.py'])
def test_a_readout_of_unlabelled_data_is_a_one_line_error(script, unlabelled_folder, tmp_path):
    result = run_script(script, *tiny(unlabelled_folder, tmp_path, '--epochs', 1, '--knn-every', 1))
    assert_one_line_error(result, '--knn-every needs labels: pass --knn-data with a labelled set')
    result = run_script(script, *tiny(unlabelled_folder, tmp_path, '--epochs', 1, '--knn-every', 1,
                                      '--knn-data', unlabelled_folder))
    assert_one_line_error(result, '--knn-every needs labels: pass --knn-data with a labelled set',
                          f'--knn-data {unlabelled_folder} is a folder of unlabelled images')


@pytest.mark.parametrize('flags, message', [
    (['--knn-every', -1], '--knn-every -1: pass a number of epochs, or 0 for no kNN readout'),
    (['--knn-every', 1, '--knn-data', '/no/such/folder'], '--knn-data /no/such/folder: neither a known name'),
])
def test_bad_readout_flags_are_one_line_errors(flags, message, fashion_folder, tmp_path):
    result = run_script('pretrain_mae.py', *tiny(fashion_folder, tmp_path, '--epochs', 1, *flags))
    assert_one_line_error(result, message)


# -- several processes ------------------------------------------------------------------------------
@pytest.mark.ops
@pytest.mark.skipif(TORCHRUN is None, reason='torchrun is not installed')
def test_under_torchrun_the_main_process_reads_out_and_the_job_goes_on(fashion_folder, tmp_path):
    result = subprocess.run(
        [TORCHRUN, '--standalone', '--nproc_per_node=2', str(ROOT / 'pretrain_mae.py'),
         *tiny(fashion_folder, tmp_path, '--epochs', 2, '--knn-every', 1, '--device', 'cpu')],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r['epoch'] for r in read_log(tmp_path) if 'knn_top1' in r] == [0, 1]
    assert result.stdout.count('kNN top-1') == 2
