#!/usr/bin/env bash
# The paper in miniature: every claim of its abstract tested on Fashion-MNIST on a laptop CPU, with
# pre-training seeds, fine-tune seeds and error bars, then RUN_DIR/REPORT.md and RUN_DIR/report.json
# (mini_report.py, which states the verdict rule).
#
#   bash mini_paper.sh [RUN_DIR] [--full | --smoke]
#
#   --full   on a GPU: all images, longer schedules, 1,000 labels (claim 4: all), 3 pre-training x 5
#            fine-tune seeds
#   --smoke  seconds per stage, to check the pipeline end to end (the tests use it); numbers mean nothing
#
# The regime. Pre-training sees the images of 5 classes only (SOURCE: T-shirt, trouser, coat, sandal,
# bag), without labels; the downstream task is the other 5 (TARGET: pullover, dress, shirt, sneaker,
# ankle boot), which no pre-training saw. Fine-tunes use 20 labels per class (a fixed stratified
# sample), one recipe for every init (the paper's ImageNet layer decay 0.85, also for transfer, where
# 0.75 left fine-tunes short of fitting; none from scratch), and are checked to fit their own
# training images; claim 4's fine-tunes get more labels (MORE: 10x in the quick run), the
# data-sufficient side, where the paper measures D-MAE. Every pre-trained model that a claim compares
# has PRETRAIN_SEEDS seeds.
#   claim 0  SOURCE: from MAE vs a MobileNetV3-Large from scratch (own tuned recipe)  noninferiority
#   claim 1  SOURCE: from MAE vs a ViT-Tiny from scratch                               difference
#   claim 2  TARGET: from supervised pre-training (SOURCE labels) vs from MAE          difference
#   claim 2b TARGET: from MoCo v3 (contrastive, no labels) vs from MAE                 difference
#   claim 3  layer CKA between MAE and the supervised reference: lower vs higher layers difference
#   claim 3b SOURCE: MAE's blocks 0-5 kept (6-11 re-initialised) vs blocks 6-11 kept   difference
#   claim 4  SOURCE, MORE labels: from D-MAE (teacher: a longer-trained ViT-Small MAE) difference
#            vs from MAE
#   claim 4b TARGET: from D-MAE vs from MAE                                            difference
#   claim 5  SOURCE: MAE on all 30,000 images vs on 6,000, the same optimizer steps    equivalence
#
# Each `stage NAME command...` or `later NAME command...` line is one stage: copy the command after
# the name to run it alone. `later` stages are queued and run JOBS at a time, each with THREADS
# threads: two 1-thread stages side by side finish a little sooner than the two one after the other
# with 2 threads each, by overlapping their start-up, data loading and evaluation (docs/speed.md).
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
CORES=$(nproc)
JOBS=${MINI_PAPER_JOBS:-$(( CORES >= 2 ? 2 : 1 ))}
THREADS=${MINI_PAPER_THREADS:-$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))}
SOURCE=0,1,4,5,8
TARGET=2,3,6,7,9

# schedules on top of the quick configs: MAE, its 5x smaller pre-training set (5x the epochs: the same
# steps), teacher, D-MAE, supervised reference, MoCo v3, fine-tunes, claim 4's fine-tunes on more labels
# (the same steps in quick), probes, analysis; and the seeds
case $SIZE in
  quick) B="--amp bf16"   # pre-training in bf16: 2-2.6x faster for ViT-Small on one CPU thread (docs/speed.md)
         MAE=$B; SMALL="--subset 6000 --epochs 20 --warmup-epochs 2.5 $B"; TEACHER=$B; DMAE=$B
         SUP=""; MOCO=$B; FT=""; MORE="--subset 1000 --epochs 10"; PROBE=""; AN=""
         PRETRAIN_SEEDS="0 1"; FINETUNE_SEEDS="0"; SCRATCH_SEEDS="0 1" ;;
  full)  MAE="--epochs 100 --warmup-epochs 10"; SMALL="--subset 6000 --epochs 500 --warmup-epochs 50"
         TEACHER="--epochs 200 --warmup-epochs 20"; DMAE="--epochs 100 --warmup-epochs 10"
         SUP="--subset 0 --epochs 30"; MOCO="--subset 0 --epochs 100 --warmup-epochs 10 --batch-size 256"
         FT="--subset 1000 --epochs 100"; MORE="--subset 0 --epochs 30"; PROBE="--subset 0"; AN="--num-images 2000"
         PRETRAIN_SEEDS="0 1 2"; FINETUNE_SEEDS="0 1 2 3 4"; SCRATCH_SEEDS="0 1 2 3 4" ;;
  smoke) S="--img-size 14 --subset 64 --epochs 1 --warmup-epochs 0 --batch-size 32"
         MAE=$S; SMALL="$S --subset 32"; TEACHER=$S; DMAE=$S; SUP=$S; MOCO="$S --mlp-dim 256 --out-dim 64"
         FT="$S --val-subset 64"; MORE=""; PROBE="$S --val-subset 64"; AN="--num-images 64 --batch-size 32"
         PRETRAIN_SEEDS="0"; FINETUNE_SEEDS="0"; SCRATCH_SEEDS="0" ;;
