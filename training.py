"""The plumbing every training script shares, and nothing else: flags and YAML configs, this process's
place in a torchrun job, seeding, the warmup-cosine schedule, AdamW groups, AMP/compile, the one
training loop (each stage hands it a function that returns its losses for a batch), the one evaluation
of a classifier, the kNN readout of frozen features, atomic checkpoints and the metrics log. No model
or algorithm code lives here: the losses and the features stay in the stages. What only keeps runs
alive (one-line errors, SIGTERM, restarts) is in operations.py."""
import argparse
import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel

from data import NAMED, DataError, build_dataset, build_loader, eval_transform, normalization
from operations import RunError, attempt_store, resume_path
from vit import SIZES, load_pretrained, read_checkpoint


# --------------------------------------------------------------------------------------------------
# Flags: one vocabulary for every stage; --config YAML sets defaults, flags override
# --------------------------------------------------------------------------------------------------
AMP_MODES = ('bf16', 'fp16', 'none')


def add_common_args(parser, *, epochs, warmup_epochs, batch_size, blr, weight_decay, min_lr=0.0,
                    img_size=224, patch_size=16, data_on_device=True, models=tuple(SIZES)):
    """The flags every training script shares. Defaults are the stage's paper values;
    data_on_device=False leaves out --data-on-device for a stage whose augmentation has no batched
    form on the device (MoCo v3's two views) or that has a fast path of its own (linear_probe.py's
    --cached-features)."""
    def on_off(name, help):
        parser.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=None,
                            help=help + ' (default: on for CUDA, off on CPU)')

    g = parser.add_argument_group('run')
    g.add_argument('--config', help='YAML file of defaults (keys are flag names); flags override it')
    g.add_argument('--output-dir', default='output', help='checkpoint, log.jsonl, config, figures')
    g.add_argument('--resume', help="checkpoint of this stage to continue exactly (its flags are the "
                                    "defaults; flags given now override, e.g. --epochs); 'auto': "
                                    "OUTPUT_DIR/checkpoint.pth if it exists, else start fresh (for restarts)")
    g.add_argument('--init', help='weights to start from: ours, official MAE, MAE-Lite, timm/DeiT')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp', nargs='?', const=True, default=None, choices=AMP_MODES,
                   help='autocast dtype: bf16, fp16 (with a gradient scaler) or none (fp32); --amp alone: '
                        'bf16 where the device has it natively, else fp16 (default: that on CUDA, none on CPU)')
    g.add_argument('--no-amp', dest='amp', action='store_const', const='none', help='same as --amp none')
    on_off('compile', 'torch.compile the model')
    g.add_argument('--compile-mode', default='default', choices=['default', 'reduce-overhead', 'max-autotune'],
                   help="torch.compile mode; 'reduce-overhead' uses CUDA graphs (fewer launches for small "
                        "models, more memory)")
    g.add_argument('--seed', type=int, default=0)

    g = parser.add_argument_group('data')
    g.add_argument('--data', default='fashion_mnist',
                   help='fashion_mnist, cifar10, cifar100, flowers, pets, aircraft, cars, synthetic, '
                        'or a folder with train/<class>/* and val/<class>/*; the pre-training stages also '
                        'take a folder of unlabelled images, at any depth (labels all 0, no val split)')
    g.add_argument('--data-root', default='data', help='where named data sets live or download to')
    g.add_argument('--img-size', type=int, default=img_size, help=f'paper: {img_size}')
    g.add_argument('--patch-size', type=int, default=patch_size, help=f'paper: {patch_size}')
    g.add_argument('--num-workers', type=int, default=default_num_workers(),
                   help='data loader processes per process (default: 4, or the CPU count if fewer)')
    if data_on_device:
        g.add_argument('--data-on-device', action=argparse.BooleanOptionalAction, default=False,
                       help='decode the training set once into a tensor on the device and augment there '
                            '(crop + flip in one batched op; RandAugment, erasing image by image): for '
                            'data sets that fit in memory')
    g.add_argument('--subset', type=int, default=0,
                   help='train on a fixed sample of this many images (0: all), an equal share of each '
                        'class: quick runs, or a few labels per class')
    g.add_argument('--classes', type=class_list, default=[],
                   help="keep only these classes, e.g. '0,2,4,6,8', renumbered 0..k-1 in that order "
                        "(train and val alike): a pre-training task and a downstream task from one data set")
    g.add_argument('--strict-images', action=argparse.BooleanOptionalAction, default=False,
                   help='stop at the first unreadable training image, with its name. Default: skip it '
                        '(the next image takes its place), name it once on stderr and count it in '
                        "log.jsonl's bad_images; stop only when more than 1%% of a batch (and more than "
                        'one image) is unreadable. Evaluation always stops at an unreadable image')

    g = parser.add_argument_group('optimisation')
    g.add_argument('--model', default='vit_tiny', choices=list(models), help='encoder size (paper: vit_tiny)')
    g.add_argument('--epochs', type=int, default=epochs, help=f'paper: {epochs}')
    g.add_argument('--warmup-epochs', type=float, default=warmup_epochs, help=f'paper: {warmup_epochs}')
    g.add_argument('--batch-size', type=int, default=batch_size,
                   help='per process; effective batch = batch-size x accum-iter x processes')
    g.add_argument('--accum-iter', type=int, default=1, help='micro-batches per optimizer step')
    g.add_argument('--blr', type=float, default=blr,
                   help=f'base lr per 256 images: lr = blr x effective batch / 256 (paper: {blr})')
    g.add_argument('--lr', type=float, default=None, help='absolute lr; overrides --blr')
    g.add_argument('--min-lr', type=float, default=min_lr, help=f'cosine floor (paper: {min_lr})')
    g.add_argument('--weight-decay', type=float, default=weight_decay, help=f'paper: {weight_decay}')
    return parser


