"""MAE pre-training (He et al. 2022) of a ViT, with MAE-Lite's recipe for ViT-Tiny.

The method in five steps, each a method of `MAE` below (encode: of the ViT in vit.py):
  1. patchify:        image -> L patches of p*p*3 pixels
  2. random_masking:  keep a random 25% of the patches per image (argsort of uniform noise)
  3. encode:          the ViT encoder sees only the visible patches (+ cls token)
  4. forward_decoder: a light decoder sees encoded visible tokens + a shared mask token at every
                      masked position, and predicts every patch's pixels
  5. forward_loss:    MSE on the masked patches only, against per-patch normalised pixels

Run `python pretrain_mae.py --help` for the flags; `--config configs/mae_tiny_imagenet.yaml` is the
paper's 400-epoch ImageNet recipe, `--config configs/mae_tiny_fashion_mnist_quick.yaml` a laptop one.
"""
import argparse
import os
import textwrap
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from data import Augmentation, build_dataset, build_loader, eval_transform, normalization, per_image_transform
from data_in_memory import in_memory_loader
from operations import RunError, run_main
from training import (Processes, add_common_args, add_knn_args, adamw, announce, append_log, compile_and_wrap,
                      grad_scaler, knn_due, knn_note, knn_readout, knn_sets, parse_args, prepare_output,
                      resume_checkpoint, save_checkpoint, seed_everything, train_one_epoch, warmup_cosine,
                      weight_decay_groups)
from vit import (MAE_DECODERS, SIZES, Block, CheckpointError, VisionTransformer, encoder_geometry, gather_tokens,
                 load_pretrained, mae_state_dict, read_checkpoint, sincos_pos_embed)

STAGE = 'pretrain_mae'


