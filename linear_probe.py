"""Linear probing (MAE's protocol): how linearly separable are a frozen encoder's features?

The encoder (from --init, or randomly initialised when --init is omitted: the baseline every probe
is read against) is frozen; only a head is trained on its feature of each image:

    feature (B, D) = the normed cls token (--feature cls, as official MAE)
                     or fc_norm(mean of the patch tokens) (--feature avg)
    logits (B, C)  = Linear(BatchNorm1d(feature, affine=False, eps=1e-6))

with LARS (momentum 0.9, weight decay 0), lr = blr x batch / 256 (blr 0.1, batch 16384), 10 warmup
epochs of 90 then cosine to 0, and RandomResizedCrop + flip as the only augmentation. Top-1 and top-5
on the validation set go to log.jsonl after each epoch. The checkpoint holds the encoder's weights,
unchanged, next to the head: `--eval-only --resume CHECKPOINT` evaluates it alone. On a small data
set blr 0.1 barely moves the head: a LARS step is a fixed fraction of the weight's norm, so lr x
steps is what counts (ImageNet: ~7,000 steps at lr 6.4); configs/linprobe_fashion_mnist_quick.yaml
keeps those and sets --lr.

Fast mode, --cached-features: the frozen encoder runs once over the train and val images (eval
transform: resize + center crop, no augmentation); the features are cached on disk in the output
dir, and the head then trains on the cache for many epochs in seconds. This is a proxy for the
protocol, not the protocol: without augmentation the head sees the same view of each image every
epoch, so it fits the training set better and its top-1 differs from the full protocol's: by a
little on large images and long schedules, by more (usually higher) on tiny images with short
schedules, where RandomResizedCrop down to 8% of the area is harsh (16 px, 20 epochs: ~15 points).
Without augmentation the two modes train the very same head on the very same batches. Read the fast
mode as a cheap ranking of encoders; report the full protocol's number when comparing with the paper.

    python linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml --init CKPT
    torchrun --nproc_per_node=8 linear_probe.py --config configs/linprobe_tiny_imagenet.yaml --init CKPT
"""
import argparse
import hashlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import TensorBatches, build_dataset, build_loader, eval_transform, finetune_transform, normalization
from training import (EpochProgress, Run, RunError, add_common_args, append_log, load_resume_checkpoint,
                      lr_at, no_sync_unless, parse_args, prepare_log, run_main, save_checkpoint,
                      seed_everything, set_lr)
from vit import MODELS, load_pretrained, read_checkpoint

STAGE = 'linear_probe'


# --------------------------------------------------------------------------------------------------
# LARS, as in official MAE's linear probe
# --------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), the variant official MAE probes with.

    For each matrix W (ndim > 1) with gradient G:
        G <- G + weight_decay * W
        G <- G * trust_coefficient * ||W|| / ||G||      (factor 1 when either norm is 0)
    Vectors (biases; norm weights) skip both lines. Then, for every parameter, heavy-ball momentum:
        mu <- momentum * mu + G,    W <- W - lr * mu
    The step of a matrix is thus a fixed fraction of its own norm, whatever the gradient's scale."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    w_norm, u_norm = torch.linalg.norm(p), torch.linalg.norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        group['trust_coefficient'] * w_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                state['mu'].mul_(group['momentum']).add_(update)
                p.add_(state['mu'], alpha=-group['lr'])


# --------------------------------------------------------------------------------------------------
# The probe: a ViT whose head is BatchNorm (no affine) + Linear, everything else frozen
# --------------------------------------------------------------------------------------------------
def probe_head(dim, num_classes):
    """BatchNorm1d without affine parameters (it only whitens each feature, so LARS sees one matrix),
    then Linear with trunc-normal(0.01) weights and zero bias, as official MAE."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def build_probe(args, num_classes, run):
    """A VisionTransformer with the --init encoder (or a random one), frozen and in eval mode, and a
    probe head. --feature avg builds the global-pool layout, so the feature is fc_norm(mean of patch
    tokens): a checkpoint without fc_norm (any pre-training one) leaves it fresh, LayerNorm(1, 0)."""
    model = MODELS[args.model](img_size=args.img_size, patch_size=args.patch_size,
                               num_classes=num_classes, global_pool=args.feature == 'avg')
    if args.init and not args.resume:      # a resumed run's checkpoint holds the encoder already
        report = load_pretrained(model, args.init, allow_new=('head.', 'fc_norm.', 'norm.'))
        if run.is_main:
            print(f"init from {args.init}: {report.summary()}")
    elif not args.init and run.is_main:
        print("no --init: probing a randomly initialised encoder (the baseline)")
    model.head = probe_head(model.embed_dim, num_classes)
    model.requires_grad_(False).eval()
    model.head.requires_grad_(True)
    return model.to(run.device)


def encoder_fingerprint(model):
    """A hash of every encoder weight: names the features a cache holds."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        if not name.startswith('head.'):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The fast mode: features extracted once, cached on disk
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model, dataset, run, args):
    """The frozen encoder's feature of every image, in order: (N, D) float32 and labels (N,)."""
    loader = build_loader(dataset, args.batch_size, train=False, num_workers=args.num_workers,
                          device=run.device)
    features, labels = [], []
    for imgs, targets in tqdm(loader, desc="extracting features", disable=not run.is_main,
                              dynamic_ncols=True, leave=False):
        with run.autocast(args.amp):
            tokens = model.encode(imgs.to(run.device, non_blocking=True)).tokens   # (B, 1 + L, D)
            features.append(model.pool(tokens).float())                           # (B, D)
        labels.append(targets.to(run.device))
    return torch.cat(features), torch.cat(labels)


