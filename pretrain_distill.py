"""D-MAE: MAE pre-training of a small ViT with attention distillation from a bigger MAE teacher.

The paper's method (Wang et al. 2023, "D-MAE"), on top of pretrain_mae.py's `MAE`:
  1. mask:    the student's random masking picks the visible 25% of the patches
  2. student: MAE as usual (encoder on the visible patches, decoder, loss on the masked patches),
              keeping the last block's attention logits q.k^T * scale, before the softmax
  3. teacher: a frozen, pre-trained MAE encoder (MAE-Base in the paper) runs without gradients on the
              SAME visible patches of the same images, and gives its own attention logits
  4. loss:    MAE loss + alpha * MSE(Conv1x1_heads(student logits), teacher logits); with several
              distilled layers (and optional hidden states) the per-layer losses add up, as
              `DistilledMAE` states

Only the student and the adapters train. The checkpoint's `model` is the student MAE's state
dict (so finetune.py / linear_probe.py read it like any MAE checkpoint); the adapter sits apart under
`adapter`, and the teacher is not saved (`--teacher` names it).

Layer mapping (`--distill-layers`, `--distill-hidden`): each entry is 'S:T' (student index S against
teacher index T) or a single 'S', which takes the teacher index at the same relative depth; negative
indices count from the end. With equal depths (ViT-Tiny and ViT-Base both have 12 blocks) 'S' is S.

Run `python pretrain_distill.py --help` for the flags; `--config configs/dmae_tiny_imagenet.yaml` is
the paper's recipe, `configs/dmae_tiny_fashion_mnist_quick.yaml` a CPU one (its header says how to
get the teacher).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import normalization
from pretrain_mae import (MAE, build_mae, build_parser as build_mae_parser, init_mae, mae_decoder, mean_patch_token,
                          pretrain_data, save_reconstruction_figure)
from operations import RunError, run_main
from training import (Processes, adamw, announce, append_log, compile_and_wrap, grad_scaler, knn_due, knn_note,
                      knn_readout, knn_sets, parse_args, prepare_output, resume_checkpoint, save_checkpoint,
                      seed_everything, train_one_epoch, warmup_cosine, weight_decay_groups)
from vit import SIZES, CheckpointError, VisionTransformer, load_pretrained, vit

STAGE = 'pretrain_distill'


# --------------------------------------------------------------------------------------------------
# The losses: one function per kind of target
# --------------------------------------------------------------------------------------------------
def attention_distillation_loss(student_logits, teacher_logits, head_adapter):
    """D-MAE's attention loss for one layer: the student's pre-softmax attention logits, mixed over
    heads by a 1x1 convolution W (teacher heads x student heads, no bias), against the teacher's:

        mean_{b, t, i, j} ( sum_s W[t, s] * A_student[b, s, i, j] - A_teacher[b, t, i, j] )^2

    with A = q k^T / sqrt(head_dim) of shape (B, heads, N, N), N = 1 + visible patches. In fp32 under
    any autocast: both sides' logits are (vit.Attention), and so is the mixing."""
    with torch.autocast(student_logits.device.type, enabled=False):
        mapped = head_adapter(student_logits.float())              # (B, teacher heads, N, N)
    return F.mse_loss(mapped, teacher_logits.float())


def hidden_distillation_loss(student_hidden, teacher_hidden, dim_adapter):
    """The optional hidden-state loss for one layer: mean_{b, n, d} (W x_student - x_teacher)^2 over
    all tokens (cls included), W a Linear(student dim -> teacher dim) without bias; x (B, N, D)."""
    return F.mse_loss(dim_adapter(student_hidden).float(), teacher_hidden.float())