# --------------------------------------------------------------------------------------------------
# The model: a ViT encoder (inherited, so the keys are timm's) plus MAE's decoder
# --------------------------------------------------------------------------------------------------
class MAE(VisionTransformer):
    """Masked autoencoder with the official parameter names: the encoder's (patch_embed, cls_token,
    pos_embed, blocks, norm) plus decoder_embed, mask_token, decoder_pos_embed, decoder_blocks,
    decoder_norm, decoder_pred. Both position embeddings are fixed 2-D sin-cos tables."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=12,
                 decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3, mlp_ratio=4.0,
                 norm_pix_loss=True):
        super().__init__(img_size, patch_size, in_chans, num_classes=0, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, global_pool=False)
        self.norm_pix_loss = norm_pix_loss
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid)[None], requires_grad=False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self._init_mae_weights()

    def _init_mae_weights(self):
        """MAE's initialisation: xavier-uniform for every Linear and for the patch projection seen as
        a Linear, zero biases, normal(0.02) tokens (LayerNorms keep weight 1, bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # 1. -------------------------------------------------------------------------------------------
    def patchify(self, imgs):
        """(B, C, H, W) -> (B, L, p*p*C), each patch's pixels in (row, column, channel) order: the
        official target order, so official decoders predict our targets (vit.PatchEmbed cuts
        patches as (c p1 p2) instead, the order of its conv weight)."""
        p = self.patch_embed.patch_size
        return rearrange(imgs, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1=p, p2=p)

    def unpatchify(self, patches):
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, g = self.patch_embed.patch_size, self.patch_embed.grid_size
        return rearrange(patches, 'b (h w) (p1 p2 c) -> b c (h p1) (w p2)', h=g, p1=p, p2=p)

    # 2. -------------------------------------------------------------------------------------------
    def random_masking(self, batch_size, mask_ratio, noise=None):
        """Per-sample random masking: the int(L * (1 - mask_ratio)) patches with the lowest noise are
        visible. noise (B, L) defaults to uniform. Returns visible_idx (B, N_visible), mask (B, L)
        with 1 = masked, and restore_idx (B, L) that undoes the noise sort."""
        L = self.patch_embed.num_patches
        num_visible = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch_size, L, device=self.cls_token.device)
        shuffle_idx = torch.argsort(noise, dim=1)                  # ascending: lowest noise first
        restore_idx = torch.argsort(shuffle_idx, dim=1)
        visible_idx = shuffle_idx[:, :num_visible]                  # (B, N_visible)
        mask = torch.ones(batch_size, L, device=noise.device)
        mask[:, :num_visible] = 0
        mask = torch.gather(mask, 1, restore_idx)                   # (B, L), back in patch order
        return visible_idx, mask, restore_idx

    # 4. -------------------------------------------------------------------------------------------
    def forward_decoder(self, latent, restore_idx):
        """latent (B, 1 + N_visible, D) -> pixel predictions for every patch (B, L, p*p*C)."""
        x = self.decoder_embed(latent)                              # (B, 1 + N_visible, D_dec)
        B, L = x.shape[0], restore_idx.shape[1]
        mask_tokens = self.mask_token.expand(B, L - (x.shape[1] - 1), -1)   # (B, N_masked, D_dec)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)         # (B, L, D_dec), shuffled order
        patches = gather_tokens(patches, restore_idx)               # (B, L, D_dec), patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed   # (B, 1 + L, D_dec)
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]       # (B, L, p*p*C), no cls

    # 5. -------------------------------------------------------------------------------------------
    def patch_targets(self, imgs):
        """Pixels to predict (B, L, p*p*C); with norm_pix_loss each patch is normalised by its own
        mean and unbiased variance: (x - mean) / sqrt(var + 1e-6)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """The MAE loss: mean over masked patches of the per-patch MSE,
        sum_i mask_i * mean_j (pred_ij - target_ij)^2 / sum_i mask_i."""
        per_patch = ((pred.float() - self.patch_targets(imgs)) ** 2).mean(dim=-1)   # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L)), as the official code."""
        visible_idx, mask, restore_idx = self.random_masking(imgs.shape[0], mask_ratio, noise)
        latent = self.encode(imgs, visible_idx).tokens              # 3. (B, 1 + N_visible, D)
        pred = self.forward_decoder(latent, restore_idx)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @classmethod
    def from_checkpoint(cls, path, img_size=None, norm_pix_loss=None):
        """An MAE with its decoder from a pre-training checkpoint: ours, official MAE or MAE-Lite
        (vit.mae_state_dict). The size, patch size and native image size (img_size=None) are read
        from the weights (vit.encoder_geometry), and so are the decoder's dim and depth
        (decoder_geometry); its heads, which no weight shows, from our saved args (--decoder-heads),
        else by mae_decoder's rule (the paper's when they divide the dim). norm_pix_loss as given, else
        from our saved args, else on (as MAE-Lite trains). Both position tables are fixed sin-cos
        functions of the grid, so they are rebuilt for the image size rather than loaded."""
        ckpt = read_checkpoint(path)
        state = mae_state_dict(ckpt, path)
        size, patch_size, native_img_size = encoder_geometry(state, path)
        state.pop('pos_embed')
        state.pop('decoder_pos_embed', None)
        saved_args = ckpt['args'] if isinstance(ckpt.get('args'), dict) else {}
        if norm_pix_loss is None:
            norm_pix_loss = saved_args.get('norm_pix_loss', True)
        decoder = mae_decoder(size, *decoder_geometry(state), saved_args.get('decoder_heads'))
        model = cls(**SIZES[size], **decoder, img_size=img_size or native_img_size,
                    patch_size=patch_size, norm_pix_loss=norm_pix_loss)
        own = model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        missing = [k for k in own if k not in state and k not in ('pos_embed', 'decoder_pos_embed')]
        if wrong or missing:
            raise CheckpointError(f"{path} does not fit {size}'s MAE: "
                                  f"{'; '.join(wrong[:3] + [f'missing {k}' for k in missing[:3]])}")
        model.load_state_dict(state, strict=False)
        return model


def mae_decoder(size, dim=None, depth=None, heads=None):
    """The decoder of an MAE with a `size` encoder, as MAE's keywords: the paper's (vit.MAE_DECODERS;
    ViT-Tiny: MAE-Lite's light decoder, dim 96, depth 1, 3 heads) with what is given replaced (the
    --decoder-dim / --decoder-depth / --decoder-heads ablations). Heads not given: the paper's when
    they divide the dim, else the count whose head width is nearest 32, the paper decoders' width."""
    paper = MAE_DECODERS[size]
    dim = paper['decoder_embed_dim'] if dim is None else dim
    depth = paper['decoder_depth'] if depth is None else depth
    if dim < 4 or dim % 4:      # the sin-cos position table splits the dim in four
        raise RunError(f"--decoder-dim {dim}: the decoder's width must be a positive multiple of 4")
    if depth < 1:
        raise RunError(f"--decoder-depth {depth}: the decoder needs at least one block")
    paper_heads = paper['decoder_num_heads']
    default_heads = paper_heads if dim % paper_heads == 0 else \
        min((h for h in range(1, dim + 1) if dim % h == 0), key=lambda h: abs(dim / h - 32))
    heads = default_heads if heads is None else heads
    if heads < 1 or dim % heads:
        raise RunError(f"--decoder-dim {dim} does not split into --decoder-heads {heads}: pick a head "
                       f"count that divides it, e.g. {default_heads} (the default for this width)")
    return dict(decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=heads)


