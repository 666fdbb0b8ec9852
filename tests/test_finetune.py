"""finetune.py: the layer-decay rule, loading a pre-trained encoder, batch mixing, the recipes, and
the script as a user runs it (a short real run, --eval-only, --resume, bad input)."""
import argparse
import contextlib
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from conftest import ROOT, assert_one_line_error, read_log, run_script
from finetune import build_batch_mixing, build_parser, layer_decay_groups, parse_rand_aug
import pretrain_mae
from pretrain_mae import build_mae
from operations import RunError
from training import parse_args, set_lr
from vit import load_pretrained, vit





# -- layer-wise lr decay -------------------------------------------------------------------------
def expected_layer_id(name, depth=12):
    """The paper's rule, written out again: 0 = patch_embed, cls_token, pos_embed; k = blocks[k-1];
    depth + 1 = the rest."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def named_groups(model, groups):
    names = {id(p): name for name, p in model.named_parameters()}
    return [(group, [names[id(p)] for p in group['params']]) for group in groups]


@pytest.fixture(scope='module')
def model():
    return vit('vit_tiny', img_size=16, patch_size=8, num_classes=10, global_pool=True)


def test_layer_decay_scales_follow_the_formula_for_vit_tiny(model):
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.85)
    seen = []
    for group, names in named_groups(model, groups):
        for name in names:
            assert group['lr_scale'] == pytest.approx(0.85 ** (13 - expected_layer_id(name))), name
        assert len({expected_layer_id(name) for name in names}) == 1     # one layer per group
        seen += names
    assert sorted(seen) == sorted(name for name, _ in model.named_parameters())
    scales = sorted({group['lr_scale'] for group in groups})
    assert len(scales) == 14 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.85 ** 13)

    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, 1e-3)                                 # the schedule's lr times each group's scale
    lr_of = {name: group['lr'] for group, names in named_groups(model, optimizer.param_groups)
             for name in names}
    assert lr_of['head.weight'] == pytest.approx(1e-3)
    assert lr_of['blocks.11.mlp.fc2.weight'] == pytest.approx(1e-3 * 0.85)
    assert lr_of['blocks.0.norm1.bias'] == pytest.approx(1e-3 * 0.85 ** 12)
    assert lr_of['patch_embed.proj.weight'] == lr_of['cls_token'] == pytest.approx(1e-3 * 0.85 ** 13)


def test_no_weight_decay_on_1d_params_pos_embed_and_cls_token(model):
    params = dict(model.named_parameters())
    decay_of = {name: group['weight_decay']
                for group, names in named_groups(model, layer_decay_groups(model, 0.05, 0.85))
                for name in names}
    for name, wd in decay_of.items():
        undecayed = params[name].ndim == 1 or name in ('pos_embed', 'cls_token')
        assert wd == (0.0 if undecayed else 0.05), name
    assert decay_of['blocks.3.attn.qkv.weight'] == decay_of['patch_embed.proj.weight'] == 0.05
    assert decay_of['fc_norm.weight'] == decay_of['head.bias'] == 0.0


# -- init ----------------------------------------------------------------------------------------
def test_a_pretrained_mae_encoder_loads_with_only_the_head_and_fc_norm_new(tmp_path):
    mae = build_mae('vit_tiny', img_size=32, patch_size=4)
    torch.save({'model': mae.state_dict(), 'epoch': 3}, tmp_path / 'mae.pth')
    model = vit('vit_tiny', img_size=32, patch_size=4, num_classes=4, global_pool=True)
    report = load_pretrained(model, tmp_path / 'mae.pth')
    assert sorted(report.new) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert sorted(report.ignored) == ['norm.bias', 'norm.weight']   # the global-pool head uses fc_norm
    assert torch.equal(model.blocks[11].mlp.fc2.weight, mae.blocks[11].mlp.fc2.weight)
    assert torch.equal(model.pos_embed, mae.pos_embed) and torch.equal(model.cls_token, mae.cls_token)


# -- augmentation --------------------------------------------------------------------------------
def test_mixed_targets_sum_to_one():
    torch.manual_seed(0)
    imgs, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixing = build_batch_mixing(mixup, cutmix, num_classes=10)
        for _ in range(5):
            _, targets = mixing(imgs, labels)
            assert targets.shape == (8, 10)
            assert torch.allclose(targets.sum(dim=1), torch.ones(8))
            assert (targets < 1).any()                              # actually mixed, not one-hot


def test_mixup_targets_weigh_classes_as_the_pixels_are_blended():
    torch.manual_seed(0)
    imgs, labels = torch.rand(8, 3, 16, 16), torch.arange(8)       # distinct labels: lam is readable
    mixed, targets = build_batch_mixing(0.8, 0.0, num_classes=8)(imgs, labels)
    lam = targets[0, 0]                                             # weight of each image's own class
    assert torch.allclose(targets[torch.arange(8), labels], lam.expand(8))
    assert torch.allclose(mixed, lam * imgs + (1 - lam) * imgs.roll(1, dims=0), atol=1e-6)


def test_cutmix_targets_weigh_classes_as_the_pasted_area():
    torch.manual_seed(1)
    imgs, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    mixed, targets = build_batch_mixing(0.0, 1.0, num_classes=8)(imgs, labels)
    own_pixels = (mixed == imgs).all(dim=1).float().mean(dim=(1, 2))   # (B,) share of own image
    assert torch.allclose(targets[torch.arange(8), labels], own_pixels)
    assert (own_pixels < 1).all()


def test_rand_aug_spec():
    assert parse_rand_aug('m10-mstd0.5') == (2, 10, 0.5)
    assert parse_rand_aug('rand-m9-mstd0.5-inc1') == (2, 9, 0.5)
    assert parse_rand_aug('n3-m7') == (3, 7, 0.0)
    assert parse_rand_aug('none') is None
    with pytest.raises(RunError, match='m10-mstd0.5'):
        parse_rand_aug('m12')


# -- the recipes ---------------------------------------------------------------------------------
def test_improved_and_mae_default_recipes_differ_only_where_the_paper_says():
    improved, default = (vars(parse_args(build_parser(), ['--config', str(ROOT / 'configs' / name)]))
                         for name in ('finetune_tiny_imagenet_improved.yaml',
                                      'finetune_tiny_imagenet_mae_default.yaml'))
    differ = {key: (improved[key], default[key]) for key in improved if improved[key] != default[key]}
    del differ['output_dir'], differ['config']
    assert differ == {'epochs': (300, 100), 'rand_aug': ('m10-mstd0.5', 'm9-mstd0.5'),
                      'mixup': (0.2, 0.8), 'cutmix': (0.0, 1.0), 'smoothing': (0.0, 0.1),
                      'reprob': (0.0, 0.25), 'drop_path': (0.0, 0.1)}
    assert improved['layer_decay'] == 0.85 and improved['blr'] == 1e-3 and improved['global_pool']


def test_transfer_and_quick_recipes_parse():
    def recipe(name):
        return parse_args(build_parser(), ['--config', str(ROOT / 'configs' / name)])
    transfer = recipe('finetune_transfer.yaml')
    assert (transfer.optimizer, transfer.lr, transfer.clip_grad, transfer.layer_decay,
            transfer.weight_decay, transfer.rand_aug) == ('sgd', 0.1, 1.0, 0.75, 0.0, 'none')
    quick = recipe('finetune_fashion_mnist_quick.yaml')
    assert quick.data == 'fashion_mnist' and quick.subset == 100 and quick.eval_every >= quick.epochs
    mae = parse_args(pretrain_mae.build_parser(),
                     ['--config', str(ROOT / 'configs' / 'mae_tiny_fashion_mnist_quick.yaml')])
    assert (quick.img_size, quick.patch_size) == (mae.img_size, mae.patch_size) == (28, 7)


# -- the script ----------------------------------------------------------------------------------
TINY = ['--img-size', '16', '--patch-size', '8', '--batch-size', '16', '--num-workers', '0']


@pytest.fixture(scope='module')
def finetuned(fashion_folder, tmp_path_factory):
    """A short real fine-tune on the 4-class folder, from an (untrained) MAE saved at 32 px, so its
    pos-embed is resized to the 16 px grid."""
    tmp = tmp_path_factory.mktemp('finetune')
    torch.save({'model': build_mae('vit_tiny', img_size=32, patch_size=8).state_dict()}, tmp / 'mae.pth')
    out, printed = tmp / 'run', io.StringIO()
    with contextlib.redirect_stdout(printed):
        finetune.main([str(a) for a in ('--data', fashion_folder, *TINY, '--epochs', '4', '--warmup-epochs', '1',
                                        '--blr', '4e-3', '--rand-aug', 'none', '--mixup', '0', '--min-crop-scale',
                                        '0.5', '--init', tmp / 'mae.pth', '--output-dir', out)])
    return out, printed.getvalue()


def test_init_reports_what_was_loaded_and_what_is_new(finetuned):
    _, stdout = finetuned
    line = next(line for line in stdout.splitlines() if line.startswith('init from'))
    assert 'new: fc_norm.weight, fc_norm.bias, head.weight, head.bias;' in line
    assert 'ignored: norm.weight, norm.bias' in line


def test_a_short_real_run_beats_chance_and_keeps_best_and_last(finetuned):
    out, _ = finetuned
    log = read_log(out)
    assert [line['epoch'] for line in log] == [0, 1, 2, 3]
    assert all({'val_top1', 'val_top5', 'val_loss', 'loss', 'img_per_s'} <= set(line) for line in log)
    best = max(line['val_top1'] for line in log)
    assert best >= 45.0, log                                        # chance is 25% for 4 classes
    assert log[-1]['val_loss'] < log[0]['val_loss'] and log[-1]['val_top5'] == 100.0   # 4 classes
    last, kept = (torch.load(out / name, weights_only=True) for name in ('checkpoint.pth', 'best.pth'))
    assert last['epoch'] == 3 and last['stage'] == 'finetune'
    assert kept['top1'] == best == log[kept['epoch']]['val_top1'] == last['best_top1']


def test_eval_only_reproduces_the_logged_accuracy(finetuned, fashion_folder, tmp_path):
    out, _ = finetuned
    best = torch.load(out / 'best.pth', weights_only=True)
    result = run_script('finetune.py', '--eval-only', '--data', fashion_folder, *TINY,
                        '--init', out / 'best.pth', '--output-dir', tmp_path)
    assert result.returncode == 0, result.stderr
    top1, top5, loss = map(float, re.search(r'top-1 ([\d.]+)% top-5 ([\d.]+)% loss ([\d.]+)',
                                            result.stdout).groups())
    logged = read_log(out)[best['epoch']]
    assert top1 == pytest.approx(logged['val_top1'], abs=0.01)      # printed with 2 decimals
    assert top5 == pytest.approx(logged['val_top5'], abs=0.01)
    assert loss == pytest.approx(logged['val_loss'], abs=1e-4)
    assert not (tmp_path / 'log.jsonl').exists()                    # evaluation trains nothing


@pytest.mark.ops
def test_ddp_eval_sums_the_counts_of_both_processes(finetuned, fashion_folder, tmp_path):
    out, _ = finetuned
    best = torch.load(out / 'best.pth', weights_only=True)
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(ROOT / 'finetune.py'), '--eval-only', '--data', str(fashion_folder), *TINY,
         '--init', str(out / 'best.pth'), '--output-dir', str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'x 2' in result.stdout and result.stdout.count('top-1') == 1     # only rank 0 speaks
    top1, loss = map(float, re.search(r'top-1 ([\d.]+)% .* loss ([\d.]+)', result.stdout).groups())
    logged = read_log(out)[best['epoch']]                           # 80 images = 2 shards of 40
    assert top1 == pytest.approx(logged['val_top1'], abs=0.01)
    assert loss == pytest.approx(logged['val_loss'], abs=1e-4)


def test_eval_only_refuses_an_encoder_without_its_head(fashion_folder, tmp_path):
    torch.save({'model': build_mae('vit_tiny', img_size=16, patch_size=8).state_dict()}, tmp_path / 'mae.pth')
    with pytest.raises(RunError, match='--eval-only needs a checkpoint of this stage with its head'):
        finetune.main(['--eval-only', '--data', str(fashion_folder), *TINY,
                       '--init', str(tmp_path / 'mae.pth'), '--output-dir', str(tmp_path)])


def small_folder(fashion_folder, folder, per_class):
    """The first few images of each class of the fixture's folder, for runs that need few."""
    for split, count in per_class.items():
        for src_class in (fashion_folder / split).iterdir():
            (folder / split / src_class.name).mkdir(parents=True)
            for src in sorted(src_class.glob('*.png'))[:count]:
                (folder / split / src_class.name / src.name).write_bytes(src.read_bytes())
    return folder


