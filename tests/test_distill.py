"""D-MAE (pretrain_distill.py): a frozen teacher, the same visible patches, the attention loss on the
pre-softmax logits, and a real run on Fashion-MNIST images."""
import json
import shutil

import pytest
import torch

import pretrain_distill
import pretrain_mae
from conftest import run_script
from operations import RunError
from pretrain_distill import (DistilledMAE, attention_distillation_loss, build_teacher,
                              hidden_distillation_loss, layer_pairs)
from pretrain_mae import MAE
from vit import CheckpointError, VisionTransformer, encoder_state_dict, load_pretrained, vit


def tiny_student():
    return MAE(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_teacher(depth=3):
    """Deeper, wider and with more heads than the student, as MAE-Base is to MAE-Tiny."""
    return VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=48, depth=depth,
                             num_heads=6)


def distilled(student=None, teacher=None, hidden=''):
    student, teacher = student or tiny_student(), teacher or tiny_teacher()
    return DistilledMAE(student, teacher, layer_pairs('-1', student.depth, teacher.depth),
                        layer_pairs(hidden, student.depth, teacher.depth, hidden=True))


def test_teacher_parameters_never_change_and_get_no_gradients():
    torch.manual_seed(0)
    model = distilled(hidden='-1')
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(pretrain_distill.weight_decay_groups(model, 0.05), lr=1e-2)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16))['loss'].backward()
        optimizer.step()
    assert not model.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert model.student.blocks[0].attn.qkv.weight.grad is not None     # while the student trains


def test_teacher_and_student_see_the_same_visible_patches():
    torch.manual_seed(0)
    model = distilled()
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    seen = {}
    for name in ('student', 'teacher'):
        getattr(model, name).blocks[0].register_forward_pre_hook(
            lambda module, inputs, name=name: seen.__setitem__(name, inputs[0]))
    model(imgs, mask_ratio=0.75, noise=noise)
    visible_idx, _, _ = model.student.random_masking(3, 0.75, noise)                 # (3, 4)
    assert seen['teacher'].shape == (3, 1 + 4, 48)
    assert torch.equal(seen['student'], model.student.embed(imgs, visible_idx))
    assert torch.equal(seen['teacher'], model.teacher.embed(imgs, visible_idx))


def test_attention_loss_is_zero_when_the_student_is_the_teacher_with_identity_adapters():
    torch.manual_seed(0)
    student = tiny_student()
    teacher = VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=4)
    teacher.load_state_dict(encoder_state_dict({'model': student.state_dict()}))
    model = distilled(student, teacher, hidden='0,2')
    with torch.no_grad():
        model.adapters['attn']['1_1'].weight.copy_(torch.eye(4)[:, :, None, None])   # (out, in, 1, 1)
        for adapter in model.adapters['hidden'].values():
            adapter.weight.copy_(torch.eye(32))
    losses = model(torch.randn(4, 3, 16, 16))
    assert losses['attn_loss'].item() < 1e-10 and losses['hidden_loss'].item() < 1e-10
    assert losses['loss'].item() == pytest.approx(losses['mae_loss'].item())
    with torch.no_grad():                             # and a head adapter that mixes heads is not free
        model.adapters['attn']['1_1'].weight.copy_(torch.ones(4, 4, 1, 1) / 4)
    assert model(torch.randn(4, 3, 16, 16))['attn_loss'].item() > 1e-3


def test_distillation_gradients_reach_the_distilled_blocks_attention_only():
    torch.manual_seed(0)
    model = distilled()
    model(torch.randn(4, 3, 16, 16))['distill_loss'].backward()
    last = model.student.blocks[-1]
    assert last.attn.qkv.weight.grad.abs().sum() > 0
    assert model.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0          # through the tokens
    # the loss is on q.k^T before the softmax: the block's value path and MLP do not enter it
    assert last.attn.proj.weight.grad is None and last.mlp.fc1.weight.grad is None
    assert model.student.decoder_pred.weight.grad is None


def per_pair_losses(model, imgs, noise):
    """Every pair's distillation loss on its own: {'attn': [...], 'hidden': [...]}."""
    student, teacher = model.student, model.teacher
    visible_idx, _, _ = student.random_masking(imgs.shape[0], 0.75, noise)
    ours = student.encode(imgs, visible_idx, attn_layers={s for s, _ in model.attn_pairs},
                          return_layers=True)
    theirs = teacher.encode(imgs, visible_idx, attn_layers={t for _, t in model.attn_pairs},
                            return_layers=True)
    adapters = model.adapters
    return {'attn': [attention_distillation_loss(ours.attn_logits[s], theirs.attn_logits[t],
                                                 adapters['attn'][f'{s}_{t}'])
                     for s, t in model.attn_pairs],
            'hidden': [hidden_distillation_loss(ours.layers[s], theirs.layers[t],
                                                adapters['hidden'][f'{s}_{t}'])
                       for s, t in model.hidden_pairs]}


