"""pretrain_moco.py: MoCo v3's pieces (the loss, the momentum, the frozen patch projection, the views),
and the training script as a user runs it."""
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import default_collate

import finetune
import pretrain_moco
from conftest import ROOT, read_log, run_script
from data import normalization
from pretrain_moco import (MoCo, contrastive_loss, gather_keys, moco_optimizer, moco_views, moco_vit,
                           momentum_at, step_momentum)
from vit import load_pretrained, sincos_pos_embed, vit


def small_moco():
    return MoCo(moco_vit('vit_tiny', img_size=16, patch_size=4), mlp_dim=64, out_dim=32)


# -- the loss ------------------------------------------------------------------------------------
def test_contrastive_loss_matches_a_hand_computed_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    T = 0.5                                # logits q k^T / T: [[2, 1.2], [0, 1.6]]; positives on the diagonal
    row_0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    row_1 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))
    expected = 2 * T * (row_0 + row_1) / 2
    assert contrastive_loss(q, k, T).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(3 * q, 2 * k, T).item() == pytest.approx(expected, rel=1e-6)   # normalised first


def test_contrastive_loss_finds_the_positives_of_process_rank_in_the_gathered_keys():
    torch.manual_seed(0)
    q, k = torch.randn(2, 8), torch.randn(4, 8)        # 2 queries; keys of 2 processes x 2 images
    torch.testing.assert_close(contrastive_loss(q, k, 0.2, rank=1),
                               contrastive_loss(q, k[[2, 3, 0, 1]], 0.2, rank=0))


def loss_of_one_process(rank, queries, keys, folder):
    """One of 2 gloo processes, holding half of the global batch: its gathered keys and its loss."""
    dist.init_process_group('gloo', init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    mine = slice(rank * len(queries) // 2, (rank + 1) * len(queries) // 2)
    gathered = gather_keys(keys[mine])
    torch.save({'keys': gathered, 'loss': contrastive_loss(queries[mine], gathered, 0.2, rank)},
               folder / f'{rank}.pth')
    dist.destroy_process_group()


def test_two_processes_gather_all_keys_and_average_to_the_loss_of_one_process(tmp_path):
    torch.manual_seed(0)
    queries, keys = torch.randn(8, 16), torch.randn(8, 16)              # a global batch of 8
    torch.multiprocessing.spawn(loss_of_one_process, args=(queries, keys, tmp_path), nprocs=2)
    results = [torch.load(tmp_path / f'{rank}.pth', weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(result['keys'], keys) for result in results)
    torch.testing.assert_close((results[0]['loss'] + results[1]['loss']) / 2,
                               contrastive_loss(queries, keys, 0.2))


# -- the momentum branch -------------------------------------------------------------------------
def test_one_momentum_update_is_one_exact_ema_step():
    torch.manual_seed(0)
    model = small_moco()
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))                  # the base moves away from its copy
    base = [p.clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    before = [p.clone() for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]]
    model.update_momentum(0.9)
    after = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    assert len(after) == len(base) == len(before)
    for theta_q, old, new in zip(base, before, after):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta_q)


def test_momentum_rises_from_its_base_to_one_by_a_half_cosine():
    assert momentum_at(0, 0.99, 400) == pytest.approx(0.99)
    assert momentum_at(200, 0.99, 400) == pytest.approx(0.995)                     # halfway
    assert momentum_at(100, 0.99, 400) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert momentum_at(400, 0.99, 400) == pytest.approx(1.0)
    steps = [momentum_at(e / 10, 0.99, 4) for e in range(41)]
    assert steps == sorted(steps)


def test_accumulated_micro_batches_move_the_momentum_branch_as_one_update():
    torch.manual_seed(0)
    accumulated, once = small_moco(), small_moco()
    once.load_state_dict(accumulated.state_dict())
    with torch.no_grad():
        for model in (accumulated, once):
            for p in model.encoder.parameters():
                p.add_(1.0)
    m = step_momentum(1.5, base_momentum=0.99, epochs=4, accum_iter=2)
    accumulated.update_momentum(m)
    accumulated.update_momentum(m)                        # the 2 micro-batches of one optimizer step
    once.update_momentum(momentum_at(1.5, 0.99, 4))
    for a, b in zip(accumulated.momentum_encoder.parameters(), once.momentum_encoder.parameters()):
        torch.testing.assert_close(a, b)


def test_the_momentum_branch_gets_no_gradient():
    torch.manual_seed(0)
    model = small_moco()
    model(torch.randn(4, 2, 3, 16, 16), 0.99).backward()
    assert all(p.grad is None and not p.requires_grad
               for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()])
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.predictor[0].weight.grad is not None