@pytest.mark.ops
def test_a_run_stopped_after_an_epoch_resumes_exactly(fashion_folder, tmp_path, monkeypatch):
    data = small_folder(fashion_folder, tmp_path / 'data', {'train': 8, 'val': 4})
    # every random part of the recipe is on: RandAugment, erasing, MixUp/CutMix, drop path
    args = ['--data', str(data), *TINY, '--epochs', '2',
            '--warmup-epochs', '1', '--rand-aug', 'm9-mstd0.5', '--reprob', '0.25', '--mixup', '0.8',
            '--cutmix', '1.0', '--smoothing', '0.1', '--drop-path', '0.1']
    whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
    finetune.main([*args, '--output-dir', str(whole)])

    def save_then_die(path, **state):                               # killed right after epoch 0
        real_save(path, **state)
        if Path(path).name == 'checkpoint.pth':
            raise KeyboardInterrupt
    real_save = finetune.save_checkpoint
    monkeypatch.setattr(finetune, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*args, '--output-dir', str(stopped)])
    monkeypatch.undo()
    finetune.main(['--resume', str(stopped / 'checkpoint.pth')])

    timing = ('img_per_s', 'epoch_time_s')
    assert ([{k: v for k, v in line.items() if k not in timing} for line in read_log(stopped)]
            == [{k: v for k, v in line.items() if k not in timing} for line in read_log(whole)])
    a, b = (torch.load(d / 'checkpoint.pth', weights_only=True)['model'] for d in (whole, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_on_device_evaluates_like_the_image_pipeline(finetuned, fashion_folder, tmp_path, capsys):
    out, _ = finetuned
    best = torch.load(out / 'best.pth', weights_only=True)
    finetune.main(['--eval-only', '--data-on-device', '--data', str(fashion_folder), *TINY,
                   '--init', str(out / 'best.pth'), '--output-dir', str(tmp_path)])
    top1 = float(re.search(r'top-1 ([\d.]+)%', capsys.readouterr().out)[1])
    # tensor resize vs PIL resize: a few of the 80 images may flip, not more
    assert abs(top1 - read_log(out)[best['epoch']]['val_top1']) <= 5.0


def test_data_on_device_trains_with_the_full_augmentation(fashion_folder, tmp_path, monkeypatch):
    """--rand-aug, --reprob and --mixup reach the in-memory path's training batches: with the same seed
    (the same images, crops and flips) every image of the first batch differs from its plain view,
    and MixUp's soft targets replace the labels."""
    data = small_folder(fashion_folder, tmp_path / 'data', {'train': 8, 'val': 4})
    real_loss = finetune.classification_loss

    def first_batch(*recipe):
        seen = []

        def recording(model, imgs, labels, batch_mixing, smoothing):
            seen.append((imgs.clone(), batch_mixing))
            return real_loss(model, imgs, labels, batch_mixing, smoothing)
        monkeypatch.setattr(finetune, 'classification_loss', recording)
        out = tmp_path / f'out{len(recipe)}'
        finetune.main(['--data', str(data), *TINY, '--epochs', '1', '--warmup-epochs', '0', '--data-on-device',
                       '--min-crop-scale', '1.0', *recipe, '--output-dir', str(out)])
        (line,) = read_log(out)
        assert math.isfinite(line['loss'])
        return seen[0]

    plain, no_mixing = first_batch('--rand-aug', 'none', '--reprob', '0', '--mixup', '0')
    augmented, mixing = first_batch('--rand-aug', 'm9-mstd0.5', '--reprob', '1.0', '--mixup', '0.8')
    assert no_mixing is None and mixing is not None
    assert plain.shape == augmented.shape
    assert all(not torch.equal(a, b) for a, b in zip(plain, augmented))      # an erased box in each


def test_a_junk_init_file_is_one_line_error(fashion_folder, tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a checkpoint')
    result = run_script('finetune.py', '--data', fashion_folder, *TINY, '--init', junk,
                        '--output-dir', tmp_path)
    assert_one_line_error(result, 'not a readable', str(junk))


def test_eval_every_and_the_last_epochs_clean_train_top1(fashion_folder, tmp_path):
    """Evaluation on epochs 2, 4 and the last; the last also scores the training images in the eval
    view, which --eval-only on a folder whose val split is those very images reproduces."""
    out = tmp_path / 'run'
    result = run_script('finetune.py', '--data', fashion_folder, *TINY, '--epochs', '5', '--eval-every', '2',
                        '--warmup-epochs', '1', '--blr', '4e-3', '--rand-aug', 'none', '--mixup', '0',
                        '--crop-pct', '1.0', '--output-dir', out)
    assert result.returncode == 0, result.stderr
    log = read_log(out)
    assert [('val_top1' in line, 'train_top1' in line) for line in log] == [
        (False, False), (True, False), (False, False), (True, False), (True, True)]
    assert 'train top-1' in result.stdout.splitlines()[-1]
    same_images = tmp_path / 'train_as_val'
    same_images.mkdir()
    for split in ('train', 'val'):
        (same_images / split).symlink_to(fashion_folder / 'train')
    result = run_script('finetune.py', '--eval-only', '--data', same_images, *TINY, '--crop-pct', '1.0',
                        '--init', out / 'checkpoint.pth', '--output-dir', tmp_path / 'eval')
    assert result.returncode == 0, result.stderr
    top1 = float(re.search(r'top-1 ([\d.]+)%', result.stdout)[1])
    assert top1 == pytest.approx(log[-1]['train_top1'], abs=0.01)


# -- --init-blocks: the re-initialisation study --------------------------------------------------
@pytest.mark.parametrize('blocks, with_embedding', [('0-5', True), ('6-11', False), ('0,11', True)])
def test_init_blocks_keeps_exactly_the_named_tensors_and_reinitialises_the_others(blocks, with_embedding,
                                                                                 tmp_path):
    torch.manual_seed(1)
    mae = build_mae('vit_tiny', img_size=16, patch_size=8)
    torch.save({'model': mae.state_dict()}, tmp_path / 'mae.pth')
    torch.manual_seed(0)
    model = vit('vit_tiny', img_size=16, patch_size=8, num_classes=10, global_pool=True)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, tmp_path / 'mae.pth')
    kept = finetune.keep_only_blocks(model, fresh, finetune.block_list(blocks))

    wanted = {f'blocks.{b}.' for b in finetune.block_list(blocks)}
    pretrained, state = mae.state_dict(), model.state_dict()
    for name, value in state.items():
        from_checkpoint = name.startswith(tuple(wanted)) or (
            with_embedding and name.startswith(('patch_embed.', 'pos_embed', 'cls_token')))
        assert (name in kept) == from_checkpoint, name
        expected = pretrained[name] if from_checkpoint else fresh[name]
        assert torch.equal(value, expected), name
    torch.manual_seed(0)       # "as from scratch": the very weights a run without --init starts from
    scratch = vit('vit_tiny', img_size=16, patch_size=8, num_classes=10, global_pool=True).state_dict()
    assert all(torch.equal(state[k], scratch[k]) for k in state if k not in kept)


def test_init_blocks_parses_ranges_and_refuses_what_is_not_a_block():
    assert finetune.block_list('0-2,5') == [0, 1, 2, 5] and finetune.block_list([3, 1]) == [1, 3]
    with pytest.raises(argparse.ArgumentTypeError):
        finetune.block_list('low')
    model = vit('vit_tiny', img_size=16, patch_size=8, num_classes=10)
    with pytest.raises(RunError, match='blocks 0..11'):
        finetune.keep_only_blocks(model, model.state_dict(), [10, 12])


def test_a_run_with_init_blocks_says_what_it_kept(fashion_folder, tmp_path, capsys):
    mae = tmp_path / 'mae.pth'
    torch.save({'model': build_mae('vit_tiny', img_size=16, patch_size=8).state_dict()}, mae)
    finetune.main(['--data', str(fashion_folder), *TINY, '--epochs', '1', '--warmup-epochs', '0', '--init', str(mae),
                   '--init-blocks', '0-5', '--output-dir', str(tmp_path / 'out')])
    assert '--init-blocks 0,1,2,3,4,5: 76 tensors kept' in capsys.readouterr().out   # 6 x 12 + 4


# -- the ConvNet references -----------------------------------------------------------------------
@pytest.mark.parametrize('name', finetune.CONVNETS)
def test_a_convnet_ends_a_28px_image_as_a_2x2_map(name):
    model = finetune.convnet(name, 5).eval()
    trunk = model.features if name == 'mobilenet_v3_large' else torch.nn.Sequential(*list(model.children())[:-2])
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 28, 28)).shape[-2:] == (2, 2)      # stride 16: torchvision's 32 gives 1x1
        assert model(torch.randn(2, 3, 28, 28)).shape == (2, 5)


