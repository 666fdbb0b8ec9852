#!/usr/bin/env bash
# The paper in miniature: its four claims tested on Fashion-MNIST on a laptop CPU, with seeds and error
# bars, then RUN_DIR/REPORT.md and RUN_DIR/report.json (mini_report.py). About 30 minutes on 2 cores.
#
#   bash mini_paper.sh [RUN_DIR] [--full | --smoke] [--moco]
#
#   --full   on a GPU: longer schedules and more labels (same stages, same order), MoCo v3 included
#   --smoke  seconds per stage, to check the pipeline end to end (the tests use it); numbers mean nothing
#   --moco   add the MoCo v3 stages (claim 2b) and a from-scratch reference on the unseen classes to the
#            default run: about 12 minutes more on 2 cores
#
# The regime. Pre-training sees the images of 5 classes only (SOURCE: T-shirt, trouser, coat, sandal,
# bag), without labels; the downstream task is the other 5 (TARGET: pullover, dress, shirt, sneaker,
# ankle boot), which no pre-training saw. Fine-tunes use 20 labels per class (a fixed stratified
# sample), one recipe for every init of a task (the paper's layer decay: 0.85 on the pre-training
# classes as its ImageNet recipe, 0.75 for transfer; none from scratch), several seeds each, and are
# checked to fit their own training images.
#   claim 1  fine-tune on SOURCE labels: from MAE vs from scratch
#   claim 2  fine-tune on TARGET labels: from supervised pre-training (SOURCE labels) vs from MAE
#   claim 2b fine-tune on TARGET labels: from MoCo v3 (contrastive, no labels) vs from MAE (with --moco)
#   claim 3  layer CKA between MAE and the supervised reference: lower layers vs higher layers
#   claim 4  fine-tune on SOURCE labels: from D-MAE (teacher: a ViT-Small MAE trained longer) vs from MAE
#
# Each `stage NAME command...` line is one stage: copy the command after the name to run it alone.
set -euo pipefail
cd "$(dirname "$0")"
RUN=runs/mini_paper
SIZE=quick
MOCO=no
for arg in "$@"; do
  case $arg in
    --full) SIZE=full; MOCO=yes ;;
    --smoke) SIZE=smoke ;;
    --moco) MOCO=yes ;;
    -*) echo "usage: bash mini_paper.sh [RUN_DIR] [--full | --smoke] [--moco]" >&2; exit 2 ;;
    *) RUN=$arg ;;
  esac
done
PY=${PYTHON:-python}
EXTRA=${MINI_PAPER_ARGS:-}     # e.g. MINI_PAPER_ARGS="--data-root /data" for every stage
SOURCE=0,1,4,5,8
TARGET=2,3,6,7,9

# schedules on top of the quick configs: MAE, teacher, D-MAE, supervised reference, MoCo v3, fine-tunes,
# probes
case $SIZE in
  quick) MAE=""; TEACHER=""; DMAE=""; SUP=""; MOCO_RUN=""; FT=""; PROBE=""; AN=""; SEEDS="0 1 2" ;;
  full)  MAE="--epochs 100 --warmup-epochs 10"; TEACHER="--epochs 200 --warmup-epochs 20"
         DMAE="--epochs 100 --warmup-epochs 10"; SUP="--subset 0 --epochs 30"
         MOCO_RUN="--subset 0 --epochs 100 --warmup-epochs 10 --batch-size 256"
         FT="--subset 1000 --epochs 100"; PROBE="--subset 0"; AN="--num-images 2000"; SEEDS="0 1 2 3 4" ;;
  smoke) S="--img-size 14 --subset 64 --epochs 1 --warmup-epochs 0 --batch-size 32"
         MAE=$S; TEACHER=$S; DMAE=$S; SUP=$S; MOCO_RUN="$S --mlp-dim 256 --out-dim 64"
         FT="$S --val-subset 64"; PROBE="$S --val-subset 64"; AN="--num-images 64 --batch-size 32"; SEEDS="0" ;;
esac
mkdir -p "$RUN"
stage() {   # stage NAME command...: run one stage, record its wall time in RUN/times.jsonl
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@"
  echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - start))}" >> "$RUN/times.jsonl"
}
rm -f "$RUN/times.jsonl"
FINETUNE="$PY finetune.py --config configs/finetune_fashion_mnist_quick.yaml"
PROBE_CMD="$PY linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml"