def add_knn_args(parser):
    """The pre-training stages' readout flags (knn_sets, knn_readout): is the pre-training working?"""
    g = parser.add_argument_group('kNN readout')
    g.add_argument('--knn-every', type=int, default=0,
                   help=f"every N epochs and after the last, log the weighted kNN top-1 (k 20, cosine, T 0.07) "
                        f"of the encoder's features as knn_top1: a fixed sample of at most {KNN_BANK:,} "
                        f"training images as neighbours, {KNN_QUERIES:,} val images as queries, eval view, "
                        f"on the main process (0: off)")
    g.add_argument('--knn-data', help='the labelled set of the kNN readout, a name or a folder with '
                                      'train/<class>/ and val/<class>/ (default: --data, with --classes; '
                                      '--classes does not apply to another set)')
    return parser


def default_num_workers():
    return min(4, os.cpu_count() or 1)


def class_list(text):
    """'0,2,4' -> [0, 2, 4]; a YAML list works too."""
    if isinstance(text, (list, tuple)):
        return [int(c) for c in text]
    try:
        return [int(c) for c in str(text).replace(' ', '').split(',') if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of class indices") from None


def parse_args(parser, argv=None):
    """Flags > --config YAML > the --resume checkpoint's flags > the parser's (paper) defaults.
    `--resume auto` resumes from OUTPUT_DIR/checkpoint.pth when there is one, else starts fresh.
    --amp (resolve_amp) and --compile, when not given, are resolved here: on for CUDA, off on CPU."""
    known, _ = parser.parse_known_args(argv)
    config = read_config(parser, known.config) if known.config else {}
    parser.set_defaults(**config)
    known, _ = parser.parse_known_args(argv)                  # its --output-dir may come from the config
    resume = resume_path(known.resume, known.output_dir)
    if resume:
        saved = read_checkpoint(resume)
        if not isinstance(saved, dict) or not isinstance(saved.get('args'), dict):
            raise RunError(f"--resume {resume} is not a checkpoint written by these scripts; "
                           f"use --init to start from other weights")
        saved_args = {k: v for k, v in saved['args'].items() if k not in ('resume', 'config')}
        parser.set_defaults(**{**saved_args, **config})
    args = parser.parse_args(argv)
    args.resume = resume
    on_gpu = args.device.startswith('cuda')
    args.amp = resolve_amp(args.amp, args.device)
    args.compile = on_gpu if args.compile is None else args.compile
    if args.img_size % args.patch_size:
        raise RunError(f"--img-size {args.img_size} is not divisible by --patch-size "
                       f"{args.patch_size}: pick a multiple, e.g. --img-size "
                       f"{round(args.img_size / args.patch_size) * args.patch_size}")
    return args


def resolve_amp(amp, device):
    """--amp as a flag, a YAML key or a checkpoint's saved args gives it -> 'bf16' | 'fp16' | 'none'.
    None (not given): the default for `device` ('cuda', 'cuda:1', 'cpu', ...): on CUDA bf16 where the
    GPU has it natively (Ampere and later), else fp16; none elsewhere. True (bare --amp, `amp: true`,
    older checkpoints): bf16 where the device has it (CPUs, newer GPUs), else fp16. False: none."""
    on_gpu = device.startswith('cuda')
    if amp is None:
        amp = on_gpu
    if amp is False:
        return 'none'
    if amp is True:
        # including_emulation=False: a T4 or V100 "supports" bf16 only emulated, far slower than fp16
        return 'fp16' if on_gpu and not torch.cuda.is_bf16_supported(including_emulation=False) else 'bf16'
    if str(amp).lower() not in AMP_MODES:
        raise RunError(f"--amp {amp}: choose bf16, fp16 (with a gradient scaler) or none")
    return str(amp).lower()


def read_config(parser, path):
    """YAML of flag defaults; keys may use - or _. An unknown key is an error, not silently ignored."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    actions = {a.dest: a for a in parser._actions}
    defaults = {}
    for key, value in config.items():
        dest = key.replace('-', '_')
        if dest not in actions:
            raise RunError(f"config {path}: unknown key '{key}' (see --help for the flags)")
        action = actions[dest]
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)  # PyYAML reads '1e-3' as a string
        defaults[dest] = value
    return defaults


# --------------------------------------------------------------------------------------------------
# This process's device and its place in the job; seeds
# --------------------------------------------------------------------------------------------------
class Processes:
    """This process's device, rank and world size (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), and
    the process group when the job has several processes (nccl on CUDA, gloo on CPU)."""

    def __init__(self, device):
        self.distributed = 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', 1)) > 1
        self.rank = int(os.environ.get('RANK', 0))
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise RunError("--device cuda but no CUDA device is visible: pass --device cpu")
        if device == 'cuda':
            self.device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device(device)
        if self.distributed:
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo', store=attempt_store(),
                                    rank=self.rank, world_size=self.world_size)
        self.is_main = self.rank == 0

    def mean(self, value):
        """Average a float over all processes (for the epoch's logged metrics)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def close(self):
        if self.distributed:
            dist.destroy_process_group()


def announce(procs, model, lr, effective_batch, output_dir, extra='', *, amp):
    """The one line a run starts with: device, AMP, trainable parameters, effective batch, lr, output."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = {'bf16': 'amp bf16', 'fp16': 'amp fp16 + GradScaler', 'none': 'fp32 (no amp)'}[amp]
    if procs.is_main:
        print(f"device {procs.device} x {procs.world_size} | {precision} | "
              f"{f'{params / 1e6:.2f}M' if params >= 100_000 else f'{params:,}'} trainable params | "
              f"effective batch {effective_batch} | lr {lr:.3g} | output {output_dir}{extra}", flush=True)


def autocast(device, amp):
    """Autocast to the --amp mode's dtype, 'bf16' or 'fp16'; 'none' runs in fp32."""
    dtype = torch.float16 if amp == 'fp16' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp in ('bf16', 'fp16'))


def grad_scaler(amp, device):
    """fp16's gradient scaler (fp16 underflows small gradients: the loss is scaled up before backward,
    the gradients down before the step, and a step with inf/nan gradients is skipped); None for bf16
    and none, whose range is fp32's. A device or build without fp16 autocast stops the run."""
    if amp != 'fp16':
        return None
    if not fp16_autocast_works(device):
        raise RunError(f"--amp fp16: this PyTorch build ({torch.__version__}) has no fp16 autocast on "
                       f"{device.type}; use --amp bf16 or --amp none, or install a PyTorch with it")
    return torch.amp.GradScaler(device.type)


def fp16_autocast_works(device):
    """Whether fp16 autocast runs on `device`: its type has autocast and a tiny matmul under it comes
    out in fp16 (builds without it warn and run in fp32)."""
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return False
    try:
        with warnings.catch_warnings(), torch.autocast(device.type, dtype=torch.float16):
            warnings.simplefilter('ignore')
            x = torch.ones(2, 2, device=device)
            return (x @ x).dtype == torch.float16
    except RuntimeError:
        return False


def compile_and_wrap(model, procs, compile, mode='default'):
    """torch.compile, then DDP (the order nanoGPT uses)."""
    if compile:
        model = torch.compile(model, mode=mode)
    if procs.distributed:
        ids = [procs.device.index] if procs.device.type == 'cuda' else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model


def seed_everything(seed, epoch=0, rank=0):
    """Seed from (seed, epoch, rank) at the start of each epoch: masking, augmentation and loader
    workers then depend only on these, so a resumed run repeats the uninterrupted one exactly and
    checkpoints need no RNG state."""
    value = seed + 100_003 * epoch + 1_009 * rank
    random.seed(value)
    torch.manual_seed(value)


def no_sync_unless(model, sync):
    """Under DDP, skip the gradient all-reduce on micro-batches that do not end an accumulation."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------
def warmup_cosine(peak_lr, min_lr, warmup_epochs, epochs):
    """-> lr_at(epoch_frac): linear warmup from 0 for `warmup_epochs`, then half-cosine to `min_lr`.
    epoch_frac is epoch + step / steps_per_epoch, so the schedule moves every iteration."""
    def lr_at(epoch_frac):
        if epoch_frac < warmup_epochs:
            return peak_lr * epoch_frac / warmup_epochs
        progress = (epoch_frac - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return lr_at


def set_lr(optimizer, lr):
    """Each group gets lr times its `lr_scale` (layer decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def weight_decay_groups(model, weight_decay):
    """Two AdamW groups: decay for weight matrices, none for 1-D parameters (norms, biases). Frozen
    parameters (sin-cos position embeddings) are left out."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (skip if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': skip, 'weight_decay': 0.0}]


def adamw(groups, lr, betas, device):
    """AdamW with the fused kernel on CUDA and CPU (on a 2-core CPU it updates ViT-Tiny's MAE in 3.6 ms
    instead of 12.5 ms with foreach); the multi-tensor (foreach) one elsewhere."""
    fused = device.type in ('cuda', 'cpu')
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)


# --------------------------------------------------------------------------------------------------
# The loop every stage trains with, and the evaluation of a classifier
# --------------------------------------------------------------------------------------------------
def train_one_epoch(model, loader, optimizer, losses, lr_at, epoch, procs, *, accum_iter=1, amp='none',
                    scaler=None, clip_grad=None, seed=0):
    """One pass over the loader: lr_at(epoch_frac) set at every optimizer step, gradient accumulation
    over `accum_iter` micro-batches (DDP all-reduces on the last one only), autocast to the `amp` mode
    ('bf16' | 'fp16' | 'none'), and gradient-norm clipping when `clip_grad` is given. With fp16's
    `scaler` (grad_scaler) the loop follows PyTorch's AMP recipe, and the steps it skipped for inf/nan
    gradients are counted into the log record as 'skipped_steps'.

    losses(inputs, labels, epoch_frac) -> dict of 0-d tensors for one micro-batch, epoch_frac being
    epoch + step / steps: 'loss' is minimised; every entry, 'loss' included, is averaged over the
    epoch into the returned log record (with the last lr, img/s and the time). Masking, augmentation
    and the shuffle are seeded from (seed, epoch, rank) first."""
    seed_everything(seed, epoch, procs.rank)
    loader.sampler.set_epoch(epoch)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    steps, lr, sums = len(loader), 0.0, {}
    skipped, scale = 0, scaler.get_scale() if scaler else None   # fp16's loss scale halves after a skip
    progress = EpochProgress(loader, epoch, procs)
    for step, (inputs, labels) in enumerate(progress):
        epoch_frac = epoch + step / steps
        if step % accum_iter == 0:
            lr = lr_at(epoch_frac)
            set_lr(optimizer, lr)
        inputs = inputs.to(procs.device, non_blocking=True)   # (B, 3, H, W); two views (B, 2, 3, H, W); features (B, D)
        labels = labels.to(procs.device, non_blocking=True)   # (B,)
        ends_accumulation = (step + 1) % accum_iter == 0
        with no_sync_unless(model, ends_accumulation):
            with autocast(procs.device, amp):
                batch_losses = losses(inputs, labels, epoch_frac)
            loss = batch_losses['loss'] / accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        if ends_accumulation:
            if clip_grad:
                if scaler:
                    scaler.unscale_(optimizer)               # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler:
                scaler.step(optimizer)                       # skipped if a gradient is inf/nan
                scaler.update()
                skipped += scaler.get_scale() < scale        # a host sync per step, fp16 only
                scale = scaler.get_scale()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for name, value in batch_losses.items():     # summed on the device: no host sync per step
            sums[name] = sums.get(name, 0) + value.detach()
        progress.images += len(labels) * procs.world_size
        if progress.due(step):
            means = {name: total.item() / (step + 1) for name, total in sums.items()}   # a host sync
            stop_if_diverged(means['loss'], epoch, step)
            progress.show(means, lr, skipped)
    record = progress.summary(sums, lr)
    return {**record, 'skipped_steps': skipped} if scaler else record


class EpochProgress:
    """The tqdm bar of one epoch: every `every` steps (and at the last) the running mean losses, the
    lr and img/s; `summary` makes the epoch's log record."""

    def __init__(self, loader, epoch, procs, every=20):
        self.procs, self.every, self.steps, self.loader = procs, every, len(loader), loader
        self.bar = tqdm(loader, desc=f"epoch {epoch}", disable=not procs.is_main, dynamic_ncols=True)
        self.start = self.last_time = time.time()
        self.images = self.last_images = 0

    def __iter__(self):
        return iter(self.bar)

    def due(self, step):
        return (step + 1) % self.every == 0 or step + 1 == self.steps

    def show(self, means, lr, skipped=0):
        """`skipped`: the optimizer steps fp16's scaler skipped so far, shown when there are any."""
        now = time.time()
        img_per_s = (self.images - self.last_images) / (now - self.last_time)
        self.bar.set_postfix(**{k: f"{v:.4f}" for k, v in means.items()}, lr=f"{lr:.2e}",
                             img_s=f"{img_per_s:.0f}", **({'skipped': skipped} if skipped else {}))
        self.last_images, self.last_time = self.images, now

    def summary(self, sums, lr):
        """The epoch's line of log.jsonl: mean losses over all processes, lr, img/s, time, and the
        unreadable images skipped (summed over processes) when the loader skips them."""
        elapsed = time.time() - self.start
        record = {**{name: self.procs.mean(total.item() / self.steps) for name, total in sums.items()},
                  'lr': lr, 'img_per_s': self.images / elapsed, 'epoch_time_s': elapsed}
        if hasattr(self.loader, 'bad_images'):          # data.SkippingLoader (no --strict-images)
            bad = torch.tensor(self.loader.bad_images, device=self.procs.device)
            record['bad_images'] = int(self.procs.sum(bad).item())
        return record


def stop_if_diverged(loss_value, epoch, step):
    """A NaN or infinite running loss stops the run with one line; the last checkpoint is intact. It
    reads the loss, not the gradients: an fp16 step skipped for inf/nan gradients (the scaler's
    overflow, its loss finite) is no divergence."""
    if not math.isfinite(loss_value):
        raise RunError(f"loss is {loss_value} at epoch {epoch} step {step}: training diverged; "
                       f"lower --blr or raise --warmup-epochs, then --resume from the last good "
                       f"checkpoint in --output-dir (it is intact)")


@torch.no_grad()
def evaluate(model, loader, procs, amp):
    """A classifier's top-1 and top-5 accuracy (%) and mean cross-entropy over (inputs, labels)
    batches: the one evaluation of finetune.py and linear_probe.py. Under DDP the counts are summed
    over processes (the sampler pads each shard with a few repeated images, so a handful may count
    twice). -> {'top1', 'top5', 'loss'}"""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=procs.device)  # top-1 hits, top-5 hits, loss, n
    for inputs, labels in loader:
        inputs = inputs.to(procs.device, non_blocking=True)         # (B, 3, H, W) or features (B, D)
        labels = labels.to(procs.device, non_blocking=True)         # (B,)
        with autocast(procs.device, amp):
            logits = model(inputs).float()                          # (B, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k), best first
        hits = top5 == labels[:, None]                              # (B, k)
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               F.cross_entropy(logits, labels, reduction='sum'),
                               torch.tensor(len(labels), device=procs.device)]).double()
    top1_hits, top5_hits, loss_sum, n = procs.sum(totals).tolist()
    return {'top1': 100 * top1_hits / n, 'top5': 100 * top5_hits / n, 'loss': loss_sum / n}


