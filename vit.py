"""A plain Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter names.

The one backbone of this project. Its state-dict keys are those of timm's VisionTransformer
(patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2},
norm | fc_norm, head), so official MAE, MAE-Lite, DeiT and timm checkpoints load directly.

Two things go beyond a classifier, for MAE and for the paper's analysis:
  * `encode(imgs, visible_idx=...)` runs the encoder on a subset of patches (MAE's visible ones);
  * `encode(..., attn_layers=..., return_layers=True)` also returns the pre-softmax attention logits
    of the chosen blocks and every layer's normed input tokens.

The bottom of the file reads checkpoints of every known layout (`load_pretrained` for an encoder,
`mae_state_dict` for an MAE with its decoder); `SIZES` is the one table of model sizes. vit.py
imports nothing from this project, so it can be copied into another one.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
def gather_tokens(x, idx):
    """x (B, L, D), idx (B, N) -> (B, N, D): for each image, its tokens at the given positions."""
    return torch.gather(x, 1, repeat(idx, 'b n -> b n d', d=x.shape[-1]))


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping p x p patches and project each to `embed_dim`."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}: "
                             f"pick --img-size as a multiple of --patch-size")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs, visible_idx=None):
        """(B, C, H, W) -> (B, L, D) tokens, or (B, N, D) for only the patches in visible_idx (B, N):
        those are cut out first and projected by the conv's weight as a Linear, 4x fewer FLOPs at
        MAE's 75% masking."""
        if visible_idx is None:
            return rearrange(self.proj(imgs), 'b d h w -> b (h w) d')
        p = self.patch_size
        # (c p1 p2): the order of the conv weight's flattened input, so the Linear is the conv
        # (MAE.patchify's (p1 p2 c) is the official pixel-target order instead)
        patches = rearrange(imgs, 'b c (h p1) (w p2) -> b (h w) (c p1 p2)', p1=p, p2=p)  # (B, L, C*p*p)
        visible = gather_tokens(patches, visible_idx)                                   # (B, N, C*p*p)
        return F.linear(visible, self.proj.weight.flatten(1), self.proj.bias)            # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention. Returns (output, attn_logits); the logits, q.k^T * scale before the
    softmax, are only materialised when asked for, otherwise the fused SDPA kernel runs. Asked-for
    logits and their softmax are fp32 under any autocast (they are distillation targets and feed an
    exp); the product with v runs in v's dtype."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn_logits=False):
        q, k, v = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d',
                            three=3, h=self.num_heads)     # each (B, heads, N, head_dim)
        if return_attn_logits:
            with torch.autocast(x.device.type, enabled=False):
                attn_logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)   # (B, heads, N, N)
                attn = attn_logits.softmax(dim=-1)
            x = attn.to(v.dtype) @ v
        else:
            attn_logits = None
            x = F.scaled_dot_product_attention(q, k, v)
        x = rearrange(x, 'b h n d -> b n (h d)')           # (B, N, D)
        return self.proj(x), attn_logits


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, rate, training):
    """Stochastic depth: drop the residual branch of whole samples with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, return_attn_logits=False):
        attn_out, attn_logits = self.attn(self.norm1(x), return_attn_logits)
        x = x + drop_path(attn_out, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, attn_logits


def sincos_pos_embed(embed_dim, grid_size, cls_token=True):
    """Fixed 2-D sin-cos position embedding of MAE, (1 + grid_size**2, embed_dim) with a zero row
    for the cls token. The first half of the channels encodes the column, the second the row; each
    half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)), k < D/4."""
    assert embed_dim % 4 == 0, "sin-cos position embedding needs a dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing='ij')

    def encode_1d(pos):                                   # (L,) -> (L, D/2)
        angles = pos.reshape(-1, 1) * omega               # (L, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode_1d(cols), encode_1d(rows)], dim=1)    # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------------
# The Vision Transformer
# --------------------------------------------------------------------------------------------------
class Encoded(NamedTuple):
    tokens: torch.Tensor    # (B, 1 + N, D): cls + patch tokens after the final norm (un-normed with
                            # global_pool: fc_norm comes after pooling)
    attn_logits: dict       # block index -> (B, heads, 1 + N, 1 + N), for the asked-for blocks only
    layers: list            # None, or depth + 1 tensors (B, 1 + N, D): blocks[i].norm1(x), block i's
                            # normed input; last, the final norm (fc_norm with global_pool)


class VisionTransformer(nn.Module):
    """ViT with a cls token and learned absolute position embedding.

    global_pool=True (the fine-tuning head of MAE): mean of the patch tokens -> fc_norm -> head,
    and no final `norm` (timm's layout). global_pool=False: final `norm`, then the cls token -> head.
    num_classes=0 gives an encoder without head (as MAE's).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, global_pool=False,
                 drop_path_rate=0.0):
        super().__init__()
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()    # deeper blocks drop more
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates])
        # timm's layout: a global-pool model normalises after pooling (fc_norm) instead of before
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=1e-6)
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """timm's default: trunc-normal(0.02) for linear weights and pos-embed, tiny cls token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, imgs, visible_idx=None):
        """Patch tokens plus position embedding, optionally only the visible ones, with the cls token
        in front. imgs (B, C, H, W), visible_idx (B, N) indices into the L patches -> (B, 1 + N, D)."""
        pos = self.pos_embed[:, 1:]                                     # (1, L, D)
        if visible_idx is not None:
            pos = gather_tokens(pos.expand(len(imgs), -1, -1), visible_idx)   # (B, N, D)
        x = self.patch_embed(imgs, visible_idx) + pos                  # (B, N or L, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)       # (B, 1, D)
        return torch.cat([cls, x], dim=1)

    def encode(self, imgs, visible_idx=None, attn_layers=(), return_layers=False):
        """Run the encoder. `attn_layers`: block indices whose pre-softmax attention logits to return;
        `return_layers`: also return the normed input of every block and the final normed output."""
        x = self.embed(imgs, visible_idx)                              # (B, 1 + N, D)
        attn_logits, layers = {}, [] if return_layers else None
        for i, block in enumerate(self.blocks):
            if return_layers:
                layers.append(block.norm1(x))
            x, logits = block(x, return_attn_logits=i in attn_layers)
            if logits is not None:
                attn_logits[i] = logits                                # (B, heads, 1 + N, 1 + N)
        x = self.norm(x)
        if return_layers:
            layers.append(self.fc_norm(x) if self.global_pool else x)
        return Encoded(x, attn_logits, layers)

    def pool(self, tokens):
        """(B, 1 + N, D) -> (B, D): the feature the head sees."""
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    def forward(self, imgs):
        return self.head(self.pool(self.encode(imgs).tokens))         # (B, num_classes)


# The one table of model sizes: each encoder's (width, depth, heads), and the MAE decoder that
# pre-trains it. ViT-Tiny is the paper's: DeiT-Tiny's width (192) but 12 heads of dim 16 instead of 3,
# with MAE-Lite's light decoder; ViT-Base has official MAE's decoder (the D-MAE teacher).
SIZES = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=12),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=12),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
}
MAE_DECODERS = {
    'vit_tiny': dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3),
    'vit_small': dict(decoder_embed_dim=192, decoder_depth=1, decoder_num_heads=6),
    'vit_base': dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def vit(size, **kwargs):
    """A VisionTransformer of a size in SIZES, e.g. vit('vit_tiny', img_size=32, patch_size=4)."""
    return VisionTransformer(**SIZES[size], **kwargs)


# --------------------------------------------------------------------------------------------------
# Checkpoints: ours, official MAE, MAE-Lite, MoCo-v3, DDP-saved, timm / DeiT
# --------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint that is missing, not a checkpoint, or does not fit the model."""