# --------------------------------------------------------------------------------------------------
# The model: student MAE + frozen teacher encoder + adapters, one module so DDP/compile wrap it whole
# --------------------------------------------------------------------------------------------------
class DistilledMAE(nn.Module):
    """An MAE student distilled from a frozen teacher encoder during pre-training.

    attn_pairs:   [(student block, teacher block)] whose pre-softmax attention logits are matched;
    hidden_pairs: [(student layer, teacher layer)] whose hidden states are matched, layer i < depth
                  being blocks[i].norm1's output and layer depth the final norm's output.
    The loss, as the official code (which sums the per-layer losses, with one weight per kind):

        loss = mae_loss + alpha * sum_{(s, t) in attn_pairs} attention_distillation_loss(s, t)
                        + alpha_hidden * sum_{(s, t) in hidden_pairs} hidden_distillation_loss(s, t)

    The paper's D-MAE is one attention pair (the last blocks), alpha 1 and no hidden pairs.
    forward(imgs, mask_ratio, noise) returns a dict of scalar losses: `mae_loss`; `attn_loss`, the
    sum over attn_pairs; `hidden_loss`, the sum over hidden_pairs (only when there are some);
    `distill_loss`, the weighted sum alpha * attn_loss + alpha_hidden * hidden_loss; and `loss`.
    The adapters are 1x1 Conv2d(student heads -> teacher heads) and Linear(student dim -> teacher
    dim), both without bias and with PyTorch's default init; AdamW decays them like any weight."""

    def __init__(self, student: MAE, teacher: VisionTransformer, attn_pairs, hidden_pairs=(), alpha=1.0,
                 alpha_hidden=1.0):
        super().__init__()
        if student.patch_embed.patch_size != teacher.patch_embed.patch_size or \
                student.patch_embed.grid_size != teacher.patch_embed.grid_size:
            # the teacher must see exactly the student's visible patches, so the grids must agree
            raise ValueError(
                f"the teacher's patch grid ({teacher.patch_embed.grid_size}x{teacher.patch_embed.grid_size} "
                f"of {teacher.patch_embed.patch_size}px) differs from the student's "
                f"({student.patch_embed.grid_size}x{student.patch_embed.grid_size} of "
                f"{student.patch_embed.patch_size}px); build the teacher at the student's size")
        self.student, self.teacher = student, teacher
        self.alpha, self.alpha_hidden = alpha, alpha_hidden
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.attn_pairs, self.hidden_pairs = list(attn_pairs), list(hidden_pairs)
        self.adapters = nn.ModuleDict({
            'attn': nn.ModuleDict({f'{s}_{t}': nn.Conv2d(student.num_heads, teacher.num_heads, 1, bias=False)
                                   for s, t in self.attn_pairs}),
            'hidden': nn.ModuleDict({f'{s}_{t}': nn.Linear(student.embed_dim, teacher.embed_dim, bias=False)
                                     for s, t in self.hidden_pairs}),
        })

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the student does."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (B, C, H, W) -> dict of scalar losses; `noise` (B, L) fixes the masking as in MAE."""
        student, want_hidden = self.student, bool(self.hidden_pairs)
        visible_idx, mask, restore_idx = student.random_masking(imgs.shape[0], mask_ratio, noise)
        encoded = student.encode(imgs, visible_idx, attn_layers={s for s, _ in self.attn_pairs},
                                 return_layers=want_hidden)          # tokens (B, 1 + N_visible, D)
        pred = student.forward_decoder(encoded.tokens, restore_idx)  # (B, L, p*p*C)
        losses = {'mae_loss': student.forward_loss(imgs, pred, mask)}

        # no autograd for the teacher; under the loop's autocast (--amp) it runs in bf16 or fp16 too, its
        # attention logits in fp32 (vit.Attention)
        with torch.no_grad():
            target = self.teacher.encode(imgs, visible_idx, attn_layers={t for _, t in self.attn_pairs},
                                         return_layers=want_hidden)
        losses['attn_loss'] = torch.stack([
            attention_distillation_loss(encoded.attn_logits[s], target.attn_logits[t],
                                        self.adapters['attn'][f'{s}_{t}'])
            for s, t in self.attn_pairs]).sum()
        losses['distill_loss'] = self.alpha * losses['attn_loss']
        if want_hidden:
            losses['hidden_loss'] = torch.stack([
                hidden_distillation_loss(encoded.layers[s], target.layers[t],
                                         self.adapters['hidden'][f'{s}_{t}'])
                for s, t in self.hidden_pairs]).sum()
            losses['distill_loss'] = losses['distill_loss'] + self.alpha_hidden * losses['hidden_loss']
        losses['loss'] = losses['mae_loss'] + losses['distill_loss']
        return losses


