"""pretrain_mae.py: the MAE model's pieces, and the training script as a user runs it."""
import itertools
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import pretrain_mae
from conftest import ROOT, assert_one_line_error, read_log, run_script
from pretrain_distill import build_teacher
from pretrain_mae import (MAE, build_mae, init_mae, mae_decoder, reconstruction_columns,
                          save_reconstruction_figure)
from training import weight_decay_groups
from vit import vit


def small_mae(**kwargs):
    return build_mae('vit_tiny', img_size=16, patch_size=4, **kwargs)            # 16 patches of 4 x 4 x 3



# -- the model -----------------------------------------------------------------------------------
def test_state_dict_has_the_official_mae_names():
    keys = set(small_mae().state_dict())
    decoder = {'decoder_embed.weight', 'decoder_embed.bias', 'mask_token', 'decoder_pos_embed',
               'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias',
               'decoder_blocks.0.attn.qkv.weight', 'decoder_blocks.0.mlp.fc2.bias'}
    encoder = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.11.attn.proj.weight',
               'norm.weight'}
    assert decoder | encoder <= keys
    assert not any(k.startswith(('head', 'fc_norm', 'decoder_blocks.1.')) for k in keys)


def test_patchify_matches_the_official_layout_and_inverts():
    model = small_mae()
    imgs = torch.randn(2, 3, 16, 16)
    official = torch.einsum('nchpwq->nhwpqc', imgs.reshape(2, 3, 4, 4, 4, 4)).reshape(2, 16, 48)
    torch.testing.assert_close(model.patchify(imgs), official)
    torch.testing.assert_close(model.unpatchify(model.patchify(imgs)), imgs)


def test_masking_keeps_the_lowest_noise_patches():
    model = small_mae()
    noise = torch.rand(3, 16)
    visible_idx, mask, restore_idx = model.random_masking(3, 0.75, noise)
    assert visible_idx.shape == (3, 4)
    assert torch.equal(visible_idx.sort(1).values, noise.argsort(1)[:, :4].sort(1).values)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))           # 12 of 16 masked
    assert (mask.gather(1, visible_idx) == 0).all()                   # visible = not masked
    shuffled = noise.argsort(1)
    assert torch.equal(shuffled.gather(1, restore_idx), torch.arange(16).expand(3, -1))


def test_same_noise_gives_the_same_loss_and_mask():
    torch.manual_seed(0)
    model = small_mae()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    loss_a, pred_a, mask_a = model(imgs, 0.75, noise)
    loss_b, pred_b, mask_b = model(imgs, 0.75, noise)
    assert loss_a == loss_b and torch.equal(mask_a, mask_b) and pred_a.shape == (2, 16, 48)


def test_loss_counts_masked_patches_only():
    model = small_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 16, 16)
    target = model.patchify(imgs)                                    # (2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    pred = target.clone()
    pred[:, 5:] += 100.0                                             # wrong only where visible
    assert model.forward_loss(imgs, pred, mask) == 0
    pred = target + 1.0                                              # off by one everywhere
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), torch.tensor(1.0))


def test_norm_pix_loss_normalises_each_patch_with_unbiased_variance():
    model = build_mae('vit_tiny', img_size=4, patch_size=2, norm_pix_loss=True)   # 4 patches of 12 values
    imgs = torch.zeros(1, 3, 4, 4)
    imgs[0, 0, 0, 0] = 12.0                        # patch 0: one 12 among 12 values: mean 1
    var = (11 ** 2 + 11 * 1) / 11                  # unbiased: (121 + 11 * 1) / (12 - 1) = 12
    expected = torch.full((12,), (0 - 1) / (var + 1e-6) ** 0.5)
    expected[0] = (12 - 1) / (var + 1e-6) ** 0.5   # the 12 sits at (row 0, col 0, channel 0)
    torch.testing.assert_close(model.patch_targets(imgs)[0, 0], expected)
    mask = torch.tensor([[1.0, 0, 0, 0]])
    torch.testing.assert_close(model.forward_loss(imgs, torch.zeros(1, 4, 12), mask),
                               (expected ** 2).mean())