# -- the encoder and the optimizer ---------------------------------------------------------------
def test_the_encoder_feature_is_the_cls_token_after_the_final_norm():
    encoder = moco_vit('vit_tiny', img_size=16, patch_size=4)
    imgs = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder(imgs), encoder.encode(imgs).tokens[:, 0])    # (2, 192)
    assert not hasattr(encoder, 'fc_norm') and isinstance(encoder.head, torch.nn.Identity)


def test_the_position_embedding_is_the_fixed_sincos_table():
    encoder = moco_vit('vit_tiny', img_size=16, patch_size=4)
    assert not encoder.pos_embed.requires_grad
    torch.testing.assert_close(encoder.pos_embed, sincos_pos_embed(192, 4)[None])


@pytest.mark.parametrize('stop_grad_conv1', [True, False])
def test_stop_grad_conv1_freezes_the_patch_projection_and_only_it(stop_grad_conv1):
    torch.manual_seed(0)
    model = MoCo(moco_vit('vit_tiny', img_size=16, patch_size=4, stop_grad_conv1=stop_grad_conv1),
                 mlp_dim=64, out_dim=32)
    proj = model.encoder.patch_embed.proj
    before = proj.weight.clone(), proj.bias.clone()
    qkv = model.encoder.blocks[0].attn.qkv.weight.clone()
    optimizer = moco_optimizer(model, lr=1e-3, weight_decay=0.1, device=torch.device('cpu'))
    for _ in range(2):
        model(torch.randn(4, 2, 3, 16, 16), 0.99).backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = torch.equal(proj.weight, before[0]) and torch.equal(proj.bias, before[1])
    assert unchanged == stop_grad_conv1          # MAE-Lite's ViT-Tiny recipe (the default) trains it
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.weight, qkv)          # the rest trains


def test_the_patch_projection_trains_by_default_as_mae_lite_trains_vit_tiny():
    assert pretrain_moco.build_parser().parse_args([]).stop_grad_conv1 is False


def test_weight_decay_covers_every_trained_parameter_norms_and_biases_included():
    for stop_grad_conv1 in (False, True):
        model = MoCo(moco_vit('vit_tiny', 16, 4, stop_grad_conv1), mlp_dim=64, out_dim=32)
        optimizer = moco_optimizer(model, lr=1e-3, weight_decay=0.1, device=torch.device('cpu'))
        [group] = optimizer.param_groups
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        assert group['weight_decay'] == 0.1 and group['betas'] == (0.9, 0.999)
        assert {id(p) for p in group['params']} == trained
        assert id(model.encoder.norm.bias) in trained
        assert (id(model.encoder.patch_embed.proj.weight) in trained) == (not stop_grad_conv1)


# -- the views -----------------------------------------------------------------------------------
def test_the_two_views_of_an_image_differ():
    torch.manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy())    # grayscale
    views = moco_views(16, normalization('fashion_mnist'))(img)
    assert views.shape == (2, 3, 16, 16) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1])


def test_each_batch_row_holds_two_views_of_its_own_image():
    """Images whose content names them: a grey top half on black (label 0) or the reverse (label 1).
    With the whole image as the crop (min_scale 1), every colour op, blur, solarize and flip keep the
    brighter half the brighter one."""
    torch.manual_seed(0)
    views = moco_views(16, normalization('fashion_mnist'), min_scale=1.0)
    samples = []
    for i in range(8):
        pixels = torch.zeros(16, 16, dtype=torch.uint8)
        pixels[:8] = 100
        label = i % 2
        samples.append((views(Image.fromarray((pixels.flip(0) if label else pixels).numpy())), label))
    batch, labels = default_collate(samples)
    assert batch.shape == (8, 2, 3, 16, 16)                              # (B, 2, 3, H, W)
    top, bottom = batch[..., :8, :].mean(dim=(2, 3, 4)), batch[..., 8:, :].mean(dim=(2, 3, 4))   # (B, 2)
    assert torch.equal(top < bottom, labels[:, None].bool().expand(-1, 2))


# -- loading ---------------------------------------------------------------------------------------
def test_an_official_moco_v3_checkpoint_loads_its_base_encoder(tmp_path):
    """The official layout: {'state_dict': {'module.base_encoder.*' (its head is the projector),
    'module.momentum_encoder.*', 'module.predictor.*'}}."""
    torch.manual_seed(0)
    encoder = moco_vit('vit_tiny', img_size=16, patch_size=4)
    state = {f'module.base_encoder.{k}': v for k, v in encoder.state_dict().items()}
    state |= {f'module.momentum_encoder.{k}': torch.zeros_like(v) for k, v in encoder.state_dict().items()}
    state |= {'module.base_encoder.head.0.weight': torch.zeros(64, 192),
              'module.predictor.0.weight': torch.zeros(64, 32)}
    torch.save({'epoch': 300, 'state_dict': state}, tmp_path / 'official.pth.tar')
    model = vit('vit_tiny', img_size=16, patch_size=4, num_classes=4)
    report = load_pretrained(model, tmp_path / 'official.pth.tar')
    assert sorted(report.new) == ['head.bias', 'head.weight'] and report.ignored == ['head.0.weight']
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, encoder.blocks[3].mlp.fc1.weight)