def cached_features(model, train_set, val_set, run, args):
    """Train and val features from OUTPUT_DIR/features.pt when it was made by this encoder on these
    images; otherwise extracted now and saved there. -> dict of (N, D) features and (N,) labels."""
    key = dict(encoder=encoder_fingerprint(model), model=args.model, feature=args.feature,
               data=str(args.data), data_root=str(args.data_root), img_size=args.img_size,
               subset=args.subset, val_subset=args.val_subset, classes=args.classes)
    path = run.output_dir / 'features.pt'
    if path.exists():
        cache = read_checkpoint(path)
        if cache.get('key') == key:
            print(f"features from the cache {path}")
            return {name: t.to(run.device) for name, t in cache.items() if name != 'key'}
        print(f"the cache {path} holds other features (another encoder or data): re-extracting")
    start = time.time()
    cache = {}
    cache['train'], cache['train_labels'] = extract_features(model, train_set, run, args)
    cache['val'], cache['val_labels'] = extract_features(model, val_set, run, args)
    save_checkpoint(path, key=key, **{name: t.cpu() for name, t in cache.items()})
    print(f"extracted {len(cache['train'])} train and {len(cache['val'])} val features of dim "
          f"{cache['train'].shape[1]} in {time.time() - start:.1f}s, cached in {path}")
    return cache


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=90, warmup_epochs=10, batch_size=512, blr=0.1, weight_decay=0.0)
    g = parser.add_argument_group('linear probe')
    g.add_argument('--feature', default='cls', choices=['cls', 'avg'],
                   help='what the head sees: the normed cls token (official MAE), or fc_norm of the '
                        'mean patch token')
    g.add_argument('--cached-features', action=argparse.BooleanOptionalAction, default=False,
                   help='fast proxy: encode the images once (center crop, no augmentation), cache '
                        'the features in the output dir, train the head on them. Seconds instead '
                        'of hours; a better train fit and a top-1 that differs from the full '
                        'protocol (a little on large images, more on tiny ones: see above): fine for '
                        'ranking encoders, not for comparing with the paper. One process only')
    g.add_argument('--eval-only', action='store_true',
                   help='evaluate the --resume checkpoint on the val images and exit')
    g.add_argument('--val-subset', type=int, default=0,
                   help='evaluate on a fixed random sample of this many val images (0: all), for quick runs')
    return parser


def train_one_epoch(classifier, head, loader, optimizer, epoch, run, args):
    """One pass of head training with per-iteration lr, gradient accumulation and bf16 autocast.
    `classifier` maps a batch of the loader's inputs (images, or cached features) to logits."""
    head.train()    # only the head's BatchNorm has a training mode; the encoder stays in eval
    optimizer.zero_grad(set_to_none=True)
    steps, lr = len(loader), 0.0
    sums = {'loss': torch.zeros((), device=run.device), 'train_top1': torch.zeros((), device=run.device)}
    progress = EpochProgress(loader, epoch, run)
    for step, (inputs, labels) in enumerate(progress):
        if step % args.accum_iter == 0:
            lr = lr_at(epoch + step / steps, run.lr, args.min_lr, args.warmup_epochs, args.epochs)
            set_lr(optimizer, lr)
        inputs = inputs.to(run.device, non_blocking=True)             # (B, 3, H, W) or (B, D)
        labels = labels.to(run.device, non_blocking=True)             # (B,)
        ends_accumulation = (step + 1) % args.accum_iter == 0
        with no_sync_unless(classifier, ends_accumulation):
            with run.autocast(args.amp):
                logits = classifier(inputs)                            # (B, num_classes)
                loss = F.cross_entropy(logits.float(), labels)
            (loss / args.accum_iter).backward()
        if ends_accumulation:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums['loss'] += loss.detach()
        sums['train_top1'] += 100 * (logits.argmax(1) == labels).float().mean()   # batches are equal
        progress.show(step, len(labels), sums, lr)
    return progress.summary(sums, lr)


