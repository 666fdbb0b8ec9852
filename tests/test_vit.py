"""vit.py: timm parity, attention logits, visible-subset encoding, checkpoint loading."""
import math

import pytest
import timm
import torch

from vit import CheckpointError, load_pretrained, read_checkpoint, sincos_pos_embed, vit


def timm_vit(global_pool, img_size=224, patch_size=16, num_classes=1000):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=192, depth=12, num_heads=12,
        num_classes=num_classes, global_pool='avg' if global_pool else 'token')


def test_vit_tiny_has_timms_parameter_count():
    assert sum(p.numel() for p in vit('vit_tiny', num_classes=1000).parameters()) == 5_717_416


@pytest.mark.parametrize('global_pool', [False, True])
def test_timm_weights_load_strictly_and_give_the_same_outputs(global_pool):
    reference = timm_vit(global_pool, img_size=64).eval()
    ours = vit('vit_tiny', img_size=64, num_classes=1000, global_pool=global_pool).eval()
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(imgs), reference(imgs), rtol=1e-5, atol=1e-5)


def test_global_pool_model_has_fc_norm_and_no_final_norm():
    keys = vit('vit_tiny', global_pool=True).state_dict()
    assert 'fc_norm.weight' in keys and 'norm.weight' not in keys


def test_asking_for_attention_logits_changes_nothing_else():
    model = vit('vit_tiny', img_size=32, patch_size=8, num_classes=0).eval()
    imgs = torch.randn(2, 3, 32, 32)
    plain = model.encode(imgs)
    with_logits = model.encode(imgs, attn_layers=(0, 11))
    assert plain.attn_logits == {} and sorted(with_logits.attn_logits) == [0, 11]
    assert with_logits.attn_logits[11].shape == (2, 12, 17, 17)     # (B, heads, 1 + 16, 1 + 16)
    torch.testing.assert_close(with_logits.tokens, plain.tokens, rtol=1e-5, atol=1e-5)


def test_attention_logits_are_scaled_query_key_products():
    model = vit('vit_tiny', img_size=32, patch_size=8, num_classes=0).eval()
    imgs = torch.randn(1, 3, 32, 32)
    first = model.blocks[0]
    x = first.norm1(model.embed(imgs))                              # (1, 17, 192)
    q, k, _ = first.attn.qkv(x).reshape(1, 17, 3, 12, 16).permute(2, 0, 3, 1, 4)
    expected = q @ k.transpose(-2, -1) / math.sqrt(16)
    torch.testing.assert_close(model.encode(imgs, attn_layers=(0,)).attn_logits[0], expected)