def evaluate_checkpoint(model, path, loader, num_images, procs, args):
    """--eval-only: load the classifier saved at `path`, head included (a checkpoint of this stage),
    evaluate it once and print one line."""
    report = load_pretrained(model, path)
    if report.new:
        raise RunError(f"--eval-only needs a checkpoint of this stage with its head, but {path} lacks "
                       f"{', '.join(report.new)}: train one first, and pass the flags it was trained with "
                       f"(--config its config.yaml)")
    result = evaluate(compile_and_wrap(model, procs, args.compile, args.compile_mode), loader, procs, args.amp)
    if procs.is_main:
        print(f"{path}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% loss {result['loss']:.4f} "
              f"on {num_images} images ({procs.device} x {procs.world_size})", flush=True)


# --------------------------------------------------------------------------------------------------
# The kNN readout of frozen features: linear_probe.py's second readout, and --knn-every's during
# pre-training. Each caller passes its feature function; nothing here knows the model.
# --------------------------------------------------------------------------------------------------
KNN_BANK, KNN_QUERIES = 5000, 2000      # --knn-every's samples: training images (neighbours), val images (queries)


@torch.no_grad()
def extract_features(feature, dataset, procs, batch_size, num_workers, amp, strict_images=True):
    """feature(imgs (B, 3, H, W)) -> (B, D), a frozen encoder's, on every image of `dataset` in order,
    under autocast to `amp`: (N, D) float32 and labels (N,). strict_images=False (a training set,
    without --strict-images): an unreadable image gives way to the next one, whose feature and label
    take its row."""
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, device=procs.device,
                          strict_images=strict_images)
    features, labels = [], []
    for imgs, targets in tqdm(loader, desc="extracting features", disable=not procs.is_main,
                              dynamic_ncols=True, leave=False):
        with autocast(procs.device, amp):
            features.append(feature(imgs.to(procs.device, non_blocking=True)).float())   # (B, D)
        labels.append(targets.to(procs.device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_features, train_labels, val_features, val_labels, k=20, temperature=0.07, chunk=1024):
    """A second readout of the same frozen features, with nothing trained: the weighted k-nearest-
    neighbour classifier of Wu et al. 2018 (as in DINO). Each val feature's k most cosine-similar
    training features vote for their classes with weight exp(similarity / temperature); top-1 (%)."""
    train = F.normalize(train_features, dim=1)                                  # (N, D)
    num_classes = int(train_labels.max()) + 1
    hits = 0
    for start in range(0, len(val_features), chunk):
        similarity = F.normalize(val_features[start:start + chunk], dim=1) @ train.T   # (b, N)
        top_similarity, top_idx = similarity.topk(min(k, len(train)), dim=1)          # (b, k)
        votes = torch.zeros(len(similarity), num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_similarity / temperature).exp())
        hits += (votes.argmax(dim=1) == val_labels[start:start + chunk]).sum().item()
    return 100 * hits / len(val_features)