@torch.no_grad()
def evaluate(classifier, head, batches, run, args):
    """Top-1 / top-5 accuracy (%) and mean loss of `classifier` over (inputs, labels) batches,
    summed over processes (under DDP the val sampler repeats a few images to even the shards)."""
    head.eval()
    totals = torch.zeros(4, device=run.device)          # loss sum, top-1 hits, top-5 hits, images
    for inputs, labels in batches:
        inputs = inputs.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        with run.autocast(args.amp):
            logits = classifier(inputs).float()                        # (B, num_classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices     # (B, 5)
        hits = top5 == labels[:, None]                                 # (B, 5)
        totals += torch.stack([F.cross_entropy(logits, labels, reduction='sum'), hits[:, 0].sum().float(),
                               hits.any(1).sum().float(), labels.new_tensor(len(labels)).float()])
    loss, top1, top5, count = run.sum_over_processes(totals).tolist()
    return {'val_loss': loss / count, 'top1': 100 * top1 / count, 'top5': 100 * top5 / count}


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if args.eval_only and not args.resume:
        raise RunError("--eval-only evaluates a probe checkpoint: pass it with --resume PATH")
    run = Run(args)
    if args.cached_features and run.distributed:
        raise RunError("--cached-features runs in one process (the head trains in seconds): "
                       "run it without torchrun")
    seed_everything(args.seed)

    # data ------------------------------------------------------------------------------------------
    # the full protocol augments (RandomResizedCrop + flip); the cache holds one center crop per image
    stats = normalization(args.data)
    train_transform = (eval_transform(args.img_size, stats=stats) if args.cached_features
                       else finetune_transform(args.img_size, rand_aug=None, stats=stats))
    train_set, num_classes = build_dataset(args.data, args.data_root, train=True,
                                           transform=train_transform, synthetic_size=args.img_size,
                                           subset=args.subset, classes=args.classes)
    val_set, _ = build_dataset(args.data, args.data_root, train=False,
                               transform=eval_transform(args.img_size, stats=stats), synthetic_size=args.img_size,
                               subset=args.val_subset, classes=args.classes)

    # model and optimizer ---------------------------------------------------------------------------
    model = build_probe(args, num_classes, run)
    optimizer = LARS(model.head.parameters(), lr=run.lr, weight_decay=args.weight_decay)
    start_epoch = 0
    if args.resume:
        ckpt = load_resume_checkpoint(args.resume, STAGE)
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        start_epoch = ckpt['epoch'] + 1
    val_loader = build_loader(val_set, args.batch_size, train=False, num_workers=args.num_workers,
                              device=run.device, rank=run.rank, world_size=run.world_size)
    if args.eval_only:
        stats = evaluate(model, model.head, val_loader, run, args)
        if run.is_main:
            print(f"{args.resume}: top-1 {stats['top1']:.2f}, top-5 {stats['top5']:.2f}, "
                  f"loss {stats['val_loss']:.4f} on {len(val_set)} val images", flush=True)
        run.close()
        return

    if args.cached_features:
        # the encoder never runs again: the head alone is the classifier of cached features, fed in
        # the image loader's sampler order, so it sees the very batches of the full protocol
        features = cached_features(model, train_set, val_set, run, args)
        classifier = run.wrap(model.head, args.compile)
        loader = TensorBatches(features['train'], features['train_labels'], args.batch_size,
                               train=True, seed=args.seed)
        val_loader = TensorBatches(features['val'], features['val_labels'], args.batch_size, train=False)
    else:
        classifier = run.wrap(model, args.compile)
        loader = build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers,
                              device=run.device, seed=args.seed, rank=run.rank,
                              world_size=run.world_size)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    run.announce(model, f" | frozen encoder {frozen / 1e6:.2f}M params, feature {args.feature}, "
                        f"{'cached features' if args.cached_features else 'full protocol'} | "
                        f"{len(train_set)} images, {len(loader)} steps/epoch")
    log = prepare_log(run.output_dir, start_epoch)

    # the loop --------------------------------------------------------------------------------------
    # cached epochs take less time than writing the encoder to disk: save ten times a run
    save_every = max(1, args.epochs // 10) if args.cached_features else 1
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed, epoch, run.rank)
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(classifier, model.head, loader, optimizer, epoch, run, args)
        stats.update(evaluate(classifier, model.head, val_loader, run, args))
        if run.is_main:
            append_log(log, {'epoch': epoch, **stats})
            if (epoch + 1) % save_every == 0 or epoch + 1 == args.epochs:
                save_checkpoint(run.output_dir / 'checkpoint.pth', stage=STAGE, epoch=epoch,
                                args=vars(args), model=model.state_dict(), optimizer=optimizer.state_dict())
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, train top-1 {stats['train_top1']:.2f}, "
                  f"val top-1 {stats['top1']:.2f}, top-5 {stats['top5']:.2f}", flush=True)
    run.close()


if __name__ == '__main__':
    run_main(main)
