"""Linear probing (MAE's protocol): how linearly separable are a frozen encoder's features?

The encoder (from --init, or randomly initialised when --init is omitted: the baseline every probe
is read against) is frozen; only a head is trained on its feature of each image:

    feature (B, D) = the normed cls token (--feature cls, as official MAE)
                     or fc_norm(mean of the patch tokens) (--feature avg)
    logits (B, C)  = Linear(BatchNorm1d(feature, affine=False, eps=1e-6))

with LARS (momentum 0.9, weight decay 0), 10 warmup epochs of 90 then cosine to 0, and
RandomResizedCrop + flip as the only augmentation. Top-1 and top-5 on the validation set go to
log.jsonl after each epoch. The checkpoint holds the encoder's weights, unchanged, next to the head:
`--eval-only --init CHECKPOINT` evaluates it alone, as finetune.py does a fine-tuned one.

The lr. Official MAE scales it with the batch, lr = blr x batch / 256 with blr 0.1, and probes at a
batch of 16384: lr 6.4 (configs/linprobe_tiny_imagenet.yaml keeps exactly that). But a LARS step moves
each weight matrix by a fixed share of its own norm (lr x 0.001 per step, x10 with momentum), whatever
the batch: at a batch of 512, blr 0.1 gives lr 0.2, 32 times smaller steps, and on a small data set
(a few hundred steps) the head barely leaves its initialisation and scores below chance. So by default
(no --lr, no --blr) the probe uses the protocol's lr, 6.4, at any batch, and says so; --blr 0.1
restores the batch scaling.

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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import Augmentation, build_dataset, build_loader, eval_transform, normalization, per_image_transform
from data_in_memory import TensorBatches
from operations import RunError, run_main
from training import (Processes, add_common_args, announce, append_log, compile_and_wrap, evaluate,
                      evaluate_checkpoint, extract_features, grad_scaler, knn_top1, parse_args, prepare_output,
                      resume_checkpoint, save_checkpoint, seed_everything, train_one_epoch, warmup_cosine)
from vit import load_pretrained, read_checkpoint, vit

STAGE = 'linear_probe'
PROTOCOL_LR = 0.1 * 16384 / 256     # official MAE: blr 0.1 at an effective batch of 16384 -> 6.4


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


def build_probe(args, num_classes):
    """A VisionTransformer with a probe head, every other weight frozen (and random until main loads
    --init). --feature avg builds the global-pool layout, so the feature is fc_norm(mean of patch
    tokens): a checkpoint without fc_norm (any pre-training one) leaves it fresh, LayerNorm(1, 0). The
    encoder has no dropout or drop path, so train mode (set by the loop) changes only the head's
    BatchNorm."""
    model = vit(args.model, img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes,
                global_pool=args.feature == 'avg')
    model.head = probe_head(model.embed_dim, num_classes)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model


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
def cached_features(model, train_set, val_set, procs, args):
    """Train and val features from OUTPUT_DIR/features.pt when it was made by this encoder on these
    images; otherwise extracted now and saved there. -> dict of (N, D) features and (N,) labels."""
    key = dict(encoder=encoder_fingerprint(model), model=args.model, feature=args.feature,
               data=str(args.data), data_root=str(args.data_root), img_size=args.img_size,
               subset=args.subset, val_subset=args.val_subset, classes=args.classes, crop_pct=args.crop_pct,
               amp=args.amp)
    path = Path(args.output_dir) / 'features.pt'
    if path.exists():
        cache = read_checkpoint(path)
        if cache.get('key') == key:
            print(f"features from the cache {path}")
            return {name: t.to(procs.device) for name, t in cache.items() if name != 'key'}
        print(f"the cache {path} holds other features (another encoder or data): re-extracting")
    start = time.time()
    cache = {}

    def feature(imgs):                  # what the head sees (--feature): (B, 3, H, W) -> (B, D)
        return model.pool(model.encode(imgs).tokens)

    cache['train'], cache['train_labels'] = extract_features(feature, train_set, procs, args.batch_size,
                                                             args.num_workers, args.amp,
                                                             strict_images=args.strict_images)
    cache['val'], cache['val_labels'] = extract_features(feature, val_set, procs, args.batch_size,
                                                         args.num_workers, args.amp)
    save_checkpoint(path, key=key, **{name: t.cpu() for name, t in cache.items()})
    print(f"extracted {len(cache['train'])} train and {len(cache['val'])} val features of dim "
          f"{cache['train'].shape[1]} in {time.time() - start:.1f}s, cached in {path}")
    return cache


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=90, warmup_epochs=10, batch_size=512, blr=0.1, weight_decay=0.0,
                    data_on_device=False)
    parser.set_defaults(blr=None)
    next(a for a in parser._actions if a.dest == 'blr').help = (
        f'base lr per 256 images, lr = blr x effective batch / 256 (official MAE: 0.1 at batch 16384). '
        f'Default: none, and lr {PROTOCOL_LR:g} at any batch (LARS steps are relative; see above)')
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
                   help='evaluate the probe checkpoint given by --init (encoder and head) and exit')
    g.add_argument('--val-subset', type=int, default=0,
                   help='evaluate on a fixed random sample of this many val images (0: all), for quick runs')
    g.add_argument('--crop-pct', type=float, default=0.875,
                   help='the eval view: resize to img-size / crop-pct (bicubic), center crop (official: 0.875; '
                        '1.0 shows the whole image, for tiny images such as 28 px ones)')
    return parser


def probe_losses(classifier, inputs, labels):
    """The probe's losses on one batch: cross-entropy, and the batch's top-1 (%) on its training
    view, averaged into the log as train_top1 (batches are equal)."""
    logits = classifier(inputs)                                       # (B, num_classes)
    return {'loss': F.cross_entropy(logits.float(), labels),
            'train_top1': 100 * (logits.argmax(1) == labels).float().mean()}


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if args.eval_only and not args.init:
        raise RunError("--eval-only evaluates the probe given by --init: pass a probe checkpoint "
                       "(OUTPUT_DIR/checkpoint.pth of a probe run)")
    procs = Processes(args.device)
    if args.cached_features and procs.distributed:
        raise RunError("--cached-features runs in one process (the head trains in seconds): "
                       "run it without torchrun")
    seed_everything(args.seed)

    # data ------------------------------------------------------------------------------------------
    # the full protocol augments (RandomResizedCrop + flip); the cache holds one center crop per image
    stats = normalization(args.data)
    train_transform = (eval_transform(args.img_size, args.crop_pct, stats) if args.cached_features
                       else per_image_transform(Augmentation(), args.img_size, stats))
    train_set, num_classes = build_dataset(args.data, args.data_root, train=True,
                                           transform=train_transform, subset=args.subset, classes=args.classes)
    val_set, _ = build_dataset(args.data, args.data_root, train=False,
                               transform=eval_transform(args.img_size, args.crop_pct, stats),
                               subset=args.val_subset, classes=args.classes)
    val_loader = build_loader(val_set, args.batch_size, train=False, num_workers=args.num_workers,
                              device=procs.device, rank=procs.rank, world_size=procs.world_size)

    # model -----------------------------------------------------------------------------------------
    model = build_probe(args, num_classes).to(procs.device)
    if args.eval_only:
        evaluate_checkpoint(model, args.init, val_loader, len(val_set), procs, args)
        procs.close()
        return
    if args.init and not args.resume:      # a resumed run's checkpoint holds the encoder already
        report = load_pretrained(model, args.init, allow_new=('head.', 'fc_norm.', 'norm.'))
        if procs.is_main:
            print(f"init from {args.init}: {report.summary()}")
    elif not args.init and procs.is_main:
        print("no --init: probing a randomly initialised encoder (the baseline)")

    # optimizer: LARS on the head only --------------------------------------------------------------
    effective_batch = args.batch_size * args.accum_iter * procs.world_size
    if args.lr is None and args.blr is None:
        lr = PROTOCOL_LR
        if procs.is_main:
            print(f"lr {PROTOCOL_LR:g}: the protocol's LARS lr, kept at any batch size (pass --blr 0.1 to "
                  f"scale it with the batch as official MAE)", flush=True)
    else:
        lr = args.lr if args.lr is not None else args.blr * effective_batch / 256   # the linear scaling rule
    lr_at = warmup_cosine(lr, args.min_lr, args.warmup_epochs, args.epochs)
    optimizer = LARS(model.head.parameters(), lr=lr, weight_decay=args.weight_decay)
    scaler = grad_scaler(args.amp, procs.device)                  # fp16 only
    start_epoch, _ = resume_checkpoint(args.resume, STAGE, optimizer, scaler, model=model)

    if args.cached_features:
        # the encoder never runs again: the head alone is the classifier of cached features, fed in
        # the image loader's sampler order, so it sees the very batches of the full protocol
        features = cached_features(model.eval(), train_set, val_set, procs, args)
        knn = knn_top1(features['train'], features['train_labels'], features['val'], features['val_labels'])
        print(f"kNN top-1 (k=20, cosine, T=0.07) of the cached features: {knn:.2f}", flush=True)
        classifier = compile_and_wrap(model.head, procs, args.compile, args.compile_mode)
        loader = TensorBatches(features['train'], features['train_labels'], args.batch_size,
                               train=True, seed=args.seed)
        val_loader = TensorBatches(features['val'], features['val_labels'], args.batch_size, train=False)
    else:
        classifier = compile_and_wrap(model, procs, args.compile, args.compile_mode)
        loader = build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers,
                              device=procs.device, seed=args.seed, rank=procs.rank,
                              world_size=procs.world_size, strict_images=args.strict_images)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    out = Path(args.output_dir)
    announce(procs, model, lr, effective_batch, out,
             f" | frozen encoder {frozen / 1e6:.2f}M params, feature {args.feature}, "
             f"{'cached features' if args.cached_features else 'full protocol'} | "
             f"{len(train_set)} images, {len(loader)} steps/epoch", amp=args.amp)
    log = prepare_output(out, args, start_epoch, procs.is_main)

    # the loop --------------------------------------------------------------------------------------
    # cached epochs take less time than writing the encoder to disk: save ten times a run
    save_every = max(1, args.epochs // 10) if args.cached_features else 1

    def losses(inputs, labels, epoch_frac):      # images, or their cached features
        return probe_losses(classifier, inputs, labels)

    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(classifier, loader, optimizer, losses, lr_at, epoch, procs,
                                accum_iter=args.accum_iter, amp=args.amp, scaler=scaler, seed=args.seed)
        stats.update({f'val_{name}': value for name, value in
                      evaluate(classifier, val_loader, procs, args.amp).items()})
        if args.cached_features and epoch + 1 == args.epochs:
            stats['knn_top1'] = knn
        if procs.is_main:
            append_log(log, {'epoch': epoch, **stats})
            if (epoch + 1) % save_every == 0 or epoch + 1 == args.epochs:
                save_checkpoint(out / 'checkpoint.pth', stage=STAGE, epoch=epoch,
                                args=vars(args), model=model.state_dict(), optimizer=optimizer.state_dict(),
                                scaler=scaler.state_dict() if scaler else None)
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, train top-1 {stats['train_top1']:.2f}, "
                  f"val top-1 {stats['val_top1']:.2f}, top-5 {stats['val_top5']:.2f}", flush=True)
    procs.close()


if __name__ == '__main__':
    run_main(main)
