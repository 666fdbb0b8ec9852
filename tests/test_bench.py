"""bench.py: the FLOPs it counts are the step's (ours and the timm-block yardstick), and one run prints
one table with its command."""
import re

import pytest
import torch

import bench
from conftest import run_script


def mae_step_flops(batch, img_size, patch, dim=192, depth=12, dec_dim=96, dec_depth=1, mask_ratio=0.75):
    """FLOPs of one MAE training step by hand: every matmul of the forward (2 per multiply-add), twice
    that for the backward, except the patch projection, which needs no gradient for its input and
    projects only the visible patches."""
    patches, pixels = (img_size // patch) ** 2, 3 * patch * patch
    visible = 1 + int(patches * (1 - mask_ratio))                 # cls + visible patches

    def blocks(tokens, width, n):     # qkv, proj, fc1, fc2: 12 width^2 per token; q.k^T and attn.v
        return n * (2 * tokens * 12 * width ** 2 + 2 * 2 * tokens ** 2 * width)

    forward = (2 * (visible - 1) * pixels * dim + blocks(visible, dim, depth) + 2 * visible * dim * dec_dim
               + blocks(1 + patches, dec_dim, dec_depth) + 2 * (1 + patches) * dec_dim * pixels)
    return batch * (3 * forward - 2 * (visible - 1) * pixels * dim)


@pytest.mark.parametrize('stage, img_size', [('mae', 32), ('mae', 48), ('timm_ref', 32)])
def test_the_flop_count_is_every_matmul_of_the_mae_step_attention_included(stage, img_size):
    args = type('Args', (), dict(model='vit_tiny', img_size=img_size, patch_size=4, batch_size=2))
    device = torch.device('cpu')
    model, optimizer, loss_of, batch = bench.build_step(stage, args, device)
    counted = bench.count_flops(bench.make_step(model, optimizer, loss_of, False, device), batch)
    assert counted == mae_step_flops(2, img_size, 4)


def table_rows(stdout):
    """{(step, compile, precision): the other cells} of bench.py's markdown table."""
    return {tuple(cells[:3]): cells[3:] for cells in
            ([c.strip() for c in line.strip('|').split('|')] for line in stdout.splitlines()
             if re.match(r'\| [a-z_+]+ \|', line) and not line.startswith('| step '))}


@pytest.mark.ops
def test_one_run_prints_its_command_and_one_table(fashion_root):
    result = run_script('bench.py', '--img-size', 16, '--patch-size', 4, '--batch-size', 8, '--stages',
                        'mae', 'moco', 'data', '--precisions', 'fp32', '--no-compile-modes',
                        '--iters', 3, '--warmup', 1, '--data-root', fashion_root, '--num-workers', 0)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith('$ python ') and '--stages mae moco data' in lines[0]
    rows = table_rows(result.stdout)
    assert list(rows) == [('mae', 'eager', 'fp32'), ('moco', 'eager', 'fp32'), ('dataloader', '-', '-'),
                          ('device_loader', '-', '-'), ('mae+batch', '-', '-'), ('mae+device_loader', '-', '-')]
    assert all(float(cells[0]) > 0 for cells in rows.values())                     # img/s
    assert rows['mae', 'eager', 'fp32'][1] == f"{mae_step_flops(1, 16, 4) / 1e9:.2f}"   # GFLOP/img


def test_rounds_keep_the_median_measurement_whole():
    rounds = [{'img_per_s': 30.0, 'peak_mem_mb': 1}, {'failed': 'killed'}, {'img_per_s': 10.0, 'peak_mem_mb': 2},
              {'img_per_s': 20.0, 'peak_mem_mb': 3}]
    assert bench.median_round(rounds) == {'img_per_s': 20.0, 'peak_mem_mb': 3}
    assert bench.median_round([{'failed': 'no timm'}]) == {'failed': 'no timm'}