def knn_sets(args):
    """--knn-every's labelled images in the eval view (data.eval_transform), each a fixed stratified
    sample: at most KNN_BANK training images (the neighbours) and KNN_QUERIES val images (the
    queries) of --knn-data, else of --data with its --classes. -> (bank, queries), None when off."""
    if args.knn_every < 0:
        raise RunError(f"--knn-every {args.knn_every}: pass a number of epochs, or 0 for no kNN readout")
    flag, data, classes = ('--knn-data', args.knn_data, []) if args.knn_data else ('--data', args.data, args.classes)
    if not args.knn_every:
        return None
    if data not in NAMED and Path(data).is_dir() and not (Path(data) / 'train').is_dir():   # as data.py reads it
        raise RunError(f"--knn-every needs labels: pass --knn-data with a labelled set (a name such as "
                       f"fashion_mnist, or a folder with train/<class>/ and val/<class>/); {flag} {data} is "
                       f"a folder of unlabelled images")
    transform = eval_transform(args.img_size, stats=normalization(data))
    try:
        bank, _ = build_dataset(data, args.data_root, train=True, transform=transform, subset=KNN_BANK,
                                classes=classes)
        queries, _ = build_dataset(data, args.data_root, train=False, transform=transform, subset=KNN_QUERIES,
                                   classes=classes)
    except DataError as e:
        if flag == '--data':
            raise
        raise DataError(str(e).replace('--data ', '--knn-data ')) from None    # data.py's messages say --data
    return bank, queries