# 1. pre-training on the SOURCE images: MAE-Tiny, a bigger MAE teacher (ViT-Small, more image-passes),
#    D-MAE-Tiny from that teacher (all three without labels), and the supervised reference (with labels)
stage mae_tiny $PY pretrain_mae.py --config configs/mae_tiny_fashion_mnist_quick.yaml --classes $SOURCE $MAE $EXTRA --output-dir $RUN/mae_tiny
stage mae_teacher $PY pretrain_mae.py --config configs/mae_small_teacher_fashion_mnist_quick.yaml --classes $SOURCE $TEACHER $EXTRA --output-dir $RUN/mae_teacher
stage dmae_tiny $PY pretrain_distill.py --config configs/dmae_tiny_fashion_mnist_quick.yaml --classes $SOURCE --teacher $RUN/mae_teacher/checkpoint.pth $DMAE $EXTRA --output-dir $RUN/dmae_tiny
stage supervised $PY finetune.py --config configs/supervised_fashion_mnist_quick.yaml --classes $SOURCE $SUP $EXTRA --output-dir $RUN/supervised
if [ $MOCO = yes ]; then   # the contrastive baseline, without labels (quick: 4,096 images, its cost is ~10x MAE's per image)
  stage moco_tiny $PY pretrain_moco.py --config configs/moco_tiny_fashion_mnist_quick.yaml --classes $SOURCE $MOCO_RUN $EXTRA --output-dir $RUN/moco_tiny
fi

# 2. is the teacher better than its student? held-out reconstruction loss (same masks) and linear probe
stage recon_mae_tiny $PY analyze.py reconstruct --ckpt $RUN/mae_tiny/checkpoint.pth --num-images 2000 $EXTRA --output-dir $RUN/recon_mae_tiny
stage recon_teacher $PY analyze.py reconstruct --ckpt $RUN/mae_teacher/checkpoint.pth --num-images 2000 $EXTRA --output-dir $RUN/recon_teacher
stage probe_random_src $PROBE_CMD --classes $SOURCE $PROBE $EXTRA --output-dir $RUN/probe_random_src
stage probe_mae_src $PROBE_CMD --classes $SOURCE --init $RUN/mae_tiny/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_mae_src
stage probe_teacher_src $PROBE_CMD --classes $SOURCE --model vit_small --init $RUN/mae_teacher/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_teacher_src
stage probe_dmae_src $PROBE_CMD --classes $SOURCE --init $RUN/dmae_tiny/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_dmae_src
stage probe_supervised_src $PROBE_CMD --classes $SOURCE --init $RUN/supervised/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_supervised_src
# claim 2's readouts of frozen features (linear probe, kNN) on the unseen classes
stage probe_mae_dst $PROBE_CMD --classes $TARGET --init $RUN/mae_tiny/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_mae_dst
stage probe_supervised_dst $PROBE_CMD --classes $TARGET --init $RUN/supervised/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_supervised_dst
if [ $MOCO = yes ]; then
  stage probe_moco_src $PROBE_CMD --classes $SOURCE --init $RUN/moco_tiny/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_moco_src
  stage probe_moco_dst $PROBE_CMD --classes $TARGET --init $RUN/moco_tiny/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_moco_dst
  stage probe_random_dst $PROBE_CMD --classes $TARGET $PROBE $EXTRA --output-dir $RUN/probe_random_dst
fi

# 3. fine-tunes on a few labels, every seed: the SOURCE task (claims 1 and 4), the TARGET task (claim 2)
for seed in $SEEDS; do
  stage ft_scratch_s$seed $FINETUNE --classes $SOURCE --layer-decay 1.0 --seed $seed $FT $EXTRA --output-dir $RUN/ft_scratch_s$seed
  stage ft_mae_s$seed $FINETUNE --classes $SOURCE --init $RUN/mae_tiny/checkpoint.pth --seed $seed $FT $EXTRA --output-dir $RUN/ft_mae_s$seed
  stage ft_dmae_s$seed $FINETUNE --classes $SOURCE --init $RUN/dmae_tiny/checkpoint.pth --seed $seed $FT $EXTRA --output-dir $RUN/ft_dmae_s$seed
  stage transfer_mae_s$seed $FINETUNE --classes $TARGET --layer-decay 0.75 --init $RUN/mae_tiny/checkpoint.pth --seed $seed $FT $EXTRA --output-dir $RUN/transfer_mae_s$seed
  stage transfer_supervised_s$seed $FINETUNE --classes $TARGET --layer-decay 0.75 --init $RUN/supervised/checkpoint.pth --seed $seed $FT $EXTRA --output-dir $RUN/transfer_supervised_s$seed
  if [ $MOCO = yes ]; then
    stage transfer_moco_s$seed $FINETUNE --classes $TARGET --layer-decay 0.75 --init $RUN/moco_tiny/checkpoint.pth --seed $seed $FT $EXTRA --output-dir $RUN/transfer_moco_s$seed
    stage transfer_scratch_s$seed $FINETUNE --classes $TARGET --layer-decay 1.0 --seed $seed $FT $EXTRA --output-dir $RUN/transfer_scratch_s$seed
  fi
done

# 4. analysis: layer CKA of MAE against the supervised reference (claim 3), attention distance/entropy
stage cka_mae_vs_supervised $PY analyze.py cka --a $RUN/mae_tiny/checkpoint.pth --b $RUN/supervised/checkpoint.pth $AN $EXTRA --output-dir $RUN/cka_mae_vs_supervised
for model in mae_tiny dmae_tiny mae_teacher supervised; do
  stage attention_$model $PY analyze.py attention --ckpt $RUN/$model/checkpoint.pth $AN $EXTRA --output-dir $RUN/attention_$model
done

# 5. the report: REPORT.md and report.json
$PY mini_report.py $RUN
