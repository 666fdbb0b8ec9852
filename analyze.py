"""The paper's analysis tools (MAE-Lite, Sec. 4): what do the layers of a pre-trained ViT learn?

  cka          layer-by-layer linear CKA between two models (minibatch, unbiased HSIC estimator of
               Nguyen, Raghu & Kornblith 2021) on a data set's val split: a (depth+1) x (depth+1) heatmap
  attention    per layer and head: mean attention distance (pixels) and attention entropy among patch
               tokens, as the paper's two scatter plots (heads as dots, the layer mean as a line);
               --maps also draws each head's cls-token attention over a few images
  embed        every image's feature (the normed cls token, or fc_norm of the mean patch token) with
               its label and path, as .npy files for your own analysis
  reconstruct  an MAE's original / masked / reconstruction figure, the one pre-training draws, and its
               held-out loss

A checkpoint is any of ours, official MAE, MAE-Lite or timm/DeiT, pre-trained or fine-tuned; `random`
is a random-init encoder (--model, --patch-size, --seed). A checkpoint's size (tiny/small/base by
width), patch size and native image size are read from its weights; --img-size overrides the size
the images are shown at (position embeddings are then resized).

Examples:
  python analyze.py cka --a output/mae/checkpoint.pth --b random --patch-size 4 --data fashion_mnist
  python analyze.py attention --ckpt mae_tiny_400e.pth.tar --data /datasets/imagenet --maps
  python analyze.py embed --ckpt output/mae/checkpoint.pth --data /datasets/imagenet --feature avg
  python analyze.py reconstruct --ckpt output/mae/checkpoint.pth
"""
import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import Selection, build_dataset, eval_transform, normalization
from pretrain_mae import MAE, save_reconstruction_figure
from operations import RunError, run_main
from training import default_num_workers
from vit import SIZES, encoder_geometry, encoder_state_dict, load_pretrained, read_checkpoint, vit

# CKA's last layer (--last-layer): what each choice reads, as the figure and the printout say it
LAST_LAYERS = {'fc_norm': "fc_norm on the last block's tokens (a fresh LayerNorm where a model has none)",
               'norm': "each model's own final norm (its fc_norm, else its trained norm)"}
# embed's --feature: build_encoder's layout whose pool() gives it, and what it is
EMBED_FEATURES = {'cls': ('cls', "the normed cls token, as linear_probe's --feature cls"),
                  'avg': ('fc_norm', "fc_norm of the mean patch token (fresh where a checkpoint has none), "
                                     "as linear_probe's --feature avg")}


# --------------------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------------------
def unbiased_hsic(K, L):
    """Unbiased HSIC estimator (Song et al. 2012) of n x n Gram matrices, batched over leading dims
    (broadcast). With K~, L~ = K, L with zeroed diagonals and 1 the all-ones vector:
        HSIC1 = [tr(K~L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    K (..., n, n), L (..., n, n) -> (...). Needs n > 3."""
    n = K.shape[-1]
    K = K * (1 - torch.eye(n, dtype=K.dtype, device=K.device))
    L = L * (1 - torch.eye(n, dtype=L.dtype, device=L.device))
    trace_KL = (K * L).sum(dim=(-2, -1))                     # tr(KL) = sum_ij K_ij L_ji, L symmetric
    sums = K.sum(dim=(-2, -1)) * L.sum(dim=(-2, -1)) / ((n - 1) * (n - 2))
    cross = (K.sum(dim=-2) * L.sum(dim=-1)).sum(dim=-1)      # 1'KL1 = (K'1) . (L1)
    return (trace_KL + sums - 2 / (n - 2) * cross) / (n * (n - 3))