def knn_due(epoch, args):
    """Whether --knn-every reads out after `epoch` (0-based): every N epochs, and after the last."""
    return args.knn_every > 0 and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs)


def knn_readout(model, feature, sets, procs, args):
    """--knn-every's readout: feature(imgs) -> (B, D), the stage's feature of `model` (put in eval
    mode for it, no masking, under the run's autocast), on knn_sets' bank and queries; their
    knn_top1. An unreadable image among the neighbours is skipped as in training (unless
    --strict-images); among the queries it stops the run, as any evaluation.
    -> {'knn_top1': %, 'knn_time_s': the readout's seconds}."""
    start, was_training = time.time(), model.training
    model.eval()
    bank, queries = sets
    bank_features, bank_labels = extract_features(feature, bank, procs, args.batch_size, args.num_workers, args.amp,
                                                  strict_images=args.strict_images)
    query_features, query_labels = extract_features(feature, queries, procs, args.batch_size, args.num_workers,
                                                    args.amp)
    model.train(was_training)
    top1 = knn_top1(bank_features, bank_labels, query_features, query_labels)
    return {'knn_top1': top1, 'knn_time_s': time.time() - start}


def knn_note(stats):
    """', kNN top-1 83.4%' for a stage's epoch line when the epoch had a readout, else ''."""
    return f", kNN top-1 {stats['knn_top1']:.1f}%" if 'knn_top1' in stats else ''


