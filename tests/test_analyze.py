"""analyze.py: the CKA and attention formulas against independent reference code, and each
sub-command end to end on real images."""
import argparse
import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import analyze
import data
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from analyze import (attention_distance, attention_entropy, build_encoder, layer_features,
                     main as analyze_main, minibatch_cka, patch_attention)
from conftest import assert_one_line_error, run_script
from pretrain_mae import MAE, build_mae
from vit import VisionTransformer


def reference_hsic1(K, L):
    """HSIC1 written out with numpy, straight from Song et al. 2012."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones((n, 1))
    value = (np.trace(K @ L) + (one.T @ K @ one).item() * (one.T @ L @ one).item() / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ K @ L @ one).item())
    return value / (n * (n - 3))


def reference_cka(batches_x, batches_y):
    """CKA of two single-layer feature sets from per-batch HSIC1 means."""
    kl, kk, ll = [], [], []
    for x, y in zip(batches_x, batches_y):
        K, L = x @ x.T, y @ y.T
        kl.append(reference_hsic1(K, L))
        kk.append(reference_hsic1(K, K))
        ll.append(reference_hsic1(L, L))
    return np.mean(kl) / np.sqrt(np.mean(kk) * np.mean(ll))


def small_vit(**kwargs):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=0,
                             **kwargs).eval()


# -- CKA -------------------------------------------------------------------------------------------
def test_cka_of_a_model_with_itself_is_one_on_the_diagonal_and_symmetric():
    torch.manual_seed(0)
    model = small_vit()
    batches = [torch.randn(16, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        cka = minibatch_cka((layer_features(model, imgs), layer_features(model, imgs)) for imgs in batches)
    assert cka.shape == (4, 4)                                        # depth + 1 layers
    torch.testing.assert_close(cka.diagonal(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(cka, cka.T)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    torch.manual_seed(0)
    x, y = torch.randn(40, 20), torch.randn(40, 30)
    y = y + x @ torch.randn(20, 30)                                   # related, so CKA is far from 0
    rotation, _ = torch.linalg.qr(torch.randn(30, 30))
    base = minibatch_cka([([x], [y])])
    transformed = minibatch_cka([([x * 3.7], [y @ rotation])])
    assert 0.2 < base.item() < 1
    torch.testing.assert_close(transformed, base)


@pytest.mark.parametrize('num_batches', [1, 3])
def test_minibatch_cka_matches_a_direct_computation_of_the_formula(num_batches):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((12, 7)) for _ in range(num_batches)]
    ys = [x @ rng.standard_normal((7, 5)) + rng.standard_normal((12, 5)) for x in xs]
    # two layers of X (the second a scaled copy) against one of Y
    cka = minibatch_cka(([torch.from_numpy(x), torch.from_numpy(2 * x)], [torch.from_numpy(y)])
                        for x, y in zip(xs, ys))
    assert cka.shape == (2, 1)
    expected = reference_cka(xs, ys)
    np.testing.assert_allclose(cka[:, 0].numpy(), [expected, expected], rtol=1e-10)


# -- attention -------------------------------------------------------------------------------------
def test_patch_attention_drops_the_cls_token_and_renormalises():
    """Each patch query keeps its attention among the patches in proportion, whatever share the cls
    key took: logits log(p_ij) + c among patches give back p whatever the cls column and row hold."""
    torch.manual_seed(0)
    p = torch.rand(2, 3, 9, 9) + 0.1
    p = p / p.sum(-1, keepdim=True)                            # a known attention among 9 patches
    logits = torch.zeros(2, 3, 1 + 9, 1 + 9)
    logits[:, :, 1:, 1:] = p.log() + 5.0
    logits[:, :, :, 0] = 40.0                                  # the cls key takes almost everything
    logits[:, :, 0, :] = torch.randn(2, 3, 10)                 # the cls query: not a patch's
    attn = patch_attention(logits)
    assert attn.shape == (2, 3, 9, 9)
    torch.testing.assert_close(attn, p)


def test_attention_distance_of_identity_attention_is_zero():
    identity = torch.eye(16).expand(2, 3, 16, 16)
    assert torch.equal(attention_distance(identity, grid_size=4, patch_size=8), torch.zeros(2, 3))


def test_attention_distance_of_uniform_attention_is_the_mean_pairwise_patch_distance_in_pixels():
    grid, patch = 4, 8
    cells = list(itertools.product(range(grid), range(grid)))
    pairwise = [math.dist(a, b) * patch for a in cells for b in cells]
    uniform = torch.full((2, 3, 16, 16), 1 / 16)
    distance = attention_distance(uniform, grid_size=grid, patch_size=patch)
    torch.testing.assert_close(distance, torch.full((2, 3), sum(pairwise) / len(pairwise)))


def test_entropy_of_uniform_attention_is_log_n():
    uniform = torch.full((2, 3, 16, 16), 1 / 16)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((2, 3), math.log(16)),
                               atol=1e-4, rtol=0)                     # the +1e-6 inside the log


# -- loading ---------------------------------------------------------------------------------------
def trained(norm):
    """A LayerNorm as training leaves it: weight and bias away from the fresh 1 and 0."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return norm


