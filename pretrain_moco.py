"""MoCo v3 pre-training (Chen, Xie and He 2021) of a ViT: the paper's contrastive baseline for ViT-Tiny
(76.8 ImageNet top-1 after fine-tuning, against 78.0 from MAE).

The method in five steps, each a function or method below:
  1. two views:        each image is augmented twice, asymmetrically (BYOL's recipe, `moco_views`)
  2. queries:          the base encoder (a ViT with fixed sin-cos positions: `moco_vit`)
                       -> cls feature -> projector (3-layer MLP) -> predictor (2-layer MLP), per view
  3. update_momentum:  the momentum encoder and projector move towards the base ones,
                       theta_k <- m theta_k + (1 - m) theta_q, m rising from 0.99 to 1 by a
                       half-cosine over training (`momentum_at`)
  4. keys:             the momentum encoder + projector on each view, without gradient, gathered from
                       every process (`gather_keys`)
  5. contrastive_loss: InfoNCE of each view's queries against the other view's keys: the same image
                       is the positive, every other image of the global batch a negative; temperature
                       T, scaled by 2T, summed over the two directions

Run `python pretrain_moco.py --help` for the flags; `--config configs/moco_tiny_imagenet.yaml` is the
paper's 400-epoch ImageNet recipe, `--config configs/moco_tiny_fashion_mnist_quick.yaml` a CPU one.
The checkpoint's `model` is the base encoder with timm's names, so finetune.py, linear_probe.py and
analyze.py read it as they read any encoder; the heads and the momentum branch are kept beside it.
"""
import argparse
import copy
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_loader, normalization, to_normalized_tensor
from operations import RunError, run_main
from training import (Processes, add_common_args, add_knn_args, adamw, announce, append_log, compile_and_wrap,
                      grad_scaler, knn_due, knn_note, knn_readout, knn_sets, parse_args, prepare_output,
                      resume_checkpoint, save_checkpoint, seed_everything, train_one_epoch, warmup_cosine)
from vit import load_pretrained, sincos_pos_embed, vit

STAGE = 'pretrain_moco'


# --------------------------------------------------------------------------------------------------
# 1. The two views: BYOL's asymmetric augmentation, drawn image by image
# --------------------------------------------------------------------------------------------------
def byol_view(img_size, stats, blur_p, solarize_p, min_scale=0.08):
    """One of BYOL's two augmentations (Grill et al. 2020) as MoCo v3 applies it, PIL image -> float
    tensor (3, img_size, img_size), in this order: RandomResizedCrop (area share ~ U(min_scale, 1),
    bilinear, as MoCo v3), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with
    p 0.8, grayscale with p 0.2, Gaussian blur with p `blur_p`, solarize (values >= 128 inverted) with
    p `solarize_p`, horizontal flip, normalisation with `stats`. The blur's sigma ~ U(0.1, 2.0) px
    with a 23 px kernel at 224 px, both scaled with the image size, so it blurs the same share of
    any image."""
    scale = img_size / 224
    return v2.Compose([
        v2.RGB(),
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(2 * round(11 * scale) + 1, sigma=(0.1 * scale, 2.0 * scale))],
                       p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.RandomHorizontalFlip(),
        *to_normalized_tensor(stats),
    ])


