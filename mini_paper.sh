#!/usr/bin/env bash
# The paper in miniature: every stage of the pipeline on Fashion-MNIST, then RUN_DIR/REPORT.md with
# the paper's table and one sentence per claim. About 30 minutes on a 2-core laptop CPU.
#
#   bash mini_paper.sh [RUN_DIR] [--full | --smoke]
#
#   --full   on a GPU: all 60,000 training images and longer schedules (same steps, same order)
#   --smoke  seconds per stage, to check the pipeline end to end (the tests use it); numbers mean nothing
#
# Each `stage NAME command...` line below is one stage: copy the command after the name to run it alone.
set -euo pipefail
cd "$(dirname "$0")"
RUN=runs/mini_paper
SIZE=quick
for arg in "$@"; do
  case $arg in
    --full) SIZE=full ;;
    --smoke) SIZE=smoke ;;
    -*) echo "usage: bash mini_paper.sh [RUN_DIR] [--full | --smoke]" >&2; exit 2 ;;
    *) RUN=$arg ;;
  esac
done
PY=${PYTHON:-python}
EXTRA=${MINI_PAPER_ARGS:-}     # e.g. MINI_PAPER_ARGS="--data-root /data" for every stage

# schedule overrides on top of the quick configs: pre-training, fine-tuning, probing, analysis
case $SIZE in
  quick) PRE=""; FT=""; LP=""; AN="--num-images 500" ;;
  full)  PRE="--subset 0 --epochs 100 --warmup-epochs 10 --batch-size 256"
         FT="--subset 0 --val-subset 0 --epochs 50 --warmup-epochs 5"
         LP="--subset 0 --epochs 90"; AN="--num-images 2000" ;;
  smoke) PRE="--img-size 16 --subset 128 --epochs 1 --batch-size 64"
         FT="--img-size 16 --subset 128 --val-subset 64 --epochs 1 --batch-size 64"
         LP="--img-size 16 --subset 128 --val-subset 64 --epochs 2 --batch-size 64"; AN="--num-images 64 --batch-size 32" ;;
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

# 1. pre-training: MAE of ViT-Tiny, MAE of a bigger teacher (ViT-Small), D-MAE of ViT-Tiny from it
stage mae_tiny $PY pretrain_mae.py --config configs/mae_tiny_fashion_mnist_quick.yaml $PRE $EXTRA --output-dir $RUN/mae_tiny
stage mae_small_teacher $PY pretrain_mae.py --config configs/mae_small_teacher_fashion_mnist_quick.yaml $PRE $EXTRA --output-dir $RUN/mae_small_teacher
stage dmae_tiny $PY pretrain_distill.py --config configs/dmae_tiny_fashion_mnist_quick.yaml --teacher $RUN/mae_small_teacher/checkpoint.pth $PRE $EXTRA --output-dir $RUN/dmae_tiny

# 2. fine-tuning: from scratch (the supervised baseline), from MAE, from D-MAE
stage ft_scratch $PY finetune.py --config configs/finetune_fashion_mnist_quick.yaml $FT $EXTRA --output-dir $RUN/ft_scratch
stage ft_mae $PY finetune.py --config configs/finetune_fashion_mnist_quick.yaml --init $RUN/mae_tiny/checkpoint.pth $FT $EXTRA --output-dir $RUN/ft_mae
stage ft_dmae $PY finetune.py --config configs/finetune_fashion_mnist_quick.yaml --init $RUN/dmae_tiny/checkpoint.pth $FT $EXTRA --output-dir $RUN/ft_dmae

# 3. linear probing (cached features): random init, MAE, D-MAE
stage probe_random $PY linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml $LP $EXTRA --output-dir $RUN/probe_random
stage probe_mae $PY linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml --init $RUN/mae_tiny/checkpoint.pth $LP $EXTRA --output-dir $RUN/probe_mae
stage probe_dmae $PY linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml --init $RUN/dmae_tiny/checkpoint.pth $LP $EXTRA --output-dir $RUN/probe_dmae

# 4. analysis: layer CKA, then attention distance and entropy of each model
stage cka_mae_vs_scratch $PY analyze.py cka --a $RUN/mae_tiny/checkpoint.pth --b $RUN/ft_scratch/checkpoint.pth --data fashion_mnist $AN $EXTRA --output-dir $RUN/cka_mae_vs_scratch
stage cka_dmae_vs_teacher $PY analyze.py cka --a $RUN/dmae_tiny/checkpoint.pth --b $RUN/mae_small_teacher/checkpoint.pth --data fashion_mnist $AN $EXTRA --output-dir $RUN/cka_dmae_vs_teacher
for model in mae_tiny mae_small_teacher dmae_tiny ft_scratch ft_mae ft_dmae; do
  stage attention_$model $PY analyze.py attention --ckpt $RUN/$model/checkpoint.pth --data fashion_mnist $AN $EXTRA --output-dir $RUN/attention_$model
done

# 5. the report
$PY analyze.py report $RUN