# -- the script ----------------------------------------------------------------------------------
QUICK = ['--data', 'fashion_mnist', '--img-size', '16', '--patch-size', '8', '--batch-size', '16',
         '--subset', '64', '--num-workers', '0', '--mlp-dim', '256', '--out-dim', '64',
         '--min-crop-scale', '0.5', '--warmup-epochs', '1', '--blr', '3e-2', '--epochs', '3']


@pytest.fixture(scope='module')
def moco_run(fashion_root, tmp_path_factory):
    """A short real MoCo run on 64 Fashion-MNIST images at 16 px (4 patches), 3 epochs of 4 steps:
    -> (its flags, its output folder)."""
    args = [*QUICK, '--data-root', fashion_root]
    out = tmp_path_factory.mktemp('moco') / 'whole'
    result = run_script('pretrain_moco.py', *args, '--output-dir', out)
    assert result.returncode == 0, result.stderr
    assert 'effective batch 16' in result.stdout and 'device cpu' in result.stdout
    return args, out


def test_a_short_real_run_lowers_the_loss_and_writes_its_outputs(moco_run):
    _, out = moco_run
    log = read_log(out)
    assert [line['epoch'] for line in log] == [0, 1, 2]
    assert log[-1]['loss'] < 0.9 * log[0]['loss'], [line['loss'] for line in log]
    assert (out / 'config.yaml').exists()
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['stage'] == 'pretrain_moco' and ckpt['epoch'] == 2
    model = MoCo(moco_vit('vit_tiny', img_size=16, patch_size=8), mlp_dim=256, out_dim=64)
    for name, part in model.parts().items():
        part.load_state_dict(ckpt[name], strict=True)


def stop_after_the_first_checkpoint(args, out):
    """Start pretrain_moco.py and SIGKILL it as soon as its epoch-0 checkpoint is written; -> the
    epoch of the checkpoint it left."""
    process = subprocess.Popen([sys.executable, str(ROOT / 'pretrain_moco.py'), *map(str, args),
                                '--output-dir', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / 'checkpoint.pth').exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    return torch.load(out / 'checkpoint.pth', weights_only=True)['epoch']


@pytest.mark.ops
def test_a_killed_run_resumes_to_the_same_losses_and_weights(moco_run, tmp_path):
    args, whole = moco_run
    broken = tmp_path / 'broken'
    assert stop_after_the_first_checkpoint([*args, '--resume', 'auto'], broken) < 2   # killed before the end
    resumed = run_script('pretrain_moco.py', *args, '--resume', 'auto', '--output-dir', broken)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume auto: continuing from {broken / 'checkpoint.pth'}" in resumed.stdout
    timing = ('img_per_s', 'epoch_time_s')
    assert ([{k: v for k, v in line.items() if k not in timing} for line in read_log(broken)]
            == [{k: v for k, v in line.items() if k not in timing} for line in read_log(whole)])
    a, b = (torch.load(out / 'checkpoint.pth', weights_only=True) for out in (whole, broken))
    for part in ('model', 'projector', 'predictor', 'momentum_encoder', 'momentum_projector'):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_the_checkpoint_fine_tunes_with_every_encoder_tensor_loaded(moco_run, fashion_folder, tmp_path, capsys):
    _, out = moco_run
    finetune.main([str(a) for a in ('--data', fashion_folder, '--img-size', '16', '--patch-size', '8',
                                    '--batch-size', '16', '--subset', '32', '--val-subset', '16', '--num-workers',
                                    '0', '--epochs', '1', '--rand-aug', 'none', '--mixup', '0', '--init',
                                    out / 'checkpoint.pth', '--output-dir', tmp_path / 'ft')])
    stdout = capsys.readouterr().out
    # every encoder tensor but the final norm, which the global-pool head replaces by a fresh fc_norm
    encoder_tensors = len(torch.load(out / 'checkpoint.pth', weights_only=True)['model'])
    assert (f"init from {out / 'checkpoint.pth'}: {encoder_tensors - 2} tensors loaded; "
            f"new: fc_norm.weight, fc_norm.bias, head.weight, head.bias; ignored: norm.weight, norm.bias"
            in stdout.splitlines()), stdout