def last_block_tokens(model, imgs):
    """The last block's output, block by block without any final norm: (B, 1 + N, D)."""
    x = model.embed(imgs)
    for block in model.blocks:
        x, _ = block(x)
    return x


def patch_features(tokens):
    """(B, 1 + N, D) -> (B, N*D): cls dropped, flattened per image, as CKA reads a layer."""
    return tokens[:, 1:].flatten(1)


@pytest.fixture
def mae_with_trained_norm(tmp_path):
    torch.manual_seed(0)
    mae = build_mae('vit_tiny', img_size=16, patch_size=4).eval()
    trained(mae.norm)
    torch.save({'model': mae.state_dict()}, tmp_path / 'mae.pth')
    return mae, str(tmp_path / 'mae.pth')


@torch.no_grad()
def test_the_last_layer_of_an_mae_checkpoint_is_a_fresh_layer_norm_of_the_last_blocks_tokens(
        mae_with_trained_norm):
    mae, path = mae_with_trained_norm
    model, _ = build_encoder(path, argparse.Namespace())             # flags only a `random` model reads
    assert model.patch_embed.img_size == 16                           # native size, from the weights
    imgs = torch.randn(4, 3, 16, 16)
    fresh = F.layer_norm(last_block_tokens(mae, imgs), (192,), eps=1e-6)   # weight 1, bias 0
    torch.testing.assert_close(layer_features(model, imgs)[-1], patch_features(fresh))


@torch.no_grad()
def test_last_layer_norm_reads_the_mae_checkpoints_trained_norm(mae_with_trained_norm):
    mae, path = mae_with_trained_norm
    model, _ = build_encoder(path, argparse.Namespace(), last_layer='norm')
    imgs = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(layer_features(model, imgs)[-1],
                               patch_features(mae.norm(last_block_tokens(mae, imgs))))


@pytest.mark.parametrize('last_layer', ['fc_norm', 'norm'])
@torch.no_grad()
def test_a_finetuned_checkpoint_with_fc_norm_uses_its_own_fc_norm(tmp_path, last_layer):
    torch.manual_seed(0)
    finetuned = VisionTransformer(img_size=16, patch_size=4, num_classes=5, global_pool=True).eval()
    trained(finetuned.fc_norm)
    torch.save({'model': finetuned.state_dict()}, tmp_path / 'ft.pth')
    model, _ = build_encoder(str(tmp_path / 'ft.pth'), argparse.Namespace(), last_layer=last_layer)
    imgs = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(layer_features(model, imgs)[-1],
                               patch_features(finetuned.fc_norm(last_block_tokens(finetuned, imgs))))