def test_pos_embeds_are_fixed_and_tokens_are_decayed():
    model = small_mae()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    decay, no_decay = weight_decay_groups(model, 0.05)
    ids = lambda group: {id(p) for p in group['params']}
    assert id(model.cls_token) in ids(decay) and id(model.mask_token) in ids(decay)
    assert id(model.blocks[0].attn.qkv.bias) in ids(no_decay) and id(model.norm.weight) in ids(no_decay)
    assert id(model.pos_embed) not in ids(decay) | ids(no_decay)


def test_official_initialisation():
    model = build_mae('vit_tiny', img_size=32, patch_size=16)
    w = model.blocks[0].attn.qkv.weight                              # xavier-uniform bound sqrt(6/(fan_in+fan_out))
    assert w.abs().max() <= (6 / (192 + 576)) ** 0.5 and w.abs().max() > 0.9 * (6 / (192 + 576)) ** 0.5
    assert 0.015 < model.cls_token.std() < 0.025 and model.blocks[0].attn.qkv.bias.abs().sum() == 0


# -- the script ----------------------------------------------------------------------------------
QUICK = ['--data', 'fashion_mnist', '--img-size', '16', '--patch-size', '4', '--batch-size', '64',
         '--subset', '1024', '--num-workers', '0', '--warmup-epochs', '1', '--blr', '1e-3']


def test_a_short_real_run_lowers_the_loss_and_writes_its_outputs(fashion_root, tmp_path):
    out = tmp_path / 'run'
    result = run_script('pretrain_mae.py', *QUICK, '--data-root', fashion_root, '--epochs', '4',
                        '--output-dir', out)
    assert result.returncode == 0, result.stderr
    assert 'effective batch 64' in result.stdout and 'device cpu' in result.stdout
    losses = [line['loss'] for line in read_log(out)]
    assert [line['epoch'] for line in read_log(out)] == [0, 1, 2, 3]
    assert losses[-1] < 0.9 * losses[0], losses
    assert (out / 'reconstruction.png').stat().st_size > 10_000 and (out / 'config.yaml').exists()
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['epoch'] == 3 and ckpt['stage'] == 'pretrain_mae'
    small_mae().load_state_dict(ckpt['model'], strict=True)


def start_and_stop_in_epoch_1(args, out, sig):
    """Start pretrain_mae.py, send `sig` somewhere inside its epoch 1; -> the finished process."""
    process = subprocess.Popen([sys.executable, str(ROOT / 'pretrain_mae.py'), *map(str, args),
                                '--output-dir', str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / 'checkpoint.pth').exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)                                                 # somewhere inside epoch 1
    process.send_signal(sig)
    process.stdout_text, process.stderr_text = process.communicate()
    return process


@pytest.mark.ops
def test_a_run_killed_at_any_moment_resumes_to_the_same_losses(fashion_root, tmp_path):
    """One command, `--resume auto`, for the first start and the restart (as torchrun
    --max-restarts or a scheduler repeats it): fresh in an empty folder, then exactly where it was."""
    args = [*QUICK, '--data-root', fashion_root, '--epochs', '3', '--subset', '512']
    whole, broken = tmp_path / 'whole', tmp_path / 'broken'
    assert run_script('pretrain_mae.py', *args, '--output-dir', whole).returncode == 0

    first = start_and_stop_in_epoch_1([*args, '--resume', 'auto'], broken, signal.SIGKILL)
    assert f"--resume auto: no {broken / 'checkpoint.pth'} yet, starting fresh" in first.stdout_text
    resumed = run_script('pretrain_mae.py', *args, '--resume', 'auto', '--output-dir', broken)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume auto: continuing from {broken / 'checkpoint.pth'}" in resumed.stdout
    assert read_log(broken) == [{**line, 'img_per_s': b['img_per_s'], 'epoch_time_s': b['epoch_time_s']}
                                for line, b in zip(read_log(whole), read_log(broken))]
    assert [line['loss'] for line in read_log(broken)] == [line['loss'] for line in read_log(whole)]


@pytest.mark.ops
def test_sigterm_stops_at_once_with_one_line_and_an_intact_checkpoint(fashion_root, tmp_path):
    out = tmp_path / 'run'
    stopped = start_and_stop_in_epoch_1([*QUICK, '--data-root', fashion_root, '--epochs', '3'], out, signal.SIGTERM)
    assert stopped.returncode == 143
    assert stopped.stderr_text.strip().splitlines()[-1].startswith('stopped by SIGTERM; the last checkpoint is intact')
    assert 'Traceback' not in stopped.stderr_text
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert [line['epoch'] for line in read_log(out)] == [0]