def read_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint must not be able to run code), and one clear
    line for a missing file or a file that is not a PyTorch checkpoint."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it") from None
    except Exception as e:  # torch raises several types for junk files; all mean the same here
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); "
                              f"pass a .pth file saved by torch.save") from None


# prefixes that wrappers put in front of the encoder's names, stripped in this order
_PREFIXES = ('module.', 'model.', 'base_encoder.', 'encoder.')
# parts of known checkpoints that are not the encoder, and are dropped without complaint
_NOT_ENCODER = ('decoder', 'mask_token', 'momentum_encoder.', 'predictor.')


def encoder_state_dict(checkpoint):
    """The encoder's state dict from any known checkpoint layout: unwrap {"model": ...} or
    {"state_dict": ...}, strip 'module.' / 'model.' / 'base_encoder.' prefixes (MAE-Lite saves
    'module.model.', MoCo-v3 'module.base_encoder.'), drop decoder and momentum-encoder keys."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict of tensors, found a {type(checkpoint).__name__}")
    state = checkpoint
    for key in ('model', 'state_dict'):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    cleaned = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        while name.startswith(_PREFIXES):
            name = name.split('.', 1)[1]
        if not name.startswith(_NOT_ENCODER):
            cleaned[name] = tensor
    return cleaned


def resize_pos_embed(pos_embed, new_grid):
    """(1, 1 + g*g, D) -> (1, 1 + new_grid**2, D): bicubic interpolation of the patch part; the cls
    position is kept as is."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = math.isqrt(grid_pos.shape[1])
    grid_pos = rearrange(grid_pos, '1 (h w) d -> 1 d h w', h=old_grid)
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode='bicubic',
                             align_corners=False)
    grid_pos = rearrange(grid_pos, '1 d h w -> 1 (h w) d').to(pos_embed.dtype)
    return torch.cat([cls_pos, grid_pos], dim=1)