def test_from_checkpoint_reads_a_mae_lite_checkpoint_with_its_decoder(tmp_path):
    torch.manual_seed(0)
    mae = build_mae('vit_tiny', img_size=16, patch_size=4)
    lite_layout = {f'module.model.{k}': v for k, v in mae.state_dict().items()}     # keys as MAE-Lite saves
    torch.save({'model': lite_layout}, tmp_path / 'lite.pth')
    loaded = MAE.from_checkpoint(tmp_path / 'lite.pth')
    assert loaded.patch_embed.img_size == 16 and loaded.norm_pix_loss
    loaded_state = loaded.state_dict()
    for name, tensor in mae.state_dict().items():
        torch.testing.assert_close(loaded_state[name], tensor)


# -- the script ------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mae_checkpoint(tmp_path_factory):
    """A checkpoint as pretrain_mae.py writes it, of an MAE-Tiny at 16 px with 4-px patches."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('mae') / 'checkpoint.pth'
    args = {'model': 'vit_tiny', 'img_size': 16, 'patch_size': 4, 'norm_pix_loss': True}
    torch.save({'stage': 'pretrain_mae', 'epoch': 0, 'args': args,
                'model': build_mae('vit_tiny', img_size=16, patch_size=4).state_dict()}, path)
    return path


def run_analyze(capsys, *argv):
    """analyze.py in this process (a fresh one per command would re-import torch each time)."""
    analyze_main([str(arg) for arg in argv])
    return capsys.readouterr().out


def test_cka_command_writes_heatmap_json_and_csv(mae_checkpoint, fashion_folder, tmp_path, capsys):
    out = run_analyze(capsys, 'cka', '--a', mae_checkpoint, '--b', 'random', '--patch-size', 4,
                      '--data', fashion_folder, '--num-images', 64, '--batch-size', 32,
                      '--num-workers', 0, '--device', 'cpu', '--output-dir', tmp_path)
    rows = json.loads((tmp_path / 'cka.json').read_text())
    assert len(rows) == 13 and all(len(row) == 13 for row in rows)   # vit_tiny: layers 0..12
    table = list(csv.reader((tmp_path / 'cka.csv').open()))
    assert len(table) == 14 and float(table[1][1]) == pytest.approx(rows[0][0], abs=1e-6)
    assert (tmp_path / 'cka.png').stat().st_size > 0
    assert 'diagonal' in out and str(tmp_path / 'cka.png') in out
    assert "last layer (--last-layer fc_norm) fc_norm on the last block's tokens" in out    # the paper's


def test_attention_command_writes_both_plots_and_tables(mae_checkpoint, fashion_root, tmp_path, capsys):
    out = run_analyze(capsys, 'attention', '--ckpt', mae_checkpoint, '--data', 'fashion_mnist',
                      '--data-root', fashion_root, '--num-images', 64, '--batch-size', 32,
                      '--num-workers', 0, '--device', 'cpu', '--output-dir', tmp_path)
    records = json.loads((tmp_path / 'attention.json').read_text())
    assert len(records) == 12 * 12                                    # layers x heads
    max_distance = math.dist((0, 0), (3, 3)) * 4                      # 4 x 4 grid of 4-px patches
    assert all(0 <= r['distance_px'] <= max_distance and 0 <= r['entropy'] <= math.log(16) for r in records)
    assert len(list(csv.DictReader((tmp_path / 'attention.csv').open()))) == 12 * 12
    for name in ('attention_distance.png', 'attention_entropy.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert 'mean distance per layer (px)' in out


def test_reconstruct_command_draws_the_pretraining_figure(mae_checkpoint, fashion_folder, tmp_path, capsys):
    out = run_analyze(capsys, 'reconstruct', '--ckpt', mae_checkpoint, '--data', fashion_folder,
                      '--num-images', 3, '--device', 'cpu', '--output-dir', tmp_path)
    assert (tmp_path / 'reconstruction.png').stat().st_size > 0
    assert str(tmp_path / 'reconstruction.png') in out


def test_a_junk_checkpoint_is_a_one_line_error(fashion_folder, tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_text('not a checkpoint')
    result = run_script('analyze.py', 'attention', '--ckpt', junk, '--data', fashion_folder,
                        '--device', 'cpu', '--output-dir', tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and 'not a readable PyTorch checkpoint' in result.stderr


def test_reconstruct_scores_every_image_on_masks_fixed_by_the_seed(mae_checkpoint, fashion_folder, tmp_path, capsys):
    run_analyze(capsys, 'reconstruct', '--ckpt', mae_checkpoint, '--data', fashion_folder, '--num-images', 40,
                '--device', 'cpu', '--output-dir', tmp_path)
    scored = json.loads((tmp_path / 'reconstruction.json').read_text())
    assert scored['num_images'] == 40 and scored['mask_ratio'] == 0.75
    model = MAE.from_checkpoint(str(mae_checkpoint)).eval()
    images = analyze.val_images(analyze.build_parser().parse_args(
        ['reconstruct', '--ckpt', str(mae_checkpoint), '--data', str(fashion_folder), '--num-images', '40']), 16)
    generator = torch.Generator().manual_seed(0)            # --seed 0: the same masks, batch by batch
    noise = torch.rand(40, model.patch_embed.num_patches, generator=generator)
    with torch.no_grad():
        loss, _, _ = model(torch.stack([img for img, _ in images]), 0.75, noise)
    assert scored['loss'] == pytest.approx(loss.item(), rel=1e-5)


# -- attention maps --------------------------------------------------------------------------------
def test_cls_attention_is_the_cls_rows_softmax_over_the_patches():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1 + 9, 1 + 9)
    attn = analyze.cls_attention(logits)
    assert attn.shape == (2, 3, 9)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 3))
    z = logits[:, :, 0, 1:].double().numpy()                             # the cls query, patch keys
    expected = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(attn.numpy(), expected, rtol=1e-5)
    logits[:, :, 0, 0] = 50.0                                            # the cls key: cut, so no effect
    torch.testing.assert_close(analyze.cls_attention(logits), attn)


def test_attention_maps_draws_the_figure_and_keeps_the_tables(mae_checkpoint, fashion_folder, tmp_path, capsys):
    common = ['--ckpt', mae_checkpoint, '--data', fashion_folder, '--num-images', 16, '--batch-size', 16,
              '--num-workers', 0, '--device', 'cpu']
    run_analyze(capsys, 'attention', *common, '--output-dir', tmp_path / 'plain')
    out = run_analyze(capsys, 'attention', *common, '--maps', '--layer', 3, '--maps-images', 2,
                      '--output-dir', tmp_path / 'maps')
    assert not (tmp_path / 'plain' / 'attention_maps.png').exists()
    assert (tmp_path / 'maps' / 'attention.json').read_text() == (tmp_path / 'plain' / 'attention.json').read_text()
    with Image.open(tmp_path / 'maps' / 'attention_maps.png') as figure:   # 2 rows of 1 + 12 panels
        assert figure.width > 3 * figure.height
    assert 'block 3 on 2 images' in out


def test_attention_maps_of_a_layer_out_of_range_is_a_one_line_error(mae_checkpoint, fashion_folder, tmp_path):
    result = run_script('analyze.py', 'attention', '--ckpt', mae_checkpoint, '--data', fashion_folder, '--maps',
                        '--layer', 12, '--device', 'cpu', '--output-dir', tmp_path)
    assert_one_line_error(result, '--layer 12 is out of range', '0..11')


# -- embed -----------------------------------------------------------------------------------------
def embed(capsys, out, *argv):
    run_analyze(capsys, 'embed', *argv, '--device', 'cpu', '--output-dir', out)
    return (np.load(out / 'features.npy'), np.load(out / 'labels.npy'),
            (out / 'paths.txt').read_text().splitlines())


@pytest.mark.parametrize('feature', ['cls', 'avg'])
def test_embed_writes_each_files_pooled_eval_view_feature_label_and_path(mae_checkpoint, fashion_folder,
                                                                        tmp_path, capsys, feature):
    features, labels, paths = embed(capsys, tmp_path, '--ckpt', mae_checkpoint, '--data', fashion_folder,
                                    '--feature', feature, '--num-images', 12, '--batch-size', 5,
                                    '--num-workers', 0)
    assert features.shape == (12, 192) and features.dtype == np.float32
    assert labels.shape == (12,) and labels.dtype == np.int64
    val_files = sorted(str(p) for p in (fashion_folder / 'val').glob('*/*.png'))
    assert len(set(paths)) == 12 and set(paths) <= set(val_files)
    classes = sorted(p.name for p in (fashion_folder / 'val').iterdir())
    assert labels.tolist() == [classes.index(Path(p).parent.name) for p in paths]
    view = data.eval_transform(16, stats=data.normalization(str(fashion_folder)))
    imgs = torch.stack([view(data.load_rgb(p)) for p in paths])             # (12, 3, 16, 16), row by row
    mae = MAE.from_checkpoint(str(mae_checkpoint)).eval()
    with torch.no_grad():
        tokens = last_block_tokens(mae, imgs)                                # (12, 1 + 16, 192)
        expected = (mae.norm(tokens)[:, 0] if feature == 'cls'                # the trained norm's cls token
                    else F.layer_norm(tokens[:, 1:].mean(dim=1), (192,), eps=1e-6))   # a fresh fc_norm
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_embed_is_the_same_twice_whatever_the_loader(mae_checkpoint, fashion_folder, tmp_path, capsys):
    argv = ['--ckpt', mae_checkpoint, '--data', fashion_folder, '--split', 'train', '--batch-size', 64]
    embed(capsys, tmp_path / 'a', *argv, '--num-workers', 0)
    embed(capsys, tmp_path / 'b', *argv, '--num-workers', 2)
    for name in ('features.npy', 'labels.npy', 'paths.txt'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes(), name
    assert len((tmp_path / 'a' / 'paths.txt').read_text().splitlines()) == 160      # the whole train split


def test_embed_of_a_named_data_set_lists_each_images_index(mae_checkpoint, fashion_root, tmp_path, capsys):
    _, labels, paths = embed(capsys, tmp_path, '--ckpt', mae_checkpoint, '--data', 'fashion_mnist',
                             '--data-root', fashion_root, '--split', 'train', '--num-images', 20,
                             '--num-workers', 0)
    sample, _ = data.build_dataset('fashion_mnist', fashion_root, train=True, transform=None, subset=20)
    assert [int(p) for p in paths] == sample.indices
    assert labels.tolist() == [sample.dataset.targets[i].item() for i in sample.indices]


def test_embed_of_a_missing_folder_is_a_one_line_error(mae_checkpoint, tmp_path):
    result = run_script('analyze.py', 'embed', '--ckpt', mae_checkpoint, '--data', tmp_path / 'typo',
                        '--device', 'cpu', '--output-dir', tmp_path)
    assert_one_line_error(result, 'neither a known name')


@torch.no_grad()
def test_the_cls_feature_of_a_global_pool_checkpoint_is_a_fresh_norms_cls_token(tmp_path):
    """As linear_probe's --feature cls: a fine-tuned checkpoint without `norm` gets a fresh one, and
    its fc_norm is left out."""
    torch.manual_seed(0)
    finetuned = VisionTransformer(img_size=16, patch_size=4, num_classes=5, global_pool=True).eval()
    trained(finetuned.fc_norm)
    torch.save({'model': finetuned.state_dict()}, tmp_path / 'ft.pth')
    model, _ = build_encoder(str(tmp_path / 'ft.pth'), argparse.Namespace(), last_layer='cls')
    imgs = torch.randn(4, 3, 16, 16)
    fresh = F.layer_norm(last_block_tokens(finetuned, imgs), (192,), eps=1e-6)
    torch.testing.assert_close(model.pool(model.encode(imgs).tokens), fresh[:, 0])