def layer_pairs(spec, student_depth, teacher_depth, hidden=False):
    """Parse '-1' / '11' / '5:10,11:23' into [(student index, teacher index)].

    Blocks (hidden=False) are 0..depth-1; a single S maps to teacher block round((S+1) T / S_depth) - 1,
    i.e. the block that ends the same share of the depth (the last to the last).
    Hidden layers (hidden=True) are 0..depth (depth = final norm); a single S maps to round(S T / S_depth),
    the layer after the same share of the blocks (0 to 0, final to final)."""
    count_s, count_t = (student_depth + 1, teacher_depth + 1) if hidden else (student_depth, teacher_depth)
    flag = '--distill-hidden' if hidden else '--distill-layers'

    def index(text, count, whose):
        try:
            i = int(text)
        except ValueError:
            raise RunError(f"{flag} {spec}: '{text}' is not an integer; use e.g. '-1' or '11:11'") from None
        if not -count <= i < count:
            raise RunError(f"{flag} {spec}: {whose} index {i} is out of range for {count} "
                           f"{'layers (0..depth)' if hidden else 'blocks'}")
        return i % count

    pairs = []
    for item in str(spec).replace(' ', '').split(','):
        if not item:
            continue
        s_text, colon, t_text = item.partition(':')
        s = index(s_text, count_s, 'student')
        if colon:
            t = index(t_text, count_t, 'teacher')
        elif hidden:
            t = round(s * teacher_depth / student_depth)
        else:
            t = round((s + 1) * teacher_depth / student_depth) - 1
        pairs.append((s, t))
    return list(dict.fromkeys(pairs))          # drop repeats, keep order