def decoder_geometry(state):
    """(dim, depth) of the MAE decoder in a state dict, read from its weights: decoder_embed's output
    width and the number of decoder_blocks.N."""
    blocks = {int(k.split('.')[1]) for k in state if k.startswith('decoder_blocks.')}
    return state['decoder_embed.weight'].shape[0], len(blocks)


def build_mae(size, decoder_dim=None, decoder_depth=None, decoder_heads=None, **kwargs):
    """The MAE of a size in vit.SIZES with the decoder of `mae_decoder` (by default the paper's)."""
    return MAE(**SIZES[size], **mae_decoder(size, decoder_dim, decoder_depth, decoder_heads), **kwargs)


def init_mae(model, path):
    """--init: the encoder from any known checkpoint (vit.load_pretrained; a final norm it lacks, as
    a fine-tuned global-pool model, starts fresh), and the decoder too when the checkpoint holds an
    MAE decoder of the same shape (ours, MAE-Lite's, official MAE's visualisation ones), so that
    pre-training continues. -> the line that says what was loaded."""
    report = load_pretrained(model, path, allow_new=('decoder', 'mask_token', 'norm.'))
    new = [k for k in report.new if not k.startswith(('decoder', 'mask_token'))]
    return (f"init from {path}: {len(report.loaded)} encoder tensors loaded (new: {', '.join(new) or 'none'}; "
            f"ignored: {', '.join(report.ignored) or 'none'}); decoder: {load_decoder(model, path)}")


def load_decoder(model, path):
    """Load the MAE decoder (decoder_*, mask_token) of the checkpoint at `path` into `model` when it
    has one of the same shape; the fixed sin-cos decoder_pos_embed stays as built. -> what happened."""
    try:
        state = mae_state_dict(read_checkpoint(path), path)
    except CheckpointError:             # no decoder_pred: an encoder alone (fine-tuned, MoCo, timm)
        return "none in the checkpoint, starts fresh"

    def decoder_part(sd):
        return {k: v for k, v in sd.items() if k.startswith(('decoder', 'mask_token')) and k != 'decoder_pos_embed'}

    theirs, own = decoder_part(state), decoder_part(model.state_dict())
    if theirs.keys() != own.keys() or any(theirs[k].shape != v.shape for k, v in own.items()):
        def shape(sd):
            dim, depth = decoder_geometry(sd)
            return f"dim {dim}, depth {depth}, {sd['decoder_pred.weight'].shape[0]} values per patch"
        return f"another shape ({shape(theirs)} vs {shape(own)}), starts fresh"
    model.load_state_dict(theirs, strict=False)
    return f"loaded ({len(theirs)} tensors)"


def mean_patch_token(mae, imgs):
    """--knn-every's feature of an MAE (D-MAE's student too): imgs (B, 3, H, W), all patches visible ->
    the mean of the patch tokens after the encoder's final norm (B, D). Not the cls token: MAE's loss
    barely trains it."""
    return mae.encode(imgs).tokens[:, 1:].mean(dim=1)                # tokens (B, 1 + L, D)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=400, warmup_epochs=40, batch_size=256, blr=1.5e-4, weight_decay=0.05)
    g = parser.add_argument_group('MAE')
    g.add_argument('--mask-ratio', type=float, default=0.75, help='share of patches masked (paper: 0.75)')
    g.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction, default=True,
                   help='regress per-patch normalised pixels (paper: on)')
    g.add_argument('--min-crop-scale', type=float, default=0.08,
                   help='RandomResizedCrop scale lower bound (paper: 0.08; official MAE: 0.2)')
    g.add_argument('--decoder-dim', type=int, default=None,
                   help="decoder width, a multiple of 4 (default: the size's paper decoder, vit.MAE_DECODERS: "
                        "ViT-Tiny 96 (MAE-Lite), ViT-Small 192, ViT-Base 512 (official MAE))")
    g.add_argument('--decoder-depth', type=int, default=None,
                   help='decoder blocks (default: the paper\'s: ViT-Tiny 1, ViT-Small 1, ViT-Base 8)')
    g.add_argument('--decoder-heads', type=int, default=None,
                   help="decoder attention heads, dividing the width (default: the paper's, ViT-Tiny 3, "
                        "ViT-Small 6, ViT-Base 16, when they divide --decoder-dim, else heads of width ~32)")
    add_knn_args(parser)
    return parser