class TwoViews:
    """Two augmentations of one image: PIL image -> (2, 3, H, W); the default collate makes a batch
    of them (B, 2, 3, H, W)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return torch.stack([self.first(img), self.second(img)])


def moco_views(img_size, stats=(IMAGENET_MEAN, IMAGENET_STD), min_scale=0.08):
    """MoCo v3's asymmetric pair: the first view always blurred and never solarised, the second
    blurred with p 0.1 and solarised with p 0.2 (BYOL's recipe)."""
    return TwoViews(byol_view(img_size, stats, blur_p=1.0, solarize_p=0.0, min_scale=min_scale),
                    byol_view(img_size, stats, blur_p=0.1, solarize_p=0.2, min_scale=min_scale))


# --------------------------------------------------------------------------------------------------
# The encoder and the heads
# --------------------------------------------------------------------------------------------------
def moco_vit(size, img_size, patch_size, stop_grad_conv1=False):
    """MoCo v3's ViT: vit.py's encoder of `size` without head, (B, 3, H, W) -> (B, D), the feature
    being the cls token after the final norm; a fixed 2-D sin-cos position embedding; MoCo v3's
    initialisation. stop_grad_conv1 freezes the random patch projection (MoCo v3's fix for the
    instability of ViT-S/B training, whose gradient spikes start in the first layer); MAE-Lite trains
    it for ViT-Tiny (its mocov3_exp.py: stop_grad_conv1 = False), the default here."""
    encoder = vit(size, img_size=img_size, patch_size=patch_size, num_classes=0, global_pool=False)
    grid = encoder.patch_embed.grid_size
    encoder.pos_embed = nn.Parameter(sincos_pos_embed(encoder.embed_dim, grid)[None], requires_grad=False)
    init_moco_vit(encoder)
    encoder.patch_embed.proj.requires_grad_(not stop_grad_conv1)
    return encoder


@torch.no_grad()
def init_moco_vit(encoder):
    """MoCo v3's initialisation: xavier-uniform for every Linear, with q, k and v each initialised
    as its own (D, D) matrix; xavier-uniform for the patch projection seen as a Linear (bound
    sqrt(6 / (3 p^2 + D))); zero biases; cls token normal(1e-6). LayerNorms keep weight 1, bias 0."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            for weight in module.weight.chunk(3) if name.endswith('qkv') else [module.weight]:
                nn.init.xavier_uniform_(weight)
            nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.view(encoder.embed_dim, -1))
    nn.init.zeros_(encoder.patch_embed.proj.bias)
    nn.init.normal_(encoder.cls_token, std=1e-6)


def mlp(num_layers, in_dim, hidden_dim, out_dim):
    """MoCo v3's head, (B, in_dim) -> (B, out_dim): (Linear without bias, BatchNorm, ReLU) for each
    hidden layer, then Linear without bias and BatchNorm without affine."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        width = out_dim if last else hidden_dim
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, width, bias=False))
        layers.append(nn.BatchNorm1d(width, affine=not last))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# The momentum schedule, the keys of every process, the loss