def test_image_size_not_divisible_by_patch(tmp_path):
    result = run_script('pretrain_mae.py', '--data', 'synthetic', '--img-size', '30',
                        '--patch-size', '4', '--output-dir', tmp_path)
    assert_one_line_error(result, 'not divisible', '--img-size 32')


def test_missing_data_folder(tmp_path):
    result = run_script('pretrain_mae.py', '--data', tmp_path / 'imagenet', '--output-dir', tmp_path)
    assert_one_line_error(result, 'neither a known name')


def test_corrupt_image_in_the_training_folder_under_strict_images(fashion_folder, tmp_path):
    folder = tmp_path / 'data'
    for split in ('train', 'val'):
        (folder / split / 'a').mkdir(parents=True)
        for i, src in enumerate(sorted((fashion_folder / split).glob('*/*.png'))[:8]):
            (folder / split / 'a' / f'{i}.png').write_bytes(src.read_bytes())
    bad = folder / 'train' / 'a' / '3.png'
    bad.write_bytes(bad.read_bytes()[:40])                          # truncated PNG
    for workers in ('0', '2'):
        result = run_script('pretrain_mae.py', '--data', folder, '--img-size', '16', '--patch-size',
                            '4', '--batch-size', '4', '--epochs', '1', '--num-workers', workers,
                            '--strict-images', '--output-dir', tmp_path / 'out')
        assert_one_line_error(result, f'cannot read image {bad}')


def test_junk_and_wrong_checkpoints(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a checkpoint')
    base = ['--data', 'synthetic', '--img-size', '16', '--patch-size', '4', '--output-dir', tmp_path]
    assert_one_line_error(run_script('pretrain_mae.py', *base, '--resume', junk), 'not a readable')
    assert_one_line_error(run_script('pretrain_mae.py', *base, '--init', junk), 'not a readable')
    torch.save({'model': build_mae('vit_tiny', img_size=16, patch_size=8).state_dict()}, tmp_path / 'p8.pth')
    assert_one_line_error(run_script('pretrain_mae.py', *base, '--init', tmp_path / 'p8.pth'),
                          'does not fit', 'patch_embed.proj.weight')
    assert_one_line_error(run_script('pretrain_mae.py', *base, '--resume', tmp_path / 'p8.pth'),
                          'not a checkpoint written by these scripts')


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(fashion_root, tmp_path):
    out = tmp_path / 'run'
    assert run_script('pretrain_mae.py', *QUICK, '--data-root', fashion_root, '--subset', '256',
                      '--epochs', '1', '--output-dir', out).returncode == 0
    before = (out / 'checkpoint.pth').read_bytes(), (out / 'log.jsonl').read_text()
    result = run_script('pretrain_mae.py', '--resume', out / 'checkpoint.pth', '--epochs', '3',
                        '--lr', '1e30', '--warmup-epochs', '0')
    assert_one_line_error(result, 'training diverged', 'intact')
    assert ((out / 'checkpoint.pth').read_bytes(), (out / 'log.jsonl').read_text()) == before


# -- decoder ablations: --decoder-dim / --decoder-depth / --decoder-heads ---------------------------
def quick_run(data, out, *extra):
    return [str(a) for a in ('--data', data, '--img-size', 16, '--patch-size', 4, '--subset', 32,
                             '--batch-size', 16, '--epochs', 1, '--warmup-epochs', 0, '--num-workers', 0,
                             '--output-dir', out, *extra)]


def test_the_default_decoder_is_the_papers_and_heads_follow_a_given_width():
    assert mae_decoder('vit_tiny') == dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3)
    assert mae_decoder('vit_base') == dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    assert mae_decoder('vit_tiny', 192)['decoder_num_heads'] == 3             # the paper's 3 divide 192
    assert mae_decoder('vit_tiny', 128)['decoder_num_heads'] == 4             # else heads of width 32
    assert mae_decoder('vit_tiny', 128, 4, 8) == dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=8)