def pretrain_data(args, procs):
    """The training loader (MAE's augmentation) and 6 validation images for the reconstruction figure
    (of a folder of unlabelled images, which has no val split: 6 training images, in the eval view);
    shared with pretrain_distill.py. The labels are never used (--classes only picks the images)."""
    augmentation = Augmentation(min_scale=args.min_crop_scale)      # crop + flip, nothing else
    stats = normalization(args.data)
    if args.data_on_device:     # a speed path for small data sets (data_in_memory.py)
        loader, _, _ = in_memory_loader(args.data, args.data_root, True, args.img_size, args.batch_size,
                                        augmentation, stats, subset=args.subset, classes=args.classes,
                                        device=procs.device, seed=args.seed, rank=procs.rank,
                                        world_size=procs.world_size, unlabelled=True)
    else:
        dataset, _ = build_dataset(args.data, args.data_root, train=True, subset=args.subset,
                                   classes=args.classes, unlabelled=True,
                                   transform=per_image_transform(augmentation, args.img_size, stats))
        loader = build_loader(dataset, args.batch_size, train=True, num_workers=args.num_workers,
                              device=procs.device, seed=args.seed, rank=procs.rank, world_size=procs.world_size,
                              strict_images=args.strict_images)
    shown, _ = build_dataset(args.data, args.data_root, train=False, classes=args.classes, unlabelled=True,
                             transform=eval_transform(args.img_size, stats=stats))
    shown_imgs = torch.stack([shown[i][0] for i in range(min(6, len(shown)))])  # (6, 3, H, W)
    return loader, shown_imgs


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if not 0 < args.mask_ratio < 1:
        raise RunError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    mae_decoder(args.model, args.decoder_dim, args.decoder_depth, args.decoder_heads)   # bad flags: before the data
    procs = Processes(args.device)
    seed_everything(args.seed)

    # data ------------------------------------------------------------------------------------------
    knn = knn_sets(args)                        # --knn-every's labelled images, or None
    loader, shown_imgs = pretrain_data(args, procs)

    # model and optimizer ---------------------------------------------------------------------------
    model = build_mae(args.model, args.decoder_dim, args.decoder_depth, args.decoder_heads, img_size=args.img_size,
                      patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss).to(procs.device)
    if args.init:
        message = init_mae(model, args.init)
        if procs.is_main:
            print(message)
    effective_batch = args.batch_size * args.accum_iter * procs.world_size
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256   # the linear scaling rule
    lr_at = warmup_cosine(lr, args.min_lr, args.warmup_epochs, args.epochs)
    optimizer = adamw(weight_decay_groups(model, args.weight_decay), lr, (0.9, 0.95), procs.device)
    scaler = grad_scaler(args.amp, procs.device)                  # fp16 only
    start_epoch, _ = resume_checkpoint(args.resume, STAGE, optimizer, scaler, model=model)
    train_model = compile_and_wrap(model, procs, args.compile, args.compile_mode)
    out = Path(args.output_dir)
    announce(procs, model, lr, effective_batch, out,
             f" | decoder dim {model.decoder_embed.out_features}, depth {len(model.decoder_blocks)}, "
             f"{model.decoder_blocks[0].attn.num_heads} heads"
             f" | {len(loader.sampler) * procs.world_size} images, {len(loader)} steps/epoch", amp=args.amp)
    log = prepare_output(out, args, start_epoch, procs.is_main)

    # the loop --------------------------------------------------------------------------------------
    def losses(imgs, labels, epoch_frac):       # MAE's loss on a batch; the labels are not used
        loss, _, _ = train_model(imgs, mask_ratio=args.mask_ratio)
        return {'loss': loss}

    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(train_model, loader, optimizer, losses, lr_at, epoch, procs,
                                accum_iter=args.accum_iter, amp=args.amp, scaler=scaler, seed=args.seed)
        if procs.is_main:
            if knn_due(epoch, args):            # the main process only: the others go on to the next epoch
                stats.update(knn_readout(model, lambda imgs: mean_patch_token(model, imgs), knn, procs, args))
            append_log(log, {'epoch': epoch, **stats})
            save_checkpoint(out / 'checkpoint.pth', stage=STAGE, epoch=epoch, args=vars(args),
                            model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict() if scaler else None)
            save_reconstruction_figure(model, shown_imgs, out / 'reconstruction.png',
                                       f"MAE {args.model}, epoch {epoch}, loss {stats['loss']:.3f}",
                                       normalization(args.data), args.mask_ratio)
            print(f"epoch {epoch}: loss {stats['loss']:.4f}{knn_note(stats)}, {stats['img_per_s']:.0f} img/s, "
                  f"checkpoint {out / 'checkpoint.pth'}", flush=True)
    procs.close()