def test_the_convnet_reference_trains_from_scratch_on_small_images(fashion_folder, tmp_path, capsys):
    finetune.main(['--data', str(fashion_folder), '--model', 'resnet18', '--layer-decay', '1.0', '--img-size', '16',
                   '--batch-size', '16', '--num-workers', '0', '--epochs', '3', '--warmup-epochs', '0',
                   '--blr', '3e-3', '--rand-aug', 'none', '--mixup', '0', '--output-dir', str(tmp_path)])
    log = read_log(tmp_path)
    assert log[-1]['loss'] < log[0]['loss'] and log[-1]['val_top1'] > 25.0        # 4 classes: chance 25%
    assert 'no --init: resnet18 from scratch\n' in capsys.readouterr().out       # not "the supervised baseline"


def test_mobilenet_running_statistics_follow_a_short_run():
    # torchvision's batch-norm momentum 0.01 averages over ~100 steps: after a 400-step fine-tune from
    # scratch the running statistics were still near their start, and the eval top-1 at chance
    torch.manual_seed(0)
    model = finetune.convnet('mobilenet_v3_large', 5).train()
    images = torch.randn(16, 3, 28, 28) * 3 + 2                        # far from the initial (0, 1) statistics
    stem_conv, stem_norm = model.features[0][0], model.features[0][1]
    with torch.no_grad():
        for _ in range(50):
            model(images)
        batch_mean = stem_conv(images).mean(dim=(0, 2, 3))
    assert torch.allclose(stem_norm.running_mean, batch_mean, rtol=0.01, atol=1e-3)


def test_the_convnet_takes_no_init_and_no_layer_decay(fashion_folder, tmp_path):
    base = ['--data', fashion_folder, '--model', 'resnet18', *TINY, '--output-dir', tmp_path]
    assert_one_line_error(run_script('finetune.py', *base), 'no layer decay')
    assert_one_line_error(run_script('finetune.py', *base, '--layer-decay', '1.0', '--init', tmp_path / 'x.pth'),
                          'takes no --init')