def test_the_papers_single_layer_loss_is_mae_loss_plus_the_attention_loss():
    torch.manual_seed(0)
    model = distilled()
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    with torch.no_grad():
        losses = model(imgs, noise=noise)
        (by_hand,) = per_pair_losses(model, imgs, noise)['attn']
    assert 'hidden_loss' not in losses
    assert torch.equal(losses['attn_loss'], by_hand) and torch.equal(losses['distill_loss'], by_hand)
    assert torch.equal(losses['loss'], losses['mae_loss'] + by_hand)


def test_the_attention_losses_of_several_layers_add_up_under_one_weight():
    torch.manual_seed(0)
    student, teacher = tiny_student(), tiny_teacher()
    model = DistilledMAE(student, teacher, layer_pairs('0,1', 2, 3), alpha=0.5)
    assert model.attn_pairs == [(0, 1), (1, 2)]
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    with torch.no_grad():
        losses = model(imgs, noise=noise)
        first, second = per_pair_losses(model, imgs, noise)['attn']
    torch.testing.assert_close(losses['attn_loss'], first + second)
    torch.testing.assert_close(losses['distill_loss'], 0.5 * (first + second))
    torch.testing.assert_close(losses['loss'], losses['mae_loss'] + 0.5 * (first + second))


def test_the_hidden_weight_scales_only_the_summed_hidden_losses():
    torch.manual_seed(0)
    student, teacher = tiny_student(), tiny_teacher()
    model = DistilledMAE(student, teacher, layer_pairs('-1', 2, 3), layer_pairs('0,-1', 2, 3, hidden=True),
                         alpha=0.5, alpha_hidden=1.0)
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    with torch.no_grad():
        once = model(imgs, noise=noise)
        model.alpha_hidden = 3.0
        thrice = model(imgs, noise=noise)
        by_hand = per_pair_losses(model, imgs, noise)
    hidden = sum(by_hand['hidden'])
    torch.testing.assert_close(thrice['hidden_loss'], hidden)
    for name in ('mae_loss', 'attn_loss', 'hidden_loss'):
        assert torch.equal(once[name], thrice[name])
    torch.testing.assert_close(thrice['distill_loss'], 0.5 * sum(by_hand['attn']) + 3.0 * hidden)
    torch.testing.assert_close(thrice['loss'] - once['loss'], 2.0 * hidden)


def test_single_indices_map_to_the_same_relative_depth():
    assert layer_pairs('-1', 12, 12) == [(11, 11)]
    assert layer_pairs('-1,5', 12, 24) == [(11, 23), (5, 11)]
    assert layer_pairs('3:7', 12, 24) == [(3, 7)]
    assert layer_pairs('0,-1', 12, 24, hidden=True) == [(0, 0), (12, 24)]
    assert layer_pairs('', 12, 12, hidden=True) == []


def strings(*args):
    return [str(a) for a in args]


@pytest.fixture(scope='module')
def tiny_teacher_ckpt(fashion_folder, tmp_path_factory):
    """A ViT-Tiny MAE pre-trained for one short epoch on real images at 16 px, patch 4."""
    out = tmp_path_factory.mktemp('teacher')
    pretrain_mae.main(strings('--data', fashion_folder, '--model', 'vit_tiny', '--img-size', 16,
                              '--patch-size', 4, '--epochs', 1, '--warmup-epochs', 0, '--subset', 64,
                              '--batch-size', 16, '--num-workers', 0, '--output-dir', out))
    return out / 'checkpoint.pth'


def dmae_args(fashion_folder, teacher, out, epochs):
    return strings('--data', fashion_folder, '--model', 'vit_tiny', '--teacher', teacher,
                   '--teacher-model', 'vit_tiny', '--img-size', 16, '--patch-size', 4, '--subset', 64,
                   '--epochs', epochs, '--warmup-epochs', 1, '--batch-size', 16, '--blr', 1.5e-2,
                   '--num-workers', 0, '--output-dir', out)


