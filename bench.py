"""Speed of one training step of each stage on this device, and of the data path.

For each stage (MAE, D-MAE, MoCo v3, fine-tune, a ResNet-18 from scratch, linear probe) and each of
eager / torch.compile x fp32 / bf16 autocast: images per second, peak memory, the achieved GFLOP/s
(FLOPs of forward + backward counted with torch.utils.flop_counter, attention included) and its share
of the device's peak (on CPU a 2048 x 2048 matmul measured in the row's precision; on CUDA the datasheet dense bf16 peak, i.e. MFU).
Then the data path alone (the per-image DataLoader and the in-memory --data-on-device loader) and the
MAE step fed by the in-memory loader vs by one pre-made batch. The `timm_ref` row is the yardstick:
the same MAE with every transformer block replaced by timm's `Block` (needs `pip install timm`; not a
dependency of the project). Each row runs in a fresh process, so peak memory and compile caches do
not leak between rows; `--rounds N` measures every row N times, round-robin, so that the machine's
slow drift hits every row alike, and keeps the median round. A step's loss is the stage's own (the
MAE's, DistilledMAE's and MoCo's forward, finetune.classification_loss, linear_probe.probe_losses).
Prints one markdown table and its command.

    python bench.py                                    # every stage: MAE-Tiny at 224 px, batch 32
    python bench.py --stages timm_ref mae --precisions fp32 --rounds 5    # the eager vs compile question
    python bench.py --img-size 32 --patch-size 4 --batch-size 128 --stages mae data   # quick recipe
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn

from vit import SIZES

# dense bf16 tensor-core peaks from the datasheets, TFLOP/s; matched against the device name
CUDA_BF16_PEAK_TFLOPS = {'H100': 989, 'A100': 312, 'L40S': 362, 'L4': 121, 'A10': 125,
                         'RTX 4090': 165, 'RTX 3090': 71, 'V100': 125, 'T4': 65}
STAGES = ('timm_ref', 'mae', 'dmae', 'moco', 'finetune', 'convnet', 'probe', 'data')
CHUNKS = 5      # timed chunks per row; the median chunk counts


# --------------------------------------------------------------------------------------------------
# One training step per stage, on a fixed random batch
# --------------------------------------------------------------------------------------------------
class TimmBlock(nn.Module):
    """timm's transformer Block behind our Block's interface, for the `timm_ref` yardstick."""

    def __init__(self, dim, num_heads):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.block = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)

    def forward(self, x, return_attn_logits=False):
        return self.block(x), None


def with_timm_blocks(mae):
    """The same MAE, every encoder and decoder block rebuilt from timm's Block."""
    decoder_dim, decoder_heads = mae.decoder_embed.out_features, mae.decoder_blocks[0].attn.num_heads
    mae.blocks = nn.ModuleList(TimmBlock(mae.embed_dim, mae.num_heads) for _ in mae.blocks)
    mae.decoder_blocks = nn.ModuleList(TimmBlock(decoder_dim, decoder_heads) for _ in mae.decoder_blocks)
    return mae