def minibatch_cka(batches):
    """Linear CKA between every layer i of model X and every layer j of model Y, accumulated over
    minibatches b (Nguyen et al. 2021), with K = X Xᵀ and L = Y Yᵀ per batch:
        CKA_ij = mean_b HSIC1(K_i, L_j) / sqrt(mean_b HSIC1(K_i, K_i) * mean_b HSIC1(L_j, L_j)).
    `batches` yields (xs, ys): lists of per-layer features, each (n, features) for the same n images
    (feature sizes may differ between layers and models). Returns (layers of X, layers of Y), float64."""
    hsic_xy = hsic_xx = hsic_yy = 0.0
    num_batches = 0
    for xs, ys in batches:
        K = torch.stack([x.double() @ x.double().T for x in xs])      # (Lx, n, n)
        L = torch.stack([y.double() @ y.double().T for y in ys])      # (Ly, n, n)
        hsic_xy = hsic_xy + unbiased_hsic(K[:, None], L[None])        # (Lx, Ly)
        hsic_xx = hsic_xx + unbiased_hsic(K, K)                       # (Lx,)
        hsic_yy = hsic_yy + unbiased_hsic(L, L)                       # (Ly,)
        num_batches += 1
    hsic_xy, hsic_xx, hsic_yy = hsic_xy / num_batches, hsic_xx / num_batches, hsic_yy / num_batches
    return hsic_xy / torch.sqrt(hsic_xx[:, None] * hsic_yy[None, :])


def patch_attention(attn_logits):
    """Attention among patch tokens only: cut the cls query row and key column of the pre-softmax
    logits and softmax again over the N patch keys. (B, heads, 1+N, 1+N) -> (B, heads, N, N)."""
    return attn_logits[:, :, 1:, 1:].softmax(dim=-1)


def cls_attention(attn_logits):
    """Where the cls token looks: its query row of the pre-softmax logits z, the cls key cut and
    softmax again over the N patch keys,  a_j = exp(z_0j) / sum_k exp(z_0k),  j, k = 1..N.
    (B, heads, 1+N, 1+N) -> (B, heads, N)."""
    return attn_logits[:, :, 0, 1:].softmax(dim=-1)