def test_encoding_visible_patches_is_encoding_those_patches_alone():
    """The encoder on a permuted set of patches equals the encoder on all of them, permuted:
    self-attention is permutation-equivariant, and a visible patch gets the token the conv gives it
    (projected on its own as a Linear) plus its own position's embedding."""
    model = vit('vit_tiny', img_size=32, patch_size=8, num_classes=0).eval()
    imgs = torch.randn(2, 3, 32, 32)
    full = model.encode(imgs).tokens                                # (2, 17, 192)
    order = torch.stack([torch.randperm(16) for _ in range(2)])     # (2, 16)
    permuted = model.encode(imgs, visible_idx=order).tokens
    torch.testing.assert_close(permuted[:, 0], full[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(permuted[:, 1:], torch.gather(full[:, 1:], 1, order[..., None].expand(-1, -1, 192)),
                               rtol=1e-4, atol=1e-4)
    assert model.encode(imgs, visible_idx=order[:, :4]).tokens.shape == (2, 5, 192)


def test_layer_features_are_block_inputs_after_norm1_and_the_final_output():
    model = vit('vit_tiny', img_size=32, patch_size=8, num_classes=0).eval()
    imgs = torch.randn(2, 3, 32, 32)
    out = model.encode(imgs, return_layers=True)
    assert len(out.layers) == 13
    torch.testing.assert_close(out.layers[0], model.blocks[0].norm1(model.embed(imgs)))
    torch.testing.assert_close(out.layers[-1], out.tokens)


def test_sincos_pos_embed_encodes_column_then_row():
    emb = sincos_pos_embed(16, grid_size=3)                         # (1 + 9, 16)
    assert emb.shape == (10, 16) and emb[0].abs().sum() == 0        # cls row is zero
    omega = 1.0 / 10000 ** (torch.arange(4) / 4.0)
    row, col = 1, 2                                                 # patch index 1 * 3 + 2 = 5
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(emb[1 + 5], expected)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match='not divisible'):
        vit('vit_tiny', img_size=30, patch_size=4)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture
def trained_like():
    torch.manual_seed(0)
    return vit('vit_tiny', img_size=32, patch_size=8, num_classes=0)


@pytest.mark.parametrize('layout', ['plain', 'official_mae', 'mae_lite', 'ddp', 'moco'])
def test_every_known_checkpoint_layout_loads(layout, trained_like, tmp_path):
    sd = trained_like.state_dict()
    decoder = {'decoder_embed.weight': torch.zeros(96, 192), 'mask_token': torch.zeros(1, 1, 96)}
    saved = {
        'plain': sd,
        'official_mae': {'model': {**sd, **decoder}},
        'mae_lite': {'model': {f'module.model.{k}': v for k, v in {**sd, **decoder}.items()}},
        'ddp': {f'module.{k}': v for k, v in sd.items()},
        'moco': {'state_dict': {**{f'module.base_encoder.{k}': v for k, v in sd.items()},
                                **{f'module.momentum_encoder.{k}': v for k, v in sd.items()}}},
    }[layout]
    torch.save(saved, tmp_path / 'ckpt.pth')
    fresh = vit('vit_tiny', img_size=32, patch_size=8, num_classes=10, global_pool=True)
    report = load_pretrained(fresh, tmp_path / 'ckpt.pth')
    assert sorted(report.new) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    torch.testing.assert_close(fresh.blocks[5].attn.qkv.weight, trained_like.blocks[5].attn.qkv.weight)
    torch.testing.assert_close(fresh.pos_embed, trained_like.pos_embed)


def test_pos_embed_is_resized_when_the_grid_differs(trained_like, tmp_path):
    torch.save({'model': trained_like.state_dict()}, tmp_path / 'ckpt.pth')
    bigger = vit('vit_tiny', img_size=64, patch_size=8, num_classes=0)     # grid 4 -> 8
    load_pretrained(bigger, tmp_path / 'ckpt.pth')
    assert bigger.pos_embed.shape == (1, 65, 192)
    torch.testing.assert_close(bigger.pos_embed[:, 0], trained_like.pos_embed[:, 0])
    # bicubic upsampling keeps the mean level of the grid
    assert abs(bigger.pos_embed[0, 1:].mean() - trained_like.pos_embed[0, 1:].mean()) < 0.01


def test_a_checkpoint_of_another_model_size_is_refused_with_the_mismatches(tmp_path):
    torch.save({'model': vit('vit_small', img_size=32, patch_size=8, num_classes=0).state_dict()},
               tmp_path / 'small.pth')
    with pytest.raises(CheckpointError, match=r'cls_token \(1, 1, 384\) vs model \(1, 1, 192\).*150 wrong shapes'):
        load_pretrained(vit('vit_tiny', img_size=32, patch_size=8, num_classes=0), tmp_path / 'small.pth')


def test_junk_and_missing_files_are_refused_in_one_line(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'this is not a checkpoint' * 10)
    for path, message in ((junk, 'not a readable PyTorch checkpoint'),
                          (tmp_path / 'absent.pth', 'checkpoint not found')):
        with pytest.raises(CheckpointError, match=message) as error:
            read_checkpoint(path)
        assert '\n' not in str(error.value)


class Payload:
    """An arbitrary object: torch.load with weights_only=True must refuse to unpickle it."""


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    torch.save({'model': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        read_checkpoint(tmp_path / 'evil.pth')