@pytest.mark.parametrize('flags, message', [
    (['--decoder-dim', '100', '--decoder-heads', '3'], '--decoder-dim 100 does not split into --decoder-heads 3'),
    (['--decoder-dim', '30'], '--decoder-dim 30: the decoder\'s width must be a positive multiple of 4'),
    (['--decoder-depth', '0'], '--decoder-depth 0: the decoder needs at least one block'),
])
def test_a_decoder_that_cannot_be_built_is_one_error_line(flags, message, tmp_path):
    assert_one_line_error(run_script('pretrain_mae.py', '--data', 'synthetic', *flags, '--output-dir', tmp_path),
                          message)


@pytest.fixture(scope='module')
def decoder_run(fashion_folder, tmp_path_factory):
    """One short epoch of an MAE-Tiny with a decoder of width 64, depth 2 and 2 heads."""
    out = tmp_path_factory.mktemp('decoder')
    pretrain_mae.main(quick_run(fashion_folder, out, '--decoder-dim', 64, '--decoder-depth', 2,
                                '--decoder-heads', 2))
    return out


def test_decoder_flags_build_that_decoder_and_are_saved(decoder_run):
    ckpt = torch.load(decoder_run / 'checkpoint.pth', weights_only=True)
    assert (ckpt['args']['decoder_dim'], ckpt['args']['decoder_depth'], ckpt['args']['decoder_heads']) == (64, 2, 2)
    assert ckpt['model']['decoder_embed.weight'].shape == (64, 192)
    assert 'decoder_blocks.1.attn.qkv.weight' in ckpt['model'] and 'decoder_blocks.2.norm1.weight' not in ckpt['model']


def test_from_checkpoint_reads_the_decoder_back(decoder_run):
    ckpt = torch.load(decoder_run / 'checkpoint.pth', weights_only=True)
    loaded = MAE.from_checkpoint(decoder_run / 'checkpoint.pth')              # analyze.py reconstruct's loader
    assert len(loaded.decoder_blocks) == 2 and loaded.decoder_blocks[0].attn.num_heads == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ckpt['model'].items())


def test_from_checkpoint_without_saved_args_takes_the_heads_by_the_default_rule(tmp_path):
    torch.manual_seed(0)
    mae = build_mae('vit_tiny', decoder_dim=128, decoder_depth=2, img_size=16, patch_size=4).eval()
    torch.save({'model': mae.state_dict()}, tmp_path / 'official_layout.pth')
    loaded = MAE.from_checkpoint(tmp_path / 'official_layout.pth').eval()
    assert loaded.decoder_blocks[0].attn.num_heads == mae.decoder_blocks[0].attn.num_heads == 4
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(imgs, 0.75, noise)[1], mae(imgs, 0.75, noise)[1])