def build_step(stage, args, device):
    """-> (the trainable module, its optimizer, loss_of(imgs, labels), a batch (imgs, labels))."""
    from finetune import classification_loss, convnet, layer_decay_groups
    from linear_probe import LARS, probe_head, probe_losses
    from pretrain_distill import DistilledMAE
    from pretrain_mae import build_mae
    from pretrain_moco import MoCo, moco_optimizer, moco_vit
    from training import adamw, weight_decay_groups
    from vit import vit

    size = dict(img_size=args.img_size, patch_size=args.patch_size)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    if stage in ('mae', 'timm_ref'):
        model = build_mae(args.model, **size)
        model = (with_timm_blocks(model) if stage == 'timm_ref' else model).to(device)
        optimizer = adamw(weight_decay_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
        def loss_of(imgs, labels):
            return model(imgs, mask_ratio=0.75)[0]
    elif stage == 'dmae':
        student = build_mae(args.model, **size)
        teacher = vit(args.teacher_model, num_classes=0, **size)
        model = DistilledMAE(student, teacher, attn_pairs=[(student.depth - 1, teacher.depth - 1)]).to(device)
        optimizer = adamw(weight_decay_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
        def loss_of(imgs, labels):
            return model(imgs, mask_ratio=0.75)['loss']
    elif stage == 'moco':     # two views of each image: the batch is (B, 2, 3, H, W)
        model = MoCo(moco_vit(args.model, args.img_size, args.patch_size)).to(device)
        optimizer = moco_optimizer(model, 1e-4, 0.1, device)
        def loss_of(views, labels):
            return model(views, momentum=0.99)
        imgs = torch.randn(args.batch_size, 2, 3, args.img_size, args.img_size, device=device)
    elif stage in ('finetune', 'convnet'):      # convnet: a ResNet-18, trained from scratch
        if stage == 'convnet':
            model = convnet('resnet18', 1000).to(device)
            optimizer = adamw(weight_decay_groups(model, 0.05), 1e-4, (0.9, 0.999), device)
        else:
            model = vit(args.model, num_classes=1000, global_pool=True, **size).to(device)
            optimizer = adamw(layer_decay_groups(model, 0.05, 0.85), 1e-4, (0.9, 0.999), device)
        def loss_of(imgs, labels):
            return classification_loss(model, imgs, labels, batch_mixing=None, smoothing=0.0)
    elif stage == 'probe':
        model = vit(args.model, num_classes=1000, **size).to(device)
        model.head = probe_head(model.embed_dim, 1000).to(device)
        model.requires_grad_(False).eval()
        model.head.requires_grad_(True).train()
        optimizer = LARS(model.head.parameters(), lr=0.1)
        def loss_of(imgs, labels):
            return probe_losses(model, imgs, labels)['loss']
    else:
        raise ValueError(stage)
    return model, optimizer, loss_of, (imgs, labels)


def make_step(model, optimizer, loss_of, amp, device):
    def step(imgs, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(imgs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def count_flops(step, batch):
    """FLOPs of one forward + backward, with attention run by the math kernel so it is counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        step(*batch)
    return counter.get_total_flops()


def seconds_per_call(fn, iters, warmup, device, chunks=CHUNKS):
    """Mean seconds per call within each of `chunks` runs of iters / chunks calls; the median chunk,
    so that a one-off stall (another process, a page fault) does not move the figure."""
    for _ in range(warmup):
        fn()
    times = [time_chunk(fn, max(1, iters // chunks), device) for _ in range(chunks)]
    return median(times)


def time_chunk(fn, calls, device):
    """Mean seconds per call of `calls` calls in a row."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def median(values):
    return sorted(values)[len(values) // 2]


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_flops(device):
    """-> ({precision: FLOP/s, or None}, where the peaks come from). CPU: a measured 2048 x 2048
    matmul in each precision; CUDA: the datasheet dense bf16 peak for both (the usual MFU), if the
    device is known."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        known = [v * 1e12 for k, v in CUDA_BF16_PEAK_TFLOPS.items() if k in name]
        return dict.fromkeys(('fp32', 'bf16'), known[0] if known else None), f"{name} datasheet bf16"
    peaks = {}
    for precision, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        peaks[precision] = 2 * 2048 ** 3 / seconds_per_call(lambda: a @ b, iters=20, warmup=3, device=device)
    return peaks, 'measured 2048^2 matmuls'


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # whole process, incl. torch


# --------------------------------------------------------------------------------------------------
# Measuring: one row in its own process
# --------------------------------------------------------------------------------------------------
def measure_stage(stage, compile, amp, args, device):
    """img/s and GFLOP/s of one training step on the fixed batch, warmed up (and compiled) first."""
    model, optimizer, loss_of, batch = build_step(stage, args, device)
    flops = count_flops(make_step(model, optimizer, loss_of, False, device), batch)
    step = make_step(torch.compile(model) if compile else model, optimizer, loss_of, amp, device)
    seconds = seconds_per_call(lambda: step(*batch), args.iters, args.warmup + 3 * compile, device)
    return {'img_per_s': args.batch_size / seconds, 'gflop_per_s': flops / seconds / 1e9,
            'gflop_per_img': flops / args.batch_size / 1e9}


def measure_data(kind, args, device):
    """The data path alone (img/s of batches), or the MAE step fed by the in-memory loader."""
    from data import Augmentation, build_dataset, build_loader, per_image_transform
    from data_in_memory import in_memory_loader
    calls = 1 + args.warmup + CHUNKS * max(1, args.iters // CHUNKS)  # first batch, warm-up, timed chunks
    subset = args.batch_size * (calls + 1)                        # + 1: training drops a partial batch
    augmentation = Augmentation()                                 # pre-training's: crop + flip
    if kind == 'dataloader':
        dataset, _ = build_dataset(args.data, args.data_root, True,
                                   per_image_transform(augmentation, args.img_size), subset=subset)
        loader = build_loader(dataset, args.batch_size, True, args.num_workers, device)
    else:
        loader, _, _ = in_memory_loader(args.data, args.data_root, True, args.img_size, args.batch_size,
                                        augmentation, subset=subset, device=device)
    batches = iter(loader)
    next(batches)                                             # workers started, first batch made
    if kind != 'mae+device_loader':
        seconds = seconds_per_call(lambda: next(batches)[0].to(device), args.iters, 1, device)
        return {'img_per_s': args.batch_size / seconds}
    model, optimizer, loss_of, _ = build_step('mae', args, device)
    step = make_step(model, optimizer, loss_of, args.amp_default, device)
    seconds = seconds_per_call(lambda: step(*next(batches)), args.iters, args.warmup, device)
    return {'img_per_s': args.batch_size / seconds}


def run_row(args):
    device = torch.device(args.device)
    stage, compile, amp = args.row.split(':')
    compile, amp = compile == 'compile', amp == 'bf16'
    if stage in ('dataloader', 'device_loader', 'mae+device_loader', 'mae+batch'):
        if stage == 'mae+batch':
            result = measure_stage('mae', False, args.amp_default, args, device)
        else:
            result = measure_data(stage, args, device)
    else:
        result = measure_stage(stage, compile, amp, args, device)
    result['peak_mem_mb'] = peak_memory_mb(device)
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def rows_for(args):
    rows = []
    for stage in args.stages:
        if stage == 'data':
            rows += ['dataloader::', 'device_loader::', 'mae+batch::', 'mae+device_loader::']
            continue
        compiles = ('eager', 'compile') if args.compile_modes and stage != 'timm_ref' else ('eager',)
        for compile in compiles:
            for amp in args.precisions:
                rows.append(f'{stage}:{compile}:{amp}')
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_tiny', choices=list(SIZES))
    parser.add_argument('--teacher-model', default='vit_base', choices=list(SIZES),
                        help='D-MAE teacher (paper: vit_base)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--patch-size', type=int, default=16)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES)
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'],
                        help='fp32, and bf16 autocast (slow on CPUs without bf16 units)')
    parser.add_argument('--compile-modes', action=argparse.BooleanOptionalAction, default=True,
                        help='also measure with torch.compile')
    parser.add_argument('--iters', type=int, default=20,
                        help='timed steps per row (5 chunks; the median chunk counts)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first (+3 when compiled)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='measure every row this many times, round-robin, and show the median round '
                             '(to compare rows on a machine whose speed drifts)')
    parser.add_argument('--data', default='fashion_mnist', help='data set of the data-path rows')
    parser.add_argument('--data-root', default='data')
    parser.add_argument('--num-workers', type=int, default=2)
    parser.add_argument('--row', help=argparse.SUPPRESS)      # internal: measure one row and exit
    args = parser.parse_args()
    args.amp_default = args.device.startswith('cuda')        # as the training scripts
    if args.row:
        return run_row(args)

    peaks, peak_source = peak_flops(torch.device(args.device))
    command = ' '.join(['python', *sys.argv])
    print(f"$ {command}\n{args.model} {args.img_size}px patch {args.patch_size}, batch {args.batch_size}, "
          f"{args.device} ({torch.get_num_threads()} threads); peak GFLOP/s "
          f"{', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.items() if v) or 'unknown'} ({peak_source}); "
          f"'of peak' compares a row with the peak of its precision (data rows: fp32)\n")
    print("| step | compile | precision | img/s | GFLOP/img | GFLOP/s | of peak | peak mem MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = rows_for(args)
    results = {row: [] for row in rows}
    for round_ in range(args.rounds):        # every row once per round, so slow drift hits all rows
        for row in rows:
            results[row].append(measure_row(row))
            if round_ == args.rounds - 1:
                print_row(row, median_round(results[row]), peaks)


def measure_row(row):
    """One row in a fresh process -> its result, or {'failed': the last line of its error}."""
    result = subprocess.run([sys.executable, __file__, *sys.argv[1:], '--row', row],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {'failed': (result.stderr.strip().splitlines() or ['failed'])[-1][:80]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_round(results):
    """The round with the median img/s, so that a row's figures all come from one measurement."""
    measured = sorted((r for r in results if 'failed' not in r), key=lambda r: r['img_per_s'])
    return measured[len(measured) // 2] if measured else results[-1]


def print_row(row, r, peaks):
    stage, compile, amp = row.split(':')
    if 'failed' in r:
        print(f"| {stage} | {compile or '-'} | {amp or '-'} | failed: {r['failed']} |||||", flush=True)
        return
    gflops, peak = r.get('gflop_per_s'), peaks[amp or 'fp32']
    share = f"{gflops * 1e9 / peak:.0%}" if gflops and peak else '-'
    per_img = f"{r['gflop_per_img']:.2f}" if 'gflop_per_img' in r else '-'
    memory = f"{r['peak_mem_mb']:.0f}" if 'peak_mem_mb' in r else '-'
    print(f"| {stage} | {compile or '-'} | {amp or '-'} | {r['img_per_s']:.1f} | {per_img} | "
          f"{f'{gflops:.0f}' if gflops else '-'} | {share} | {memory} |", flush=True)

if __name__ == '__main__':
    main()