# --------------------------------------------------------------------------------------------------
# Checkpoints and the metrics log
# --------------------------------------------------------------------------------------------------
def write_atomically(path, payload):
    """Write bytes to a temporary file, then rename: a crash leaves the old file or the new one."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, 'wb') as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, **state):
    """torch.save, atomically. Saved args must be plain types (loadable with weights_only=True)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_checkpoint(path, stage, optimizer, scaler=None, **parts):
    """Continue a run from the --resume checkpoint at `path` (None: a fresh start): checked to be one
    of this `stage`, loaded into the optimizer, into fp16's gradient `scaler` (its saved 'scaler'
    state, when the checkpoint has one: a run that switches to fp16 starts a fresh scale) and into
    each part (checkpoint key -> module). -> (the epoch to start from, the checkpoint or None)."""
    if not path:
        return 0, None
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get('stage') != stage or 'optimizer' not in ckpt:
        found = ckpt.get('stage', 'unknown') if isinstance(ckpt, dict) else 'unknown'
        raise RunError(f"--resume {path} is a '{found}' checkpoint, not a '{stage}' one; to start "
                       f"from its weights use --init")
    for name, module in parts.items():
        try:
            module.load_state_dict(ckpt[name])
        except RuntimeError as e:      # e.g. a --decoder-depth on the command line that the run did not have
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RunError(f"--resume {path}: its {name} does not fit the model these flags build "
                           f"({lines[1] if len(lines) > 1 else lines[0]}); drop the flags that change the "
                           f"architecture: a resumed run takes them from the checkpoint") from None
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    return ckpt['epoch'] + 1, ckpt


def prepare_output(output_dir, args, start_epoch, is_main):
    """On the main process: OUTPUT_DIR with config.yaml (the resolved flags) and log.jsonl, from
    which a resumed run first drops the lines of the epochs it will redo. -> the log's path on the
    main process, None on the others (one process writes)."""
    if not is_main:
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / 'config.yaml', yaml.safe_dump(vars(args), sort_keys=False).encode())
    log = output_dir / 'log.jsonl'
    if log.exists():
        kept = [line for line in log.read_text().splitlines()
                if line.strip() and json.loads(line).get('epoch', -1) < start_epoch]
        write_atomically(log, ''.join(line + '\n' for line in kept).encode())
    return log


def append_log(log, record):
    with open(log, 'a') as f:
        f.write(json.dumps(record) + '\n')
