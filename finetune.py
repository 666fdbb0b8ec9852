"""Fine-tuning a ViT classifier end to end: the paper's improved ImageNet recipe, MAE's default one, the
SGD transfer recipe for small data sets, and the supervised from-scratch baseline.

The recipe in four ideas, each in one place below:
  1. init:         `--init` loads a pre-trained encoder (ours, official MAE, MAE-Lite, MoCo-v3,
                   timm/DeiT); the head and fc_norm start fresh. Without it the same recipe trains from
                   scratch, which is the paper's supervised baseline.
  2. layer decay:  blocks[k]'s lr is scaled by decay^(depth - k) (`layer_decay_groups`), so the
                   pre-trained lower layers move least.
  3. augmentation: RandomResizedCrop + flip + RandAugment + random erasing per image (data.py), then
                   MixUp / CutMix per batch (`build_batch_mixing`), with label smoothing in the loss.
  4. evaluation:   top-1, top-5 and loss on the validation set after every epoch, into log.jsonl; the
                   best and the last checkpoint are kept.

Recipes: `--config configs/finetune_tiny_imagenet_improved.yaml` (the paper's 300 epochs),
`configs/finetune_tiny_imagenet_mae_default.yaml` (MAE's recipe it improves on),
`configs/finetune_transfer.yaml` (CIFAR-100 and other small data sets), and
`configs/finetune_fashion_mnist_quick.yaml` (a few minutes on a CPU).
`--eval-only --init CKPT` evaluates a fine-tuned checkpoint and prints its top-1 and top-5, as
linear_probe.py does a probe's.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.transforms import v2

from data import Augmentation, build_dataset, build_loader, eval_transform, normalization, per_image_transform
from data_in_memory import in_memory_loader
from rand_augment import rand_augment
from operations import RunError, run_main
from training import (Processes, add_common_args, adamw, announce, append_log, compile_and_wrap, evaluate,
                      evaluate_checkpoint, grad_scaler, parse_args, prepare_output, resume_checkpoint, save_checkpoint,
                      seed_everything, train_one_epoch, warmup_cosine, weight_decay_groups)
from vit import SIZES, load_pretrained, vit

STAGE = 'finetune'
CLEAN_TRAIN_IMAGES = 10_000     # the training images the last epoch is evaluated on (a fixed sample)
CONVNETS = ('mobilenet_v3_large', 'resnet18')   # hand-designed references of the paper's first claim


# --------------------------------------------------------------------------------------------------
# The recipe's pieces: which pre-trained blocks to keep, layer-wise lr decay, RandAugment spec, batch mixing
# --------------------------------------------------------------------------------------------------
def block_list(text):
    """'0-5' -> [0, 1, 2, 3, 4, 5]; '0,2,6-11' -> [0, 2, 6, ..., 11]; a YAML list works too."""
    if isinstance(text, (list, tuple)):
        return sorted({int(b) for b in text})
    try:
        blocks = set()
        for part in str(text).replace(' ', '').split(','):
            first, _, last = part.partition('-')
            blocks.update(range(int(first), int(last or first) + 1))
        return sorted(blocks)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of block indices such as '0-5' or "
                                         f"'0,1,6-11'") from None


def keep_only_blocks(model, fresh_state, blocks):
    """Undo the loading of every weight outside `blocks`: those get back their value in `fresh_state`
    (the model's from-scratch initialisation). Block 0 brings the patch embedding, the position
    embedding and the cls token with it. -> the names of the tensors kept from the checkpoint."""
    if not all(0 <= b < model.depth for b in blocks):
        raise RunError(f"--init-blocks {blocks}: the model has blocks 0..{model.depth - 1}")
    kept = tuple(f'blocks.{b}.' for b in blocks) + (('patch_embed.', 'pos_embed', 'cls_token') if 0 in blocks else ())
    state = model.state_dict()
    model.load_state_dict({name: (value if name.startswith(kept) else fresh_state[name])
                           for name, value in state.items()})
    return [name for name in state if name.startswith(kept)]


def layer_decay_groups(model, weight_decay, layer_decay):
    """Optimizer param groups for layer-wise lr decay (BEiT / MAE fine-tuning).

    Layer ids: 0 = patch_embed, cls_token, pos_embed; k = blocks[k-1] (k = 1..depth);
    depth + 1 = everything after the blocks (norm / fc_norm, head).
    The lr of a parameter with layer id i is lr x layer_scale, layer_scale = layer_decay^(depth + 1 - i),
    so the head trains at the full lr and the patch embedding at layer_decay^(depth + 1).
    Weight decay applies to weight matrices only: not to 1-D parameters (biases, norms) nor to
    pos_embed and cls_token. Each group carries its 'lr_scale', which training.set_lr multiplies in.
    """
    depth = len(model.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if name.startswith(('patch_embed.', 'cls_token', 'pos_embed')):
            layer_id = 0
        elif name.startswith('blocks.'):
            layer_id = int(name.split('.')[1]) + 1
        else:
            layer_id = depth + 1
        decays = p.ndim > 1 and name not in ('pos_embed', 'cls_token')
        key = (layer_id, decays)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': weight_decay if decays else 0.0,
                           'lr_scale': layer_decay ** (depth + 1 - layer_id)}
        groups[key]['params'].append(p)
    return [groups[key] for key in sorted(groups)]


def parse_rand_aug(spec):
    """--rand-aug, timm's RandAugment spec (rand_augment.rand_augment) -> (num_ops, magnitude, magnitude_std)
    for data.Augmentation, or None for 'none': 'm10-mstd0.5' (the paper's 'rand-m10-mstd0.5-inc1')
    -> (2, 10, 0.5); 'n3-m9' -> (3, 9, 0.0). A bad spec stops the run with one line."""
    try:
        augment = rand_augment(spec)
    except ValueError as e:
        raise RunError(f"--rand-aug: {e}") from None
    return augment and (augment.num_ops, augment.magnitude, augment.magnitude_std)


def build_batch_mixing(mixup, cutmix, num_classes):
    """MixUp (Beta(mixup, mixup) blend of image pairs) and CutMix (a box of the other image) on whole
    batches: (imgs (B, 3, H, W), labels (B,)) -> (mixed imgs, soft targets (B, classes)) whose rows
    sum to 1. With both on, each batch uses one of the two at equal odds (timm's switch prob 0.5).
    None when both alphas are 0."""
    mixes = []
    if mixup > 0:
        mixes.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixes.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, epochs=300, warmup_epochs=5, batch_size=128, blr=1e-3, weight_decay=0.05,
                    min_lr=1e-6, models=(*SIZES, *CONVNETS))
    g = parser.add_argument_group('fine-tuning')
    g.add_argument('--init-blocks', type=block_list, default=None,
                   help="take only these blocks from --init, e.g. '0-5' or '0,1,6-11' (with patch_embed, "
                        "pos_embed and cls_token when block 0 is among them); every other weight starts as "
                        "from scratch: the paper's re-initialisation study (default: all)")
    g.add_argument('--eval-only', action='store_true',
                   help='evaluate the fine-tuned checkpoint given by --init (with its head) and exit')
    g.add_argument('--global-pool', action=argparse.BooleanOptionalAction, default=True,
                   help='head on the mean patch token + fc_norm (paper: on); off: the cls token')
    g.add_argument('--layer-decay', type=float, default=0.85,
                   help='layer-wise lr decay (paper: 0.85 ViT-Tiny, 0.75 ViT-Small and transfer)')
    g.add_argument('--drop-path', type=float, default=0.0,
                   help='stochastic depth rate of the last block (paper: 0; MAE default: 0.1)')
    g.add_argument('--optimizer', default='adamw', choices=['adamw', 'sgd'],
                   help='adamw: betas (0.9, 0.999) (paper, ImageNet); sgd: momentum 0.9, Nesterov '
                        '(paper, transfer)')
    g.add_argument('--clip-grad', type=float, default=None,
                   help='clip the gradient norm to this (paper: none on ImageNet, 1.0 for transfer)')
    g.add_argument('--val-subset', type=int, default=0,
                   help='evaluate on a fixed random sample of this many validation images (0: all), '
                        'for quick runs')
    g.add_argument('--crop-pct', type=float, default=0.875,
                   help='the eval view: resize to img-size / crop-pct (bicubic), center crop (paper: 0.875; '
                        '1.0 shows the whole image, for tiny images such as 28 px ones)')
    g.add_argument('--eval-every', type=int, default=1,
                   help='evaluate and save the checkpoint every this many epochs, and always after the '
                        'last one')

    g = parser.add_argument_group('augmentation')
    g.add_argument('--min-crop-scale', type=float, default=0.08,
                   help='RandomResizedCrop scale lower bound (paper: 0.08)')
    g.add_argument('--rand-aug', default='m10-mstd0.5',
                   help="timm's RandAugment 'rand-m10-mstd0.5-inc1': 2 ops of timm's 15, each run with "
                        "probability 0.5 at a magnitude ~ N(10, 0.5) (paper: 'm10-mstd0.5'; MAE default: "
                        "'m9-mstd0.5'; transfer: 'none')")
    g.add_argument('--reprob', type=float, default=0.0,
                   help='random erasing probability (paper: 0; MAE default: 0.25)')
    g.add_argument('--mixup', type=float, default=0.2, help='MixUp alpha, 0 = off (paper: 0.2; MAE: 0.8)')
    g.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha, 0 = off (paper: 0; MAE: 1.0)')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing (paper: 0; MAE: 0.1)')
    return parser


def classification_loss(model, imgs, labels, batch_mixing, smoothing):
    """The fine-tuning loss of one batch: MixUp / CutMix, then cross-entropy against the (soft)
    targets; cross_entropy smooths class indices and soft targets alike: t (1 - eps) + eps / classes."""
    targets = labels                                                # (B,)
    if batch_mixing is not None:
        imgs, targets = batch_mixing(imgs, labels)                  # targets (B, classes), soft
    logits = model(imgs)                                            # (B, classes)
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def build_eval_loader(args, procs, train, subset):
    """-> (loader, images, classes) of the train or val split in the eval view: resize to
    img_size / crop_pct (bicubic), center crop."""
    stats = normalization(args.data)
    if args.data_on_device:     # a speed path for small data sets (data_in_memory.py)
        return in_memory_loader(args.data, args.data_root, train, args.img_size, args.batch_size, stats=stats,
                                crop_pct=args.crop_pct, subset=subset, classes=args.classes,
                                device=procs.device, rank=procs.rank, world_size=procs.world_size)
    dataset, num_classes = build_dataset(args.data, args.data_root, train=train, subset=subset,
                                         classes=args.classes,
                                         transform=eval_transform(args.img_size, args.crop_pct, stats))
    loader = build_loader(dataset, args.batch_size, train=False, num_workers=args.num_workers,
                          device=procs.device, rank=procs.rank, world_size=procs.world_size)
    return loader, len(dataset), num_classes


def build_train_loader(args, procs, rand_aug):
    """-> (loader, images, classes) of the training set with the fine-tuning augmentation."""
    augmentation = Augmentation(args.min_crop_scale, rand_aug, args.reprob)
    stats = normalization(args.data)
    if args.data_on_device:     # a speed path for small data sets (data_in_memory.py)
        return in_memory_loader(args.data, args.data_root, True, args.img_size, args.batch_size, augmentation,
                                stats, subset=args.subset, classes=args.classes, device=procs.device,
                                seed=args.seed, rank=procs.rank, world_size=procs.world_size)
    dataset, num_classes = build_dataset(
        args.data, args.data_root, train=True, subset=args.subset, classes=args.classes,
        transform=per_image_transform(augmentation, args.img_size, stats))
    loader = build_loader(dataset, args.batch_size, train=True, num_workers=args.num_workers,
                          device=procs.device, seed=args.seed, rank=procs.rank, world_size=procs.world_size,
                          strict_images=args.strict_images)
    return loader, len(dataset), num_classes


def main(argv=None):
    args = parse_args(build_parser(), argv)
    rand_aug = parse_rand_aug(args.rand_aug)
    if not 0 < args.layer_decay <= 1:
        raise RunError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.eval_only and not args.init:
        raise RunError("--eval-only evaluates the classifier given by --init: pass a fine-tuned checkpoint")
    if args.init_blocks is not None and not args.init:
        raise RunError("--init-blocks picks blocks of the --init checkpoint: pass --init CKPT too")
    if args.model in CONVNETS and (args.layer_decay != 1 or args.init):
        raise RunError(f"--model {args.model} is the from-scratch ConvNet reference: it takes no --init or "
                       f"--eval-only, and no layer decay (pass --layer-decay 1.0)")
    procs = Processes(args.device)
    seed_everything(args.seed)

    # data ------------------------------------------------------------------------------------------
    val_loader, num_val, num_classes = build_eval_loader(args, procs, train=False, subset=args.val_subset)

    # model -----------------------------------------------------------------------------------------
    if args.model in CONVNETS:
        model = convnet(args.model, num_classes).to(procs.device)
    else:
        model = vit(args.model, img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes,
                    global_pool=args.global_pool, drop_path_rate=args.drop_path).to(procs.device)
    if args.eval_only:
        evaluate_checkpoint(model, args.init, val_loader, num_val, procs, args)
        procs.close()
        return
    if args.init and not args.resume:
        fresh_state = {name: value.clone() for name, value in model.state_dict().items()}
        report = load_pretrained(model, args.init)               # the head and fc_norm start fresh
        if procs.is_main:
            print(f"init from {args.init}: {report.summary()}", flush=True)
        if args.init_blocks is not None:
            kept = keep_only_blocks(model, fresh_state, args.init_blocks)
            if procs.is_main:
                print(f"--init-blocks {','.join(map(str, args.init_blocks))}: {len(kept)} tensors kept from "
                      f"{args.init}; every other weight starts as from scratch", flush=True)
    elif not args.resume and procs.is_main:
        baseline = '' if args.model in CONVNETS else ' (the supervised baseline)'
        print(f"no --init: {args.model} from scratch{baseline}", flush=True)

    loader, num_train, train_classes = build_train_loader(args, procs, rand_aug)
    if train_classes != num_classes:
        raise RunError(f"--data {args.data}: {train_classes} classes in train but {num_classes} in val")
    batch_mixing = build_batch_mixing(args.mixup, args.cutmix, num_classes)

    # optimizer: layer-wise lr decay ----------------------------------------------------------------
    effective_batch = args.batch_size * args.accum_iter * procs.world_size
    lr = args.lr if args.lr is not None else args.blr * effective_batch / 256   # the linear scaling rule
    lr_at = warmup_cosine(lr, args.min_lr, args.warmup_epochs, args.epochs)
    if args.model in CONVNETS:
        groups = weight_decay_groups(model, args.weight_decay)
    else:
        groups = layer_decay_groups(model, args.weight_decay, args.layer_decay)
    if args.optimizer == 'adamw':
        optimizer = adamw(groups, lr, (0.9, 0.999), procs.device)
    else:   # the transfer recipe
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    scaler = grad_scaler(args.amp, procs.device)                  # fp16 only
    start_epoch, ckpt = resume_checkpoint(args.resume, STAGE, optimizer, scaler, model=model)
    best_top1 = ckpt['best_top1'] if ckpt else 0.0
    train_model = compile_and_wrap(model, procs, args.compile, args.compile_mode)
    out = Path(args.output_dir)
    announce(procs, model, lr, effective_batch, out, f" | {num_train} train / {num_val} val images, "
                                                     f"{num_classes} classes, {len(loader)} steps/epoch",
             amp=args.amp)
    log = prepare_output(out, args, start_epoch, procs.is_main)

    # the loop --------------------------------------------------------------------------------------
    def losses(imgs, labels, epoch_frac):
        return {'loss': classification_loss(train_model, imgs, labels, batch_mixing, args.smoothing)}

    for epoch in range(start_epoch, args.epochs):
        record = {'epoch': epoch, **train_one_epoch(train_model, loader, optimizer, losses, lr_at, epoch, procs,
                                                    accum_iter=args.accum_iter, amp=args.amp, scaler=scaler,
                                                    clip_grad=args.clip_grad, seed=args.seed)}
        last, is_best = epoch + 1 == args.epochs, False
        if last or (epoch + 1) % args.eval_every == 0:
            record.update({f'val_{name}': value for name, value in
                           evaluate(train_model, val_loader, procs, args.amp).items()})
            is_best = record['val_top1'] > best_top1
            best_top1 = max(best_top1, record['val_top1'])
            record['best_top1'] = best_top1
        if last:   # did the fine-tune fit its own training images? (clean: the eval view, no mixing)
            clean_loader, num_clean, _ = build_eval_loader(args, procs, train=True,
                                                           subset=min(args.subset or CLEAN_TRAIN_IMAGES,
                                                                      CLEAN_TRAIN_IMAGES))
            record['train_top1'] = evaluate(train_model, clean_loader, procs, args.amp)['top1']
        if procs.is_main:
            append_log(log, record)
            state = dict(stage=STAGE, epoch=epoch, args=vars(args), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                         top1=record.get('val_top1'), best_top1=best_top1)
            if 'val_top1' in record:   # a checkpoint at each evaluation: --eval-every, and the last epoch
                if is_best:   # before the last checkpoint: a crash in between only repeats this epoch
                    save_checkpoint(out / 'best.pth', **state)
                save_checkpoint(out / 'checkpoint.pth', **state)
            line = f"epoch {epoch}: loss {record['loss']:.4f}, {record['img_per_s']:.0f} img/s"
            if 'val_top1' in record:
                line += (f", val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}% "
                         f"loss {record['val_loss']:.4f} (best {best_top1:.2f}%)")
            if last:
                line += (f"; train top-1 {record['train_top1']:.2f}% on {num_clean} of its training "
                         f"images (eval view)")
            print(line, flush=True)
    procs.close()


# --------------------------------------------------------------------------------------------------
# The hand-designed references: ConvNets trained from scratch (the paper's first claim)
# --------------------------------------------------------------------------------------------------
def convnet(name, num_classes):
    """A torchvision ConvNet, randomly initialised (torchvision's init), with a stem for small images:
    stride 16 in all instead of 32, so a 28-px image ends as a 2 x 2 map, not 1 x 1. Any --img-size.
    - mobilenet_v3_large: a lightweight network found by architecture search, ViT-Tiny's size (5.4M
      parameters at 1,000 classes vs 5.7M); its first convolution at stride 1 instead of 2, and batch
      norm's running statistics at PyTorch's momentum 0.1 instead of torchvision's 0.01, which averages
      over ~100 steps: after a 400-step fine-tune they were still near their initial values, and the
      eval top-1 at chance.
    - resnet18: twice ViT-Tiny's size; a 3x3 convolution of stride 2 and no max pool instead of the 7x7
      stride-2 convolution and max pool."""
    if name == 'mobilenet_v3_large':
        model = mobilenet_v3_large(num_classes=num_classes)
        model.features[0][0].stride = (1, 1)
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = 0.1
        return model
    model = resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


if __name__ == '__main__':
    run_main(main)