def build_teacher(name, path, img_size, patch_size):
    """The frozen teacher encoder: `name` built at the student's image and patch size (so both cut the
    same patches), with the encoder weights of the MAE checkpoint at `path` (ours, official MAE or
    MAE-Lite; the decoder is dropped). A checkpoint of another size or patch size is refused."""
    teacher = vit(name, img_size=img_size, patch_size=patch_size, num_classes=0, global_pool=False)
    try:
        load_pretrained(teacher, path, allow_new=())
    except CheckpointError as e:
        # the teacher's size is --teacher-model, not --model; its patches must be the student's
        message = str(e).replace('check --model', 'check --teacher-model')
        raise CheckpointError(f"--teacher: {message} (the teacher is built at the student's "
                              f"--patch-size {patch_size} so that both see the same patches)") from None
    return teacher


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = build_mae_parser()               # every MAE flag, with the same paper defaults
    parser.description = __doc__
    g = parser.add_argument_group('D-MAE')
    g.add_argument('--teacher', help='pre-trained MAE checkpoint of the teacher (required; paper: '
                                     'MAE-Base 1600 epochs, official file; its decoder is ignored)')
    g.add_argument('--teacher-model', default='vit_base', choices=list(SIZES),
                   help='teacher encoder size (paper: vit_base)')
    g.add_argument('--alpha', type=float, default=1.0,
                   help='weight of the attention-distillation loss, summed over --distill-layers (paper: '
                        '1.0; official: distill_attn_alpha)')
    g.add_argument('--distill-layers', default='-1',
                   help="student blocks whose pre-softmax attention is distilled, comma-separated; each "
                        "'S:T' (teacher block T) or 'S' (teacher block at the same relative depth); "
                        "negative counts from the end (paper: -1, the last block)")
    g.add_argument('--distill-hidden', default='',
                   help="hidden states to distil as well, same syntax; index i < depth is blocks[i].norm1's "
                        "output, depth the final norm's (paper: off)")
    g.add_argument('--alpha-hidden', type=float, default=1.0,
                   help='weight of the hidden-state loss, summed over --distill-hidden (official: '
                        'distill_hidden_alpha, 1.0)')
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if not 0 < args.mask_ratio < 1:
        raise RunError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if not args.teacher:
        raise RunError("--teacher CKPT is required: a pre-trained MAE checkpoint (e.g. from pretrain_mae.py, "
                       "or the official MAE-Base), with --teacher-model its size")
    mae_decoder(args.model, args.decoder_dim, args.decoder_depth, args.decoder_heads)   # bad flags: before the data
    procs = Processes(args.device)
    seed_everything(args.seed)

    # data: as pretrain_mae.py ---------------------------------------------------------------------
    knn = knn_sets(args)                        # --knn-every's labelled images, or None
    loader, shown_imgs = pretrain_data(args, procs)

    # model: student, teacher, adapters -------------------------------------------------------------
    student = build_mae(args.model, args.decoder_dim, args.decoder_depth, args.decoder_heads,
                        img_size=args.img_size, patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss)
    if args.init:
        message = init_mae(student, args.init)       # encoder, and the decoder when it fits
        if procs.is_main:
            print(message)
    teacher = build_teacher(args.teacher_model, args.teacher, args.img_size, args.patch_size)
    attn_pairs = layer_pairs(args.distill_layers, student.depth, teacher.depth)
    hidden_pairs = layer_pairs(args.distill_hidden, student.depth, teacher.depth, hidden=True)
    if not attn_pairs:
        raise RunError("--distill-layers is empty: D-MAE distils at least one block's attention (paper: -1)")
    model = DistilledMAE(student, teacher, attn_pairs, hidden_pairs, args.alpha,
                         args.alpha_hidden).to(procs.device)

    # optimizer: student and adapters (the frozen teacher and pos-embeds are left out) ----------------
    effective_batch = args.batch_size * args.accum_iter * procs.world_size
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256   # the linear scaling rule
    lr_at = warmup_cosine(lr, args.min_lr, args.warmup_epochs, args.epochs)
    optimizer = adamw(weight_decay_groups(model, args.weight_decay), lr, (0.9, 0.95), procs.device)
    scaler = grad_scaler(args.amp, procs.device)                  # fp16 only
    start_epoch, _ = resume_checkpoint(args.resume, STAGE, optimizer, scaler, model=model.student,
                                       adapter=model.adapters)   # other distilled layers: the adapter does not fit
    train_model = compile_and_wrap(model, procs, args.compile, args.compile_mode)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    out = Path(args.output_dir)
    announce(procs, model, lr, effective_batch, out,
             f" | teacher {args.teacher_model} ({teacher_params / 1e6:.1f}M, frozen) "
             f"{args.teacher} | attention pairs (student, teacher) {attn_pairs}"
             f"{f' | hidden pairs {hidden_pairs}' if hidden_pairs else ''}"
             f" | {len(loader.sampler) * procs.world_size} images, {len(loader)} steps/epoch", amp=args.amp)
    log = prepare_output(out, args, start_epoch, procs.is_main)

    # the loop --------------------------------------------------------------------------------------
    def losses(imgs, labels, epoch_frac):    # MAE's loss + the distillation's (DistilledMAE.forward)
        return train_model(imgs, mask_ratio=args.mask_ratio)

    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(train_model, loader, optimizer, losses, lr_at, epoch, procs,
                                accum_iter=args.accum_iter, amp=args.amp, scaler=scaler, seed=args.seed)
        if procs.is_main:
            if knn_due(epoch, args):            # the student's features; the main process only
                stats.update(knn_readout(student, lambda imgs: mean_patch_token(student, imgs), knn, procs, args))
            append_log(log, {'epoch': epoch, **stats})
            save_checkpoint(out / 'checkpoint.pth', stage=STAGE, epoch=epoch, args=vars(args),
                            model=model.student.state_dict(), adapter=model.adapters.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None)
            save_reconstruction_figure(model.student, shown_imgs, out / 'reconstruction.png',
                                       f"D-MAE {args.model} from {args.teacher_model}, epoch {epoch}, "
                                       f"MAE loss {stats['mae_loss']:.3f}", normalization(args.data),
                                       args.mask_ratio)
            print(f"epoch {epoch}: MAE loss {stats['mae_loss']:.4f}, distill loss "
                  f"{stats['distill_loss']:.4f}{knn_note(stats)}, {stats['img_per_s']:.0f} img/s, "
                  f"checkpoint {out / 'checkpoint.pth'}", flush=True)
    procs.close()


if __name__ == '__main__':
    run_main(main)