# --------------------------------------------------------------------------------------------------
def momentum_at(epoch, base_momentum, epochs):
    """MoCo v3's momentum at a fractional epoch, rising from base_momentum to 1 by a half-cosine:
    m = 1 - (1 - base_momentum) (1 + cos(pi epoch / epochs)) / 2."""
    return 1 - (1 - base_momentum) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def process_rank_and_count():
    """(rank, world size) of this process in its process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_keys(keys):
    """(B, C) keys of this process -> (world size x B, C): every process's keys, in rank order. No
    gradient flows through the keys (all_gather carries none, and the keys need none)."""
    _, world_size = process_rank_and_count()
    if world_size == 1:
        return keys
    gathered = [torch.empty_like(keys) for _ in range(world_size)]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered)


def contrastive_loss(queries, keys, temperature, rank=0):
    """MoCo v3's InfoNCE. queries (B, C) of process `rank`, keys (world size x B, C) of the global
    batch: query i's positive is the key of its own image, row rank x B + i; every other key is a
    negative. With q and k L2-normalised,
        loss = 2T * mean_i -log( exp(q_i . k_(rank B + i) / T) / sum_j exp(q_i . k_j / T) ),
    the cross-entropy of the logits q k^T / T, times MoCo v3's 2T. The logits are fp32 under any
    autocast: at T = 0.2 they reach +-5 and feed an exp, where fp16 or bf16 rounding shows."""
    with torch.autocast(queries.device.type, enabled=False):
        q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
        logits = q @ k.T / temperature                                    # (B, world size x B)
        positives = torch.arange(len(q), device=q.device) + rank * len(q)  # (B,)
        return F.cross_entropy(logits, positives) * 2 * temperature


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class MoCo(nn.Module):
    """MoCo v3: the base encoder with its projector and predictor, trained by gradient; the momentum
    encoder and projector, a moving average of the base ones. `encoder` maps (B, 3, H, W) -> (B, D)
    (`moco_vit`)."""

    def __init__(self, encoder, mlp_dim=4096, out_dim=256, temperature=0.2):
        super().__init__()
        self.temperature = temperature
        self.encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, out_dim)
        self.predictor = mlp(2, out_dim, mlp_dim, out_dim)     # ends in BatchNorm too, as in MAE-Lite's
        # MoCo v3 (facebookresearch/moco-v3 later dropped the predictor's last BatchNorm)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def parts(self):
        """The checkpoint's pieces by name; `model` is the base encoder, as every stage reads it."""
        return {'model': self.encoder, 'projector': self.projector, 'predictor': self.predictor,
                'momentum_encoder': self.momentum_encoder, 'momentum_projector': self.momentum_projector}

    @torch.no_grad()
    def update_momentum(self, m):
        """3. theta_k <- m theta_k + (1 - m) theta_q for every parameter of the encoder and projector."""
        base = [*self.encoder.parameters(), *self.projector.parameters()]
        moving = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        for theta_q, theta_k in zip(base, moving):
            theta_k.mul_(m).add_(theta_q, alpha=1 - m)

    def forward(self, views, momentum):
        """views (B, 2, 3, H, W): two views of each image; momentum: this step's m -> the loss (0-d).
        As in the official code, the momentum branch is updated here, before it computes the keys."""
        x1, x2 = views.unbind(dim=1)                                      # each (B, 3, H, W)
        q1 = self.predictor(self.projector(self.encoder(x1)))             # 2. (B, out_dim)
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            self.update_momentum(momentum)                                # 3.
            k1 = gather_keys(self.momentum_projector(self.momentum_encoder(x1)))   # 4. (world x B, out_dim)
            k2 = gather_keys(self.momentum_projector(self.momentum_encoder(x2)))
        rank, _ = process_rank_and_count()
        return (contrastive_loss(q1, k2, self.temperature, rank)         # 5.
                + contrastive_loss(q2, k1, self.temperature, rank))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # batch 128 per process: the paper's 1024 on 8 GPUs
    add_common_args(parser, epochs=400, warmup_epochs=40, batch_size=128, blr=1.5e-4, weight_decay=0.1,
                    data_on_device=False)
    g = parser.add_argument_group('MoCo v3')
    g.add_argument('--moco-m', type=float, default=0.99,
                   help='momentum of the momentum encoder at the start; it rises to 1 by a half-cosine '
                        '(paper: 0.99)')
    g.add_argument('--moco-t', type=float, default=0.2, help='temperature T of the InfoNCE loss (paper: 0.2)')
    g.add_argument('--mlp-dim', type=int, default=4096,
                   help='hidden width of the projector and predictor MLPs (paper: 4096)')
    g.add_argument('--out-dim', type=int, default=256,
                   help='output width of the projector and predictor (paper: 256)')
    g.add_argument('--min-crop-scale', type=float, default=0.08,
                   help='RandomResizedCrop scale lower bound of both views (paper: 0.08)')
    g.add_argument('--stop-grad-conv1', action=argparse.BooleanOptionalAction, default=False,
                   help="freeze the random patch projection (MoCo v3's ViT-S/B recipe); MAE-Lite's ViT-Tiny "
                        "recipe trains it (default: off, trained)")
    add_knn_args(parser)
    return parser