@pytest.fixture(scope='module')
def dmae_run(fashion_folder, tiny_teacher_ckpt, tmp_path_factory):
    """Three epochs of D-MAE, 4 steps each."""
    out = tmp_path_factory.mktemp('dmae')
    pretrain_distill.main(dmae_args(fashion_folder, tiny_teacher_ckpt, out, 3))
    return out


def test_short_real_run_lowers_both_losses(dmae_run):
    log = [json.loads(line) for line in (dmae_run / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1, 2]
    assert log[-1]['mae_loss'] < log[0]['mae_loss']
    assert log[-1]['distill_loss'] < log[0]['distill_loss']
    assert (dmae_run / 'reconstruction.png').stat().st_size > 0


def test_checkpoint_model_is_the_student_mae_and_loads_for_finetuning(dmae_run):
    ckpt = torch.load(dmae_run / 'checkpoint.pth', weights_only=True)
    assert ckpt['model'].keys() == pretrain_mae.build_mae('vit_tiny', img_size=16, patch_size=4).state_dict().keys()
    assert list(ckpt['adapter']) == ['attn.11_11.weight']               # kept apart
    report = load_pretrained(vit('vit_tiny', img_size=16, patch_size=4, num_classes=4, global_pool=True),
                             dmae_run / 'checkpoint.pth')
    assert sorted(report.new) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']


@pytest.mark.ops
def test_resume_continues_exactly(fashion_folder, tiny_teacher_ckpt, dmae_run, tmp_path):
    pretrain_distill.main(dmae_args(fashion_folder, tiny_teacher_ckpt, tmp_path, 1))
    pretrain_distill.main(strings('--resume', tmp_path / 'checkpoint.pth', '--epochs', 3))
    straight, resumed = (torch.load(run / 'checkpoint.pth', weights_only=True)
                         for run in (dmae_run, tmp_path))
    for part in ('model', 'adapter', 'optimizer'):
        assert straight[part].keys() == resumed[part].keys()
    for part in ('model', 'adapter'):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part])
    assert (tmp_path / 'log.jsonl').read_text().count('\n') == 3


def test_resuming_at_other_distilled_layers_is_refused_and_the_checkpoint_kept(dmae_run, tmp_path):
    ckpt = tmp_path / 'checkpoint.pth'
    shutil.copy(dmae_run / 'checkpoint.pth', ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(RunError, match=r"its adapter does not fit .*attn\.5_5\.weight.*drop the flags"):
        pretrain_distill.main(strings('--resume', ckpt, '--distill-layers', '5,-1', '--output-dir', tmp_path))
    assert ckpt.read_bytes() == before


def test_junk_teacher_checkpoint_is_one_line_error(fashion_folder, tmp_path):
    junk = tmp_path / 'teacher.pth'
    junk.write_text('not a checkpoint')
    result = run_script('pretrain_distill.py', *dmae_args(fashion_folder, junk, tmp_path / 'out', 1))
    assert result.returncode == 2
    assert result.stderr.strip().count('\n') == 0 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: --teacher:') and 'teacher.pth' in result.stderr


def test_teacher_of_another_size_or_patch_size_is_refused(tiny_teacher_ckpt):
    with pytest.raises(CheckpointError, match='dim=384.*check --teacher-model'):
        build_teacher('vit_small', tiny_teacher_ckpt, img_size=16, patch_size=4)
    with pytest.raises(CheckpointError, match='patch_embed.proj.weight'):
        build_teacher('vit_tiny', tiny_teacher_ckpt, img_size=16, patch_size=8)
    with pytest.raises(CheckpointError, match='not found'):
        build_teacher('vit_small', tiny_teacher_ckpt.parent / 'missing.pth', img_size=16, patch_size=4)


def test_init_starts_the_student_from_an_mae_with_its_decoder_on_unlabelled_images(
        unlabelled_folder, tiny_teacher_ckpt, tmp_path, capsys):
    """Continued pre-training with D-MAE on a folder without classes: --init loads the student's
    encoder and decoder (pretrain_mae.init_mae), and the figure shows training images."""
    pretrain_distill.main([*dmae_args(unlabelled_folder, tiny_teacher_ckpt, tmp_path, 1),
                           '--init', str(tiny_teacher_ckpt)])
    out = capsys.readouterr().out
    assert f"init from {tiny_teacher_ckpt}: " in out and 'decoder: loaded (19 tensors)' in out
    assert (tmp_path / 'reconstruction.png').stat().st_size > 0