esac
FIRST=${PRETRAIN_SEEDS%% *}    # the pre-training seed whose encoders are probed and analysed
mkdir -p "$RUN/logs"
rm -f "$RUN/times.jsonl" "$RUN/wall.jsonl" "$RUN/failed"
START=$SECONDS

stage() {   # stage NAME command...: run one stage now, its output in RUN/logs/NAME.log, its time in times.jsonl
  local name=$1 start=$SECONDS
  shift
  echo "== $name: OMP_NUM_THREADS=$THREADS $*"
  if OMP_NUM_THREADS=$THREADS "$@" > "$RUN/logs/$name.log" 2>&1; then
    echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - start)), \"threads\": $THREADS}" >> "$RUN/times.jsonl"
    echo "   $name done in $((SECONDS - start)) s"
  else
    echo "   $name FAILED; the end of $RUN/logs/$name.log:" >&2
    tail -5 "$RUN/logs/$name.log" >&2
    echo "$name" >> "$RUN/failed"
  fi
}
QUEUE=()
later() {   # later NAME command...: queue a stage for `run_queue`
  QUEUE+=("$(printf '%q ' "$@")")
}
run_queue() {   # the queued stages, JOBS at a time, in the order queued; then wait for all
  local job
  for job in "${QUEUE[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    eval "stage $job" &
  done
  wait
  QUEUE=()
  if [ -s "$RUN/failed" ]; then echo "stopped: $(tr '\n' ' ' < "$RUN/failed")failed" >&2; exit 1; fi
}
FINETUNE="$PY finetune.py --config configs/finetune_fashion_mnist_quick.yaml"
# the hand-designed ConvNet from scratch for claim 0, MobileNetV3-Large (ViT-Tiny's size), with its
# searched recipe (RESULTS.md)
MOBILENET="$FINETUNE --model mobilenet_v3_large --layer-decay 1.0 --blr 3e-2 --weight-decay 0.05"
PROBE_CMD="$PY linear_probe.py --config configs/linprobe_fashion_mnist_quick.yaml"

# 1. pre-training on the SOURCE images, the longest stage first: a bigger MAE teacher (ViT-Small,
#    more image-passes), then per seed MoCo v3, the supervised reference (with labels), MAE-Tiny, and
#    MAE-Tiny on a 5x smaller subset for the same number of steps. (Queued longest first throughout,
#    the two lanes ended no sooner: a stage's time depends on the stage beside it; docs/speed.md)
later mae_teacher $PY pretrain_mae.py --config configs/mae_small_teacher_fashion_mnist_quick.yaml --classes $SOURCE $TEACHER $EXTRA --output-dir $RUN/mae_teacher
for p in $PRETRAIN_SEEDS; do
  later moco_tiny_p$p $PY pretrain_moco.py --config configs/moco_tiny_fashion_mnist_quick.yaml --classes $SOURCE --seed $p $MOCO $EXTRA --output-dir $RUN/moco_tiny_p$p
  later supervised_p$p $PY finetune.py --config configs/supervised_fashion_mnist_quick.yaml --classes $SOURCE --seed $p $SUP $EXTRA --output-dir $RUN/supervised_p$p
  later mae_tiny_p$p $PY pretrain_mae.py --config configs/mae_tiny_fashion_mnist_quick.yaml --classes $SOURCE --seed $p $MAE $EXTRA --output-dir $RUN/mae_tiny_p$p
  later mae_small_data_p$p $PY pretrain_mae.py --config configs/mae_tiny_fashion_mnist_quick.yaml --classes $SOURCE --seed $p $SMALL $EXTRA --output-dir $RUN/mae_small_data_p$p
done
run_queue

# 2. D-MAE-Tiny from the teacher, per seed; is the teacher better than its student? (held-out
#    reconstruction loss on the same masks, and linear probe); frozen readouts (probe + kNN) of the
#    first seed's encoders, on the pre-training classes (src) and the unseen ones (dst)
for p in $PRETRAIN_SEEDS; do
  later dmae_tiny_p$p $PY pretrain_distill.py --config configs/dmae_tiny_fashion_mnist_quick.yaml --classes $SOURCE --teacher $RUN/mae_teacher/checkpoint.pth --seed $p $DMAE $EXTRA --output-dir $RUN/dmae_tiny_p$p