# --------------------------------------------------------------------------------------------------
# The figure: original / masked / reconstruction / reconstruction with the visible patches pasted
# --------------------------------------------------------------------------------------------------
RECONSTRUCTION = 'reconstruction (visible patches greyed: not trained)'
GREYED = 0.7        # the share of mid-grey blended into the reconstruction of a visible patch


@torch.no_grad()
def reconstruction_columns(model, imgs, stats, mask_ratio=0.75, seed=0):
    """The figure's columns for a few images (normalised with `stats`, data.normalization) through the
    MAE with a fixed masking (noise from `seed`): {title: (B, 3, H, W) normalised}, and the mask (B, L).
    The reconstruction column shows a visible patch's prediction blended GREYED towards mid-grey: the
    loss never sees it, so it is not what the MAE learnt."""
    was_training = model.training
    model.eval()
    imgs = imgs.to(model.cls_token.device)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches,
                       generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    _, pred, mask = model(imgs, mask_ratio, noise)
    model.train(was_training)

    patches = model.patchify(imgs)                                  # (B, L, p*p*3)
    if model.norm_pix_loss:   # the prediction is in normalised-patch units: undo with each patch's stats
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred.float() * (var + 1e-6) ** 0.5 + mean
    masked = model.unpatchify(patches * (1 - mask[..., None]))
    recon = model.unpatchify(pred)
    pasted = model.unpatchify(pred * mask[..., None] + patches * (1 - mask[..., None]))

    mean = torch.tensor(stats[0], device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], device=imgs.device).view(1, 3, 1, 1)
    grey = (0.5 - mean) / std                                       # mid-grey, normalised (1, 3, 1, 1)
    masked_pixels = model.unpatchify(mask[..., None].expand_as(patches))   # (B, 3, H, W), 1 = masked
    greyed = masked_pixels * recon + (1 - masked_pixels) * ((1 - GREYED) * recon + GREYED * grey)
    columns = {'original': imgs, f'masked {mask_ratio:.0%}': masked, RECONSTRUCTION: greyed,
               'reconstruction + visible': pasted}
    return columns, mask


def save_reconstruction_figure(model, imgs, path, title, stats, mask_ratio=0.75, seed=0):
    """Plot `reconstruction_columns` of a few images to the PNG at `path`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    columns, _ = reconstruction_columns(model, imgs, stats, mask_ratio, seed)
    mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(stats[1]).view(1, 3, 1, 1)
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for col, (name, batch) in enumerate(columns.items()):
        pictures = (batch.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for row in range(n):
            axes[row, col].imshow(pictures[row])
            axes[row, col].axis('off')
        axes[0, col].set_title(textwrap.fill(name, 24), fontsize=9)
    note = ("prediction is in normalised-patch units (norm_pix_loss), shown de-normalised with each "
            "patch's own mean and std" if model.norm_pix_loss else "raw pixel prediction")
    note += "; the loss ignores the visible patches, so their prediction is untrained noise (greyed)"
    width = int(8 * 72 / (8 * 0.75))        # characters of 8 pt (0.6 em wide, and a margin) in 8 inches
    fig.suptitle('\n'.join(textwrap.wrap(title, width) + textwrap.wrap(note, width)), fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format='png', dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == '__main__':
    run_main(main)