def attention_distance(attn, grid_size, patch_size):
    """Mean attention distance in pixels, per image and head: the expected distance between a query
    patch centre c_i and the key patch centres c_j (grid units), times the patch size, averaged over
    queries:  (patch_size / N) sum_i sum_j p_ij ||c_i - c_j||.  attn (B, heads, N, N) -> (B, heads)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing='ij')
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()   # (N, 2), row-major
    distance = torch.cdist(centres, centres).to(attn.device)                  # (N, N)
    return (attn * distance).sum(dim=-1).mean(dim=-1) * patch_size


def attention_entropy(attn):
    """Attention entropy per image and head, averaged over queries i:
        -(1/N) sum_i sum_j p_ij ln(p_ij + 1e-6).   attn (B, heads, N, N) -> (B, heads)."""
    return -(attn * torch.log(attn + 1e-6)).sum(dim=-1).mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------
def build_encoder(spec, args, img_size=None, seed_offset=0, last_layer='fc_norm'):
    """A VisionTransformer encoder (no head) in eval mode for images of `img_size` (None: a
    checkpoint's native size, 224 for `random`), and a label for plots.

    `random`: --model with --patch-size, seeded by --seed (+ seed_offset, so that two random models
    differ). A checkpoint: its size, patch size and native image size come from its weights.
    `last_layer` picks the final normed output, CKA's last layer (see LAST_LAYERS):
      'fc_norm' (the paper's, as MAE-Lite's tool): every model is a global-pool model, whose last layer
                is fc_norm on the last block's tokens: the checkpoint's own fc_norm when it has one
                (fine-tuned with global pooling), else a fresh LayerNorm (weight 1, bias 0, eps 1e-6);
                the trained `norm` of an MAE / MAE-Lite / DeiT checkpoint is left out;
      'norm':   the checkpoint's own final norm: its fc_norm when it has one, else its trained `norm`
                (a cls model);
      'cls':    a cls model whatever the checkpoint (embed's --feature cls, linear_probe's cls
                feature): its trained `norm`, a fresh one where it has none; its fc_norm is left out."""
    if spec == 'random':
        torch.manual_seed(args.seed + seed_offset)
        img_size = img_size or 224
        check_divisible(img_size, args.patch_size, spec)
        model = vit(args.model, img_size=img_size, patch_size=args.patch_size, num_classes=0,
                    global_pool=last_layer == 'fc_norm')
        return model.eval(), f"random-init {args.model}"
    state = encoder_state_dict(read_checkpoint(spec))
    size, patch_size, native_img_size = encoder_geometry(state, spec)
    img_size = img_size or native_img_size
    check_divisible(img_size, patch_size, spec)
    global_pool = {'fc_norm': True, 'norm': 'fc_norm.weight' in state, 'cls': False}[last_layer]
    model = vit(size, img_size=img_size, patch_size=patch_size, num_classes=0, global_pool=global_pool)
    # a fresh nn.LayerNorm is weight 1, bias 0: it stays so unless the checkpoint brings its own
    fresh = {'fc_norm': ('fc_norm.',), 'norm': (), 'cls': ('norm.',)}[last_layer]
    load_pretrained(model, spec, allow_new=fresh)
    return model.eval(), f"{spec} ({size}, patch {patch_size})"


def check_divisible(img_size, patch_size, spec):
    if img_size % patch_size:
        raise RunError(f"--img-size {img_size} is not divisible by the patch size {patch_size} of {spec}")


def val_images(args, img_size):
    """A fixed random sample of --num-images of the val split (of a folder of unlabelled images: of
    its images), with the eval transform. No analysis reads the labels."""
    dataset, _ = build_dataset(args.data, args.data_root, train=False,
                               transform=eval_transform(img_size, stats=normalization(args.data)),
                               subset=args.num_images, unlabelled=True)
    return dataset


def val_loader(args, img_size, drop_last=False):
    dataset = val_images(args, img_size)
    if drop_last and len(dataset) < args.batch_size:
        raise RunError(f"{len(dataset)} images are fewer than one batch of {args.batch_size}: "
                       f"lower --batch-size or raise --num-images")
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, drop_last=drop_last)


def device_of(args):
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise RunError("--device cuda but no CUDA device is visible: pass --device cpu")
    return torch.device(args.device)


def layer_features(model, imgs):
    """The depth + 1 layers CKA compares, each (B, N*D): the normed input of every block and the
    final normed output (a global-pool model's fc_norm on the last block's tokens, else its `norm`;
    build_encoder decides which), patch tokens only (cls removed), flattened per image."""
    layers = model.encode(imgs, return_layers=True).layers            # depth + 1 of (B, 1 + N, D)
    return [rearrange(x[:, 1:], 'b n d -> b (n d)') for x in layers]


# --------------------------------------------------------------------------------------------------
# Sub-commands
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def cka_command(args):
    device = device_of(args)
    # both models see the same images: at --img-size, else at the native size of the model built
    # first, a checkpoint when there is one (a `random` model has no size of its own)
    last = args.last_layer
    if args.a == 'random' and args.b != 'random':
        model_b, name_b = build_encoder(args.b, args, args.img_size, seed_offset=1, last_layer=last)
        model_a, name_a = build_encoder(args.a, args, model_b.patch_embed.img_size, last_layer=last)
    else:
        model_a, name_a = build_encoder(args.a, args, args.img_size, last_layer=last)
        model_b, name_b = build_encoder(args.b, args, model_a.patch_embed.img_size, seed_offset=1,
                                        last_layer=last)
    img_size = model_a.patch_embed.img_size
    model_a, model_b = model_a.to(device), model_b.to(device)
    # every batch the same size: the estimator averages per-batch HSICs, and needs n > 3
    loader = val_loader(args, img_size, drop_last=True)
    batches = ((layer_features(model_a, imgs.to(device)), layer_features(model_b, imgs.to(device)))
               for imgs, _ in tqdm(loader, desc='cka', dynamic_ncols=True))
    cka = minibatch_cka(batches).cpu()                                # (depth_a + 1, depth_b + 1)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [[round(v, 6) for v in row] for row in cka.tolist()]
    (out / 'cka.json').write_text(json.dumps(rows))
    with open(out / 'cka.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['layer_a \\ layer_b', *range(cka.shape[1])])
        writer.writerows([i, *row] for i, row in enumerate(rows))
    num_images = len(loader) * args.batch_size
    plot_cka(cka, name_a, name_b, f"{args.data}, {num_images} val images at {img_size} px",
             f"last (--last-layer {last}): {LAST_LAYERS[last]}", out / 'cka.png')
    print(f"CKA of {name_a} (rows) vs {name_b} (columns) over {num_images} images, last layer "
          f"(--last-layer {last}) {LAST_LAYERS[last]}: {out / 'cka.png'}, {out / 'cka.json'}, "
          f"{out / 'cka.csv'}")
    diagonal = cka.diagonal()
    print(f"diagonal (layer i vs layer i, i = 0..{len(diagonal) - 1}): "
          + ' '.join(f"{v:.2f}" for v in diagonal.tolist()))


@torch.inference_mode()
def attention_command(args):
    device = device_of(args)
    model, name = build_encoder(args.ckpt, args, args.img_size)
    model = model.to(device)
    maps_layer = check_maps_args(args, model.depth) if args.maps else None   # before the long pass
    grid, patch_size = model.patch_embed.grid_size, model.patch_embed.patch_size
    loader = val_loader(args, model.patch_embed.img_size)
    distance = torch.zeros(model.depth, model.num_heads, device=device)
    entropy = torch.zeros(model.depth, model.num_heads, device=device)
    num_images = 0
    for imgs, _ in tqdm(loader, desc='attention', dynamic_ncols=True):
        attn_logits = model.encode(imgs.to(device), attn_layers=range(model.depth)).attn_logits
        for layer, logits in attn_logits.items():                      # (B, heads, 1 + N, 1 + N)
            attn = patch_attention(logits)                             # (B, heads, N, N)
            distance[layer] += attention_distance(attn, grid, patch_size).sum(dim=0)
            entropy[layer] += attention_entropy(attn).sum(dim=0)
        num_images += imgs.shape[0]
    distance, entropy = (distance / num_images).cpu(), (entropy / num_images).cpu()   # (depth, heads)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [{'layer': layer, 'head': head, 'distance_px': round(distance[layer, head].item(), 4),
                'entropy': round(entropy[layer, head].item(), 4)}
               for layer in range(model.depth) for head in range(model.num_heads)]
    (out / 'attention.json').write_text(json.dumps(records, indent=1))
    with open(out / 'attention.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    about = f"{name}\n{args.data}, {num_images} val images at {model.patch_embed.img_size} px"
    plot_per_head(distance, f"mean attention distance (pixels = patch distance x {patch_size})",
                  about, out / 'attention_distance.png')
    plot_per_head(entropy, 'mean attention entropy (nats)', about, out / 'attention_entropy.png')
    print(f"attention of {name} over {num_images} images: {out / 'attention_distance.png'}, "
          f"{out / 'attention_entropy.png'}, {out / 'attention.json'}, {out / 'attention.csv'}")
    print("mean distance per layer (px): " + ' '.join(f"{v:.1f}" for v in distance.mean(1).tolist()))
    print("mean entropy per layer:       " + ' '.join(f"{v:.2f}" for v in entropy.mean(1).tolist()))
    if args.maps:
        images = loader.dataset
        imgs = torch.stack([images[i][0] for i in range(min(args.maps_images, len(images)))])  # (K, 3, H, W)
        logits = model.encode(imgs.to(device), attn_layers=[maps_layer]).attn_logits[maps_layer]
        attn = cls_attention(logits).cpu()                                              # (K, heads, N)
        path = out / 'attention_maps.png'
        plot_attention_maps(imgs, attn, normalization(args.data), f"{name}: cls attention to the patches "
                            f"in block {maps_layer} (of 0..{model.depth - 1}), each head", path)
        print(f"cls-token attention of every head in block {maps_layer} on {len(imgs)} images: {path}")


def check_maps_args(args, depth):
    """-> the block whose cls attention --maps draws: --layer, default the last."""
    layer = depth - 1 if args.layer is None else args.layer
    if not 0 <= layer < depth:
        raise RunError(f"--layer {args.layer} is out of range: the model has blocks 0..{depth - 1}")
    if args.maps_images < 1:
        raise RunError(f"--maps-images must be at least 1, got {args.maps_images}")
    return layer


@torch.inference_mode()
def embed_command(args):
    """Every image's feature, as linear_probe's head sees it, in the split's order (no masking, the
    eval view): features.npy (N, D) float32, labels.npy (N,) int64, paths.txt (a folder: each file's
    path; a named data set: each image's index in the whole split)."""
    device = device_of(args)
    layout, about = EMBED_FEATURES[args.feature]
    model, name = build_encoder(args.ckpt, args, args.img_size, last_layer=layout)
    model = model.to(device)
    img_size = model.patch_embed.img_size
    dataset, _ = build_dataset(args.data, args.data_root, train=args.split == 'train',
                               transform=eval_transform(img_size, stats=normalization(args.data)),
                               subset=args.num_images, unlabelled=True)
    features, labels = [], []
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    for imgs, targets in tqdm(loader, desc='embed', dynamic_ncols=True):
        features.append(model.pool(model.encode(imgs.to(device)).tokens).float().cpu())    # (B, D)
        labels.append(targets)
    features, labels = torch.cat(features), torch.cat(labels).long()                   # (N, D), (N,)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / 'features.npy', features.numpy())
    np.save(out / 'labels.npy', labels.numpy())
    (out / 'paths.txt').write_text(''.join(f"{image}\n" for image in image_names(dataset)))
    print(f"{len(features)} {args.split} features of dim {features.shape[1]} ({args.feature}: {about}) "
          f"of {name} at {img_size} px: {out / 'features.npy'}, "
          f"{out / 'labels.npy'}, {out / 'paths.txt'}")


def image_names(dataset):
    """Each image's name in the order of `dataset`: its file's path (a folder), else its index in the
    whole split (a named data set)."""
    base, indices = ((dataset.dataset, dataset.indices) if isinstance(dataset, Selection)
                     else (dataset, range(len(dataset))))
    # ImageFolder's (path, label) pairs, or UnlabelledImages' paths
    files = [path for path, _ in base.samples] if hasattr(base, 'samples') else getattr(base, 'paths', None)
    return [files[i] if files is not None else i for i in indices]


@torch.inference_mode()
def reconstruct_command(args):
    device = device_of(args)
    if not 0 < args.mask_ratio < 1:
        raise RunError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    try:
        model = MAE.from_checkpoint(args.ckpt, args.img_size, args.norm_pix_loss).to(device).eval()
    except ValueError as e:                 # an --img-size that is no multiple of the patch size
        raise RunError(str(e)) from None
    images = val_images(args, model.patch_embed.img_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / 'reconstruction.png'
    patch_embed = model.patch_embed
    size_name = encoder_geometry(model.state_dict(), args.ckpt)[0]
    size = f"MAE {size_name}, patch {patch_embed.patch_size}, {patch_embed.img_size} px"
    shown = torch.stack([images[i][0] for i in range(min(6, len(images)))])          # (<= 6, 3, H, W)
    save_reconstruction_figure(model, shown, path, f"{args.ckpt} ({size})", normalization(args.data),
                               args.mask_ratio, args.seed)
    loss = held_out_loss(model, images, args.mask_ratio, args.seed, device)
    (out / 'reconstruction.json').write_text(json.dumps(
        {'loss': loss, 'num_images': len(images), 'mask_ratio': args.mask_ratio, 'ckpt': str(args.ckpt)}))
    print(f"reconstruction of {len(shown)} {args.data} val images: {path}")
    print(f"{size}, norm_pix_loss {'on' if model.norm_pix_loss else 'off'}: MAE loss {loss:.4f} on "
          f"{len(images)} val images (mask ratio {args.mask_ratio}): {out / 'reconstruction.json'}")


def held_out_loss(model, images, mask_ratio, seed, device, batch_size=256):
    """The MAE loss over a data set, each image weighted alike, with masking noise drawn from `seed` in
    order: two models with the same patch grid see the very same masks, so their losses compare."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for imgs, _ in DataLoader(images, batch_size=batch_size):
        noise = torch.rand(len(imgs), model.patch_embed.num_patches, generator=generator)   # (B, L)
        loss, _, _ = model(imgs.to(device), mask_ratio, noise.to(device))
        total += loss.item() * len(imgs)
    return total / len(images)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_cka(cka, name_a, name_b, about, about_last_layer, path):
    """Heatmap of the CKA matrix, layer 0 at the bottom left, values written in the cells;
    `about_last_layer` says what the last layer is."""
    plt = pyplot()
    rows, cols = cka.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * cols, 1.0 + 0.5 * rows))
    image = ax.imshow(cka.numpy(), origin='lower', cmap='magma', vmin=0, vmax=1)
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{cka[i, j]:.2f}", ha='center', va='center', fontsize=6,
                    color='black' if cka[i, j] > 0.6 else 'white')
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel(f"layer of B: {name_b}", fontsize=8)
    ax.set_ylabel(f"layer of A: {name_a}", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='linear CKA')
    ax.set_title(f"linear CKA; layer i < depth: input of block i (after norm1)\n{about_last_layer}\n{about}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_head(values, ylabel, about, path):
    """The paper's scatter plot: one dot per head at each layer, the layer mean as a line.
    values (depth, heads)."""
    plt = pyplot()
    depth, heads = values.shape
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = torch.arange(depth)
    ax.scatter(layers.repeat_interleave(heads), values.flatten(), s=14, alpha=0.6, label='a head')
    ax.plot(layers, values.mean(dim=1), color='black', marker='o', markersize=3, label='layer mean')
    ax.set_xticks(range(depth))
    ax.set_xlabel('block (0 = first)')
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(about, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention_maps(imgs, attn, stats, title, path):
    """One row per image: the image, then each head's attention over the patches drawn on it (each
    panel scaled to its own largest share, written in its corner; nearest upsampling, so a patch
    shows as a square).
    imgs (K, 3, H, W) normalised with stats = (mean, std); attn (K, heads, N) rows summing to 1."""
    plt = pyplot()
    num_images, heads, _ = attn.shape
    grid = math.isqrt(attn.shape[-1])
    maps = rearrange(attn, 'k h (gh gw) -> k h gh gw', gh=grid)                       # (K, heads, g, g)
    maps = F.interpolate(maps, size=imgs.shape[-2:], mode='nearest')                 # (K, heads, H, W)
    mean, std = torch.tensor(stats[0]).view(1, 3, 1, 1), torch.tensor(stats[1]).view(1, 3, 1, 1)
    pictures = (imgs.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()      # (K, H, W, 3)
    fig, axes = plt.subplots(num_images, 1 + heads, figsize=(1.1 * (1 + heads), 1.2 * num_images + 0.6),
                             squeeze=False)
    for row in range(num_images):
        axes[row, 0].imshow(pictures[row])
        for head in range(heads):
            ax = axes[row, 1 + head]
            ax.imshow(pictures[row])
            largest = attn[row, head].max().item()
            ax.imshow(maps[row, head].numpy(), cmap='inferno', alpha=0.65, vmin=0, vmax=largest)
            ax.text(0.03, 0.04, f"{largest:.2f}", transform=ax.transAxes, fontsize=6, color='white',
                    bbox=dict(facecolor='black', alpha=0.6, pad=1, linewidth=0))
            if row == 0:
                ax.set_title(f"head {head}", fontsize=7)
    axes[0, 0].set_title('image', fontsize=7)
    for ax in axes.flat:
        ax.axis('off')
    fig.suptitle(f"{title}\nbright = much attention, each panel scaled to its largest share (the number; "
                 f"uniform: 1/{attn.shape[-1]} = {1 / attn.shape[-1]:.2f})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_shared_args(parser, num_images, batch_size=None, random_model=True):
    """The shared flag vocabulary, as far as an analysis reads it (batch_size=None: no loader)."""
    g = parser.add_argument_group('data and run')
    g.add_argument('--data', default='fashion_mnist',
                   help='fashion_mnist, cifar10, cifar100, flowers, pets, aircraft, cars, synthetic, '
                        'or a folder with train/<class>/* and val/<class>/* (its val split is used), '
                        'or a folder of unlabelled images at any depth (all of them are used)')
    g.add_argument('--data-root', default='data', help='where named data sets live or download to')
    g.add_argument('--img-size', type=int, default=None,
                   help="image size shown to the model (default: the checkpoint's native size; 224 for random)")
    g.add_argument('--num-images', type=int, default=num_images,
                   help=f'a fixed random sample of this many val images (default {num_images})')
    if batch_size:
        g.add_argument('--batch-size', type=int, default=batch_size,
                       help=f'images per batch (default {batch_size})')
        g.add_argument('--num-workers', type=int, default=default_num_workers(),
                       help='data loader processes (default: 4, or the CPU count if fewer)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--output-dir', default='output/analysis', help='where the figures and tables go')
    g.add_argument('--seed', type=int, default=0,
                   help='the masking shown' if not random_model else 'weights of a `random` encoder')
    if random_model:
        g = parser.add_argument_group('a `random` encoder (a checkpoint brings its own)')
        g.add_argument('--model', default='vit_tiny', choices=list(SIZES))
        g.add_argument('--patch-size', type=int, default=16, help='paper: 16')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser('cka', help='layer-wise linear CKA between two models',
                            description='Minibatch linear CKA between layers 0..depth of two models. '
                                        'Paper: about 1,000 ImageNet val images in batches of 128.')
    p.add_argument('--a', required=True, help='checkpoint, or `random` (rows of the matrix)')
    p.add_argument('--b', required=True, help='checkpoint, or `random` (columns)')
    p.add_argument('--last-layer', choices=sorted(LAST_LAYERS), default='fc_norm',
                   help="the last layer: fc_norm on the last block's tokens, fresh for a model without "
                        "one (paper, as MAE-Lite's tool), or each checkpoint's own trained final norm")
    add_shared_args(p, num_images=1000, batch_size=128)    # paper: ~1,000 ImageNet val images, batch 128
    p.set_defaults(func=cka_command)

    p = commands.add_parser('attention', help='per-head attention distance and entropy',
                            description='Mean attention distance (pixels) and entropy of every head, '
                                        'among patch tokens (cls cut, softmax again); with --maps also '
                                        "a figure of each head's cls-token attention on a few images.")
    p.add_argument('--ckpt', required=True, help='checkpoint, or `random`')
    p.add_argument('--maps', action='store_true',
                   help="also draw attention_maps.png: for the first --maps-images images, each head's "
                        "attention from the cls token to the patches (softmax over the patches) in "
                        "block --layer, upsampled and drawn over the image")
    p.add_argument('--layer', type=int, default=None,
                   help='the block --maps draws, 0..depth-1 (default: the last)')
    p.add_argument('--maps-images', type=int, default=4, help='images in attention_maps.png (default 4)')
    add_shared_args(p, num_images=1000, batch_size=32)     # 12 layers of (B, heads, N, N) logits
    p.set_defaults(func=attention_command)

    p = commands.add_parser('embed', help="every image's feature, label and path, for your own analysis",
                            description='The frozen encoder\'s feature of every image of a split, as '
                                        'linear_probe\'s head sees it: no masking, the eval view (resize '
                                        'and center crop), in the split\'s order; features.npy (N, D) '
                                        'float32, labels.npy (N,) int64, paths.txt (a folder: the file '
                                        'path of each row; a named data set: its index in the split).')
    p.add_argument('--ckpt', required=True, help='checkpoint, or `random`')
    p.add_argument('--feature', default='cls', choices=list(EMBED_FEATURES),
                   help='; '.join(f"{k}: {about}" for k, (_, about) in EMBED_FEATURES.items()))
    p.add_argument('--split', default='val', choices=['train', 'val'],
                   help='which split (a named data set: train or test; default val)')
    add_shared_args(p, num_images=0, batch_size=256)
    embed_flags = {a.dest: a for a in p._actions}
    embed_flags['num_images'].help = ('a fixed sample of this many images of the split, in its order '
                                      '(default 0: all)')
    embed_flags['data'].help = embed_flags['data'].help.replace('(its val split is used)', '(--split picks)')
    p.set_defaults(func=embed_command)

    p = commands.add_parser('reconstruct', help="an MAE's reconstructions of a few val images",
                            description='Original / masked / reconstruction of the first 6 of --num-images '
                                        'val images with a fixed masking (--seed), and the held-out MAE loss '
                                        'over all of them (reconstruction.json): two MAEs of the same patch '
                                        'grid are scored on the very same masks.')
    p.add_argument('--ckpt', required=True, help='MAE pre-training checkpoint that keeps the decoder')
    p.add_argument('--mask-ratio', type=float, default=0.75, help='paper: 0.75')
    p.add_argument('--norm-pix-loss', action=argparse.BooleanOptionalAction, default=None,
                   help="whether the MAE predicts normalised patches (default: the checkpoint's "
                        "saved flag, else on)")
    add_shared_args(p, num_images=6, random_model=False)
    p.set_defaults(func=reconstruct_command)

    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    run_main(main)