def moco_optimizer(model, lr, weight_decay, device):
    """AdamW, betas (0.9, 0.999), with weight decay on every trained parameter, norms and biases
    included (MoCo v3); the fixed position embedding (and a frozen patch projection) are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return adamw([{'params': trained, 'weight_decay': weight_decay}], lr, (0.9, 0.999), device)


def compile_encoders(model, enabled, mode):
    """torch.compile the two encoders in place, when enabled: the momentum update and the key gather
    stay eager (no tracing of in-place parameter updates or of collectives)."""
    if enabled:
        model.encoder.compile(mode=mode)
        model.momentum_encoder.compile(mode=mode)


def step_momentum(epoch_frac, base_momentum, epochs, accum_iter):
    """The momentum of one micro-batch at the fractional epoch `epoch_frac`. The accum_iter
    micro-batches of one optimizer step see the same base weights, so each moves the momentum branch
    with m^(1/accum_iter): together exactly one update with m = momentum_at(epoch_frac)."""
    return momentum_at(epoch_frac, base_momentum, epochs) ** (1 / accum_iter)


def moco_data(args, procs):
    """The training loader: each image as its two views, batches (B, 2, 3, H, W). The labels are never
    used (--classes only picks the images)."""
    views = moco_views(args.img_size, normalization(args.data), args.min_crop_scale)
    dataset, _ = build_dataset(args.data, args.data_root, train=True, transform=views,
                               subset=args.subset, classes=args.classes, unlabelled=True)
    return build_loader(dataset, args.batch_size, train=True, num_workers=args.num_workers,
                        device=procs.device, seed=args.seed, rank=procs.rank, world_size=procs.world_size,
                        strict_images=args.strict_images)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if not 0 <= args.moco_m <= 1:
        raise RunError(f"--moco-m must be in [0, 1], got {args.moco_m}")
    if args.moco_t <= 0:
        raise RunError(f"--moco-t must be positive, got {args.moco_t}")
    procs = Processes(args.device)
    seed_everything(args.seed)

    # data ------------------------------------------------------------------------------------------
    knn = knn_sets(args)                        # --knn-every's labelled images, or None
    loader = moco_data(args, procs)

    # model and optimizer ---------------------------------------------------------------------------
    encoder = moco_vit(args.model, args.img_size, args.patch_size, args.stop_grad_conv1)
    if args.init:
        report = load_pretrained(encoder, args.init)
        if procs.is_main:
            print(f"init from {args.init}: {report.summary()}")
    model = MoCo(encoder, args.mlp_dim, args.out_dim, args.moco_t).to(procs.device)
    if procs.distributed and procs.device.type == 'cuda':
        # the heads normalise over the global batch, as MoCo v3 (SyncBatchNorm runs on GPUs only: CPU
        # processes normalise their own batch)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    effective_batch = args.batch_size * args.accum_iter * procs.world_size
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256   # the linear scaling rule
    lr_at = warmup_cosine(lr, args.min_lr, args.warmup_epochs, args.epochs)
    optimizer = moco_optimizer(model, lr, args.weight_decay, procs.device)
    scaler = grad_scaler(args.amp, procs.device)                  # fp16 only
    start_epoch, _ = resume_checkpoint(args.resume, STAGE, optimizer, scaler, **model.parts())
    compile_encoders(model, args.compile, args.compile_mode)
    train_model = compile_and_wrap(model, procs, compile=False)
    out = Path(args.output_dir)
    announce(procs, model, lr, effective_batch, out,
             f" | {len(loader.sampler) * procs.world_size} images, {len(loader)} steps/epoch", amp=args.amp)
    log = prepare_output(out, args, start_epoch, procs.is_main)

    # the loop --------------------------------------------------------------------------------------
    def losses(views, labels, epoch_frac):        # MoCo v3's loss; the labels are not used
        momentum = step_momentum(epoch_frac, args.moco_m, args.epochs, args.accum_iter)
        return {'loss': train_model(views, momentum)}

    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(train_model, loader, optimizer, losses, lr_at, epoch, procs,
                                accum_iter=args.accum_iter, amp=args.amp, scaler=scaler, seed=args.seed)
        if procs.is_main:
            if knn_due(epoch, args):            # the cls feature the loss trains; the main process only
                stats.update(knn_readout(model, model.encoder, knn, procs, args))
            append_log(log, {'epoch': epoch, **stats})
            save_checkpoint(out / 'checkpoint.pth', stage=STAGE, epoch=epoch, args=vars(args),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                            **{name: part.state_dict() for name, part in model.parts().items()})
            print(f"epoch {epoch}: loss {stats['loss']:.4f}{knn_note(stats)}, {stats['img_per_s']:.0f} img/s, "
                  f"checkpoint {out / 'checkpoint.pth'}", flush=True)
    procs.close()


if __name__ == '__main__':
    run_main(main)