def test_resume_rebuilds_the_saved_decoder(decoder_run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(decoder_run, out)
    pretrain_mae.main(['--resume', str(out / 'checkpoint.pth'), '--epochs', '2', '--output-dir', str(out)])
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['args']['decoder_heads'] == 2
    assert ckpt['model']['decoder_embed.weight'].shape == (64, 192) and len(read_log(out)) == 2


def test_resume_with_another_decoder_on_the_command_line_is_one_line(decoder_run, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(decoder_run, out)
    result = run_script('pretrain_mae.py', '--resume', out / 'checkpoint.pth', '--decoder-depth', 3,
                        '--epochs', 2, '--output-dir', out)
    assert_one_line_error(result, 'does not fit the model these flags build', 'decoder_blocks.2')
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0          # untouched


def test_a_dmae_teacher_loads_whatever_its_decoder(decoder_run):
    teacher = build_teacher('vit_tiny', decoder_run / 'checkpoint.pth', img_size=16, patch_size=4)
    saved = torch.load(decoder_run / 'checkpoint.pth', weights_only=True)['model']
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())


# -- continued pre-training: --init loads the decoder too ------------------------------------------
def counts(state):
    """(encoder tensors, decoder tensors that --init loads) of an MAE state dict."""
    decoder = [k for k in state if k.startswith(('decoder', 'mask_token')) and k != 'decoder_pos_embed']
    return len([k for k in state if not k.startswith(('decoder', 'mask_token'))]), len(decoder)


@pytest.mark.parametrize('layout', ['ours', 'official', 'mae_lite'])
def test_init_from_a_pretraining_checkpoint_loads_encoder_and_decoder_exactly(layout, tmp_path):
    torch.manual_seed(0)
    source = small_mae().state_dict()
    path = tmp_path / 'ckpt.pth'
    torch.save({'ours': {'stage': 'pretrain_mae', 'epoch': 3, 'args': {'model': 'vit_tiny'}, 'model': source},
                'official': {'model': source},                                # mae_visualize_vit_*.pth
                'mae_lite': {'model': {f'module.model.{k}': v for k, v in source.items()}}}[layout], path)
    torch.manual_seed(1)
    model = small_mae()
    line = init_mae(model, path)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    encoder, decoder = counts(source)
    assert line == (f"init from {path}: {encoder} encoder tensors loaded (new: none; ignored: none); "
                    f"decoder: loaded ({decoder} tensors)")


def test_init_from_an_encoder_alone_starts_the_decoder_fresh_and_says_so(tmp_path):
    finetuned = vit('vit_tiny', img_size=16, patch_size=4, num_classes=4, global_pool=True)
    torch.save({'model': finetuned.state_dict()}, tmp_path / 'finetuned.pth')
    torch.manual_seed(1)
    model = small_mae()
    torch.manual_seed(1)
    fresh = small_mae().state_dict()
    line = init_mae(model, tmp_path / 'finetuned.pth')
    assert line.endswith("(new: norm.weight, norm.bias; ignored: fc_norm.weight, fc_norm.bias, head.weight, "
                         "head.bias); decoder: none in the checkpoint, starts fresh")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in finetuned.state_dict().items() if k in state)
    assert all(torch.equal(state[k], fresh[k]) for k in state if k.startswith(('decoder', 'mask_token')))


def test_init_from_a_decoder_of_another_shape_starts_it_fresh_and_says_so(tmp_path):
    torch.save({'model': small_mae(decoder_dim=64).state_dict()}, tmp_path / 'other.pth')
    line = init_mae(small_mae(), tmp_path / 'other.pth')
    assert line.endswith("decoder: another shape (dim 64, depth 1, 48 values per patch vs dim 96, depth 1, "
                         "48 values per patch), starts fresh")


def test_the_init_flag_prints_what_it_loaded(decoder_run, tmp_path, capsys):
    pretrain_mae.main(quick_run('synthetic', tmp_path, '--init', decoder_run / 'checkpoint.pth',
                                '--decoder-dim', 64, '--decoder-depth', 2, '--decoder-heads', 2))
    assert 'decoder: loaded (31 tensors)' in capsys.readouterr().out      # embed, mask token, 2 blocks, norm, pred


# -- the figure --------------------------------------------------------------------------------------
def test_the_reconstruction_column_greys_the_visible_patches_only():
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=False)
    with torch.no_grad():                           # a decoder that predicts 1.0 for every pixel
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.fill_(1.0)
    stats = ((0.2, 0.4, 0.6), (0.5, 0.25, 0.1))
    columns, mask = reconstruction_columns(model, torch.randn(3, 3, 16, 16), stats)
    shown = columns['reconstruction (visible patches greyed: not trained)']         # (3, 3, 16, 16)
    grey = (0.5 - torch.tensor(stats[0])) / torch.tensor(stats[1])                 # mid-grey, normalised
    assert mask.shape == (3, 16) and (mask.sum(1) == 12).all()
    for b, patch in itertools.product(range(3), range(16)):
        row, col = divmod(patch, 4)                                              # a 4 x 4 grid of 4-px patches
        pixels = shown[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4]            # (3, 4, 4)
        expected = torch.ones(3) if mask[b, patch] else 0.3 * 1.0 + 0.7 * grey
        torch.testing.assert_close(pixels, expected[:, None, None].expand(3, 4, 4))


def test_the_figure_is_written(tmp_path):
    path = tmp_path / 'reconstruction.png'
    save_reconstruction_figure(small_mae(), torch.randn(2, 3, 16, 16), path, 'a title ' * 30,
                               ((0.5,) * 3, (0.5,) * 3))
    assert Image.open(path).size == (640, 320)                                   # 8 x 4 inches at 80 dpi