class LoadReport(NamedTuple):
    loaded: list    # keys taken from the checkpoint
    new: list       # keys of the model the checkpoint did not have (kept at their initial value)
    ignored: list   # keys of the checkpoint the model has no place for

    def summary(self):
        """One line for the run's log: what was loaded, what starts fresh, what was left out."""
        return (f"{len(self.loaded)} tensors loaded; new: {', '.join(self.new) or 'none'}; "
                f"ignored: {', '.join(self.ignored) or 'none'}")


def load_pretrained(model, path, allow_new=('head.', 'fc_norm.')):
    """Load the encoder weights of the checkpoint at `path` into `model` (a VisionTransformer or a
    subclass). Resizes the pos-embed when the patch grid differs; drops a head of another shape.
    Raises CheckpointError listing the problem when a weight has the wrong shape (a checkpoint of
    another model size) or a model key outside `allow_new` is missing from the checkpoint."""
    state = encoder_state_dict(read_checkpoint(path))
    own = model.state_dict()
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        state['pos_embed'] = resize_pos_embed(state['pos_embed'], model.patch_embed.grid_size)
    if 'head.weight' in state and 'head.weight' in own and state['head.weight'].shape != own['head.weight'].shape:
        del state['head.weight'], state['head.bias']               # a head for other classes
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith(allow_new)]
    if wrong_shape or missing or not any(k in own for k in state):
        problems = wrong_shape[:4] + [f"missing {k}" for k in missing[:4]]
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}(dim={model.embed_dim}, depth={model.depth}, "
            f"patch={model.patch_embed.patch_size}): {'; '.join(problems) or 'no key matches'}"
            f" ({len(wrong_shape)} wrong shapes, {len(missing)} missing); check --model / --patch-size")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(loaded=[k for k in state if k in own], new=[k for k in own if k not in state],
                      ignored=[k for k in state if k not in own])


def encoder_geometry(state, path):
    """(size, patch size, native image size) of an encoder state dict, read from its weights: the
    width names the size (SIZES), the patch projection's kernel the patch, pos_embed the grid."""
    if not {'cls_token', 'patch_embed.proj.weight', 'pos_embed'} <= state.keys():
        raise CheckpointError(f"{path} holds no ViT encoder (no cls_token / patch_embed / pos_embed)")
    widths = {size['embed_dim']: name for name, size in SIZES.items()}
    width, patch_size = state['cls_token'].shape[-1], state['patch_embed.proj.weight'].shape[-1]
    if width not in widths:
        raise CheckpointError(f"{path}: encoder width {width} is none of {sorted(widths)} "
                              f"({', '.join(SIZES)})")
    grid = math.isqrt(state['pos_embed'].shape[1] - 1)                # (1, 1 + grid**2, D)
    return widths[width], patch_size, grid * patch_size


def mae_state_dict(checkpoint, path):
    """The state dict of an MAE with its decoder from any known pre-training checkpoint: ours,
    official MAE ({'model': sd}) or MAE-Lite ('module.model.' keys). pretrain_mae.MAE.from_checkpoint
    builds the MAE around it."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    state = {k.removeprefix('module.').removeprefix('model.'): v
             for k, v in checkpoint.get('model', checkpoint).items() if isinstance(v, torch.Tensor)}
    if 'decoder_pred.weight' not in state:
        raise CheckpointError(f"{path} holds no MAE with its decoder: pass a pre-training checkpoint "
                              f"that keeps it (ours, MAE-Lite's, or official MAE's visualisation ones)")
    return state