done
later recon_mae_tiny $PY analyze.py reconstruct --ckpt $RUN/mae_tiny_p$FIRST/checkpoint.pth --num-images 2000 $EXTRA --output-dir $RUN/recon_mae_tiny
later recon_teacher $PY analyze.py reconstruct --ckpt $RUN/mae_teacher/checkpoint.pth --num-images 2000 $EXTRA --output-dir $RUN/recon_teacher
later probe_random_src $PROBE_CMD --classes $SOURCE $PROBE $EXTRA --output-dir $RUN/probe_random_src
later probe_teacher_src $PROBE_CMD --classes $SOURCE --model vit_small --init $RUN/mae_teacher/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_teacher_src
for model in mae_tiny supervised moco_tiny; do
  for task in src dst; do
    classes=$([ $task = src ] && echo $SOURCE || echo $TARGET)
    later probe_${model%_tiny}_$task $PROBE_CMD --classes $classes --init $RUN/${model}_p$FIRST/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_${model%_tiny}_$task
  done
done
run_queue

# 3. fine-tunes on a few labels: the SOURCE task (claims 0, 1, 3b, 5; 4 on MORE labels), the TARGET
#    task (2, 2b, 4b); from scratch per fine-tune seed, from a pre-trained model per pre-training seed x
#    fine-tune seed
for s in $SCRATCH_SEEDS; do
  later ft_mobilenet_s$s $MOBILENET --classes $SOURCE --seed $s $FT $EXTRA --output-dir $RUN/ft_mobilenet_s$s
  later ft_scratch_s$s $FINETUNE --classes $SOURCE --layer-decay 1.0 --seed $s $FT $EXTRA --output-dir $RUN/ft_scratch_s$s
  later transfer_scratch_s$s $FINETUNE --classes $TARGET --layer-decay 1.0 --seed $s $FT $EXTRA --output-dir $RUN/transfer_scratch_s$s
done
for p in $PRETRAIN_SEEDS; do
  for s in $FINETUNE_SEEDS; do
    opts="--seed $s $FT $EXTRA"
    later ft_mae_p${p}_s$s $FINETUNE --classes $SOURCE --init $RUN/mae_tiny_p$p/checkpoint.pth $opts --output-dir $RUN/ft_mae_p${p}_s$s
    for model in mae_tiny dmae_tiny; do
      name=${model%_tiny}_more_labels
      later ft_${name}_p${p}_s$s $FINETUNE --classes $SOURCE --init $RUN/${model}_p$p/checkpoint.pth $opts $MORE --output-dir $RUN/ft_${name}_p${p}_s$s
    done
    later ft_mae_small_data_p${p}_s$s $FINETUNE --classes $SOURCE --init $RUN/mae_small_data_p$p/checkpoint.pth $opts --output-dir $RUN/ft_mae_small_data_p${p}_s$s
    later ft_mae_low_p${p}_s$s $FINETUNE --classes $SOURCE --init $RUN/mae_tiny_p$p/checkpoint.pth --init-blocks 0-5 $opts --output-dir $RUN/ft_mae_low_p${p}_s$s
    later ft_mae_high_p${p}_s$s $FINETUNE --classes $SOURCE --init $RUN/mae_tiny_p$p/checkpoint.pth --init-blocks 6-11 $opts --output-dir $RUN/ft_mae_high_p${p}_s$s
    for model in mae_tiny supervised moco_tiny dmae_tiny; do
      name=${model%_tiny}
      later transfer_${name}_p${p}_s$s $FINETUNE --classes $TARGET --init $RUN/${model}_p$p/checkpoint.pth $opts --output-dir $RUN/transfer_${name}_p${p}_s$s
    done
  done
done

# 4. analysis of the first seed's encoders: D-MAE's probes, layer CKA of MAE against the supervised
#    reference (claim 3), attention distance and entropy of each model (drawn, not judged)
for task in src dst; do
  classes=$([ $task = src ] && echo $SOURCE || echo $TARGET)
  later probe_dmae_$task $PROBE_CMD --classes $classes --init $RUN/dmae_tiny_p$FIRST/checkpoint.pth $PROBE $EXTRA --output-dir $RUN/probe_dmae_$task
done
later cka_mae_vs_supervised $PY analyze.py cka --a $RUN/mae_tiny_p$FIRST/checkpoint.pth --b $RUN/supervised_p$FIRST/checkpoint.pth $AN $EXTRA --output-dir $RUN/cka_mae_vs_supervised
for model in mae_tiny dmae_tiny moco_tiny supervised; do
  later attention_$model $PY analyze.py attention --ckpt $RUN/${model}_p$FIRST/checkpoint.pth $AN $EXTRA --output-dir $RUN/attention_$model
done
later attention_mae_teacher $PY analyze.py attention --ckpt $RUN/mae_teacher/checkpoint.pth $AN $EXTRA --output-dir $RUN/attention_mae_teacher
run_queue

# 5. the report: REPORT.md and report.json
echo "{\"seconds\": $((SECONDS - START)), \"jobs\": $JOBS, \"threads\": $THREADS}" >> "$RUN/wall.jsonl"
$PY mini_report.py $RUN
