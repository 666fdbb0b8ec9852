"""A quick ablation that means something: two settings of one stage, with seeds and a verdict.

    python ablate.py --stage pretrain_mae --a "--mask-ratio 0.75" --b "--mask-ratio 0.9"
    python ablate.py --stage pretrain_distill --a "--distill-layers -1" --b "--distill-layers 5,-1"
    python ablate.py --stage finetune --a "--layer-decay 0.85" --b "--layer-decay 0.65"
    python ablate.py --stage pretrain_mae --a "" --b=--no-norm-pix-loss     # one word: write --b=...

Both arms run in the regime of mini_paper.sh: pre-training on the images of 5 Fashion-MNIST classes
without their labels (SOURCE), its quick configs, fine-tunes on 100 labels of those classes and of the
5 classes no pre-training saw (TARGET), a linear probe and kNN on SOURCE. A pre-training ablation also
fine-tunes on claim 4's more labels of SOURCE (quick: 1,000 for the same steps), where a 100-label
fine-tune can erase what pre-training changed (RESULTS.md). The varied stage runs --seeds times per
arm with the arm's flags last (they override the config), and every readout downstream of it runs per
arm and seed. A stage the arms do not change (the teacher of a D-MAE ablation, the pre-training of a
fine-tune ablation) runs once, and both arms use it.

Each readout gets one number per seed of the varied stage (the mean of its fine-tune seeds), the
difference b - a with its Welch standard error, and mini_report.verdict's rule for a difference: "b
better" beyond two standard errors, "a better" beyond minus two, else "no difference shown". For the
stage's own final loss lower is better; losses only compare when both arms keep the same objective
(another mask ratio is another task).

Writes RUN/ablation.md and RUN/ablation.json; each stage's command heads its log, RUN/logs/NAME.log
(copy it to run that stage alone). Run again with the same flags, it skips the stages already done,
but not those downstream of a stage that runs again.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mini_report import describe, last_record, read_jsonl, verdict
from operations import RunError, run_main

REPO = Path(__file__).resolve().parent
SOURCE, TARGET = '0,1,4,5,8', '2,3,6,7,9'          # as mini_paper.sh
CONFIGS = {'pretrain_mae': 'configs/mae_tiny_fashion_mnist_quick.yaml',
           'pretrain_distill': 'configs/dmae_tiny_fashion_mnist_quick.yaml',
           'pretrain_moco': 'configs/moco_tiny_fashion_mnist_quick.yaml',
           'teacher': 'configs/mae_small_teacher_fashion_mnist_quick.yaml',
           'finetune': 'configs/finetune_fashion_mnist_quick.yaml',
           'linear_probe': 'configs/linprobe_fashion_mnist_quick.yaml'}
SCRIPTS = {'teacher': 'pretrain_mae'}                # a config's script, where its name is not one
REGIME_FLAGS = ('--config', '--output-dir', '--seed', '--classes', '--init', '--teacher', '--resume',
                '--data', '--data-root')             # the regime's, not an arm's

# mini_paper.sh's sizes: extra flags per stage, then the seeds of the varied stage and the fine-tune seeds
# (smoke: 2 seeds where mini_paper.sh has 1, so that the verdict is computed)
SMOKE = '--img-size 14 --subset 64 --epochs 1 --warmup-epochs 0 --batch-size 32'
SIZES = {
    'quick': dict(pretrain_mae='--amp bf16', pretrain_distill='--amp bf16', pretrain_moco='--amp bf16',
                  teacher='--amp bf16', finetune='', more_labels='--subset 1000 --epochs 10', linear_probe='',
                  seeds=2, finetune_seeds=1),
    'full': dict(pretrain_mae='--epochs 100 --warmup-epochs 10', pretrain_distill='--epochs 100 --warmup-epochs 10',
                 pretrain_moco='--subset 0 --epochs 100 --warmup-epochs 10 --batch-size 256',
                 teacher='--epochs 200 --warmup-epochs 20', finetune='--subset 1000 --epochs 100',
                 more_labels='--subset 0 --epochs 30', linear_probe='--subset 0', seeds=3, finetune_seeds=5),
    'smoke': dict(pretrain_mae=SMOKE, pretrain_distill=SMOKE, pretrain_moco=f'{SMOKE} --mlp-dim 256 --out-dim 64',
                  teacher=SMOKE, finetune=f'{SMOKE} --val-subset 64', more_labels='',
                  linear_probe=f'{SMOKE} --val-subset 64', seeds=2, finetune_seeds=1),
}
# seconds per stage of the quick regime, two 1-thread stages side by side (mini_paper.sh on a 2-core
# AMD EPYC, 2026-12-01, RESULTS.md): the estimate printed before a run starts
QUICK_SECONDS = {'pretrain_mae': 173, 'pretrain_distill': 274, 'pretrain_moco': 286, 'teacher': 538,
                 'finetune': 81, 'linear_probe': 28}
READOUTS = {'finetune_src': 'fine-tune top-1 %, pre-training classes',
            'finetune_dst': 'fine-tune top-1 %, unseen classes',
            'finetune_more': "fine-tune top-1 %, pre-training classes, claim 4's more labels",
            'probe': 'linear probe top-1 %, pre-training classes', 'knn': 'kNN top-1 %, pre-training classes',
            'loss': "the varied stage's final training loss (lower is better)"}


@dataclass
class Stage:
    name: str                                   # its folder under RUN, and RUN/logs/NAME.log
    config: str                                 # a key of CONFIGS
    flags: list
    needs: list = field(default_factory=list)   # the stages whose checkpoints it reads

    @property
    def script(self):
        return SCRIPTS.get(self.config, self.config)


# --------------------------------------------------------------------------------------------------
# The plan: the varied stage per arm and seed, the readouts downstream of it, the shared stages once
# --------------------------------------------------------------------------------------------------
def plan(stage, arms, seeds, size, run, extra):
    """-> (stages in the order to run, readouts {readout: {arm: [[stage names] per seed]}})."""
    sizes, stages = SIZES[size], []
    readouts = {name: {arm: [[] for _ in range(seeds)] for arm in arms} for name in READOUTS}

    def add(name, config, *flags, needs=()):
        # the size's flags first, so that an arm's own (--amp, --epochs) come later and win
        stages.append(Stage(name, config, ['--config', CONFIGS[config], *shlex.split(sizes[config]), *flags,
                                           *extra, '--output-dir', str(run / name)], list(needs)))
        return name

    def checkpoint(name):
        return str(run / name / 'checkpoint.pth')

    def finetunes(arm, seed, encoder, tag, finetune_seeds, arm_flags=(), more_labels=False):
        """Fine-tunes of `encoder` on SOURCE and on TARGET (layer decay 0.85 on both), and on more
        SOURCE labels."""
        for s in finetune_seeds:
            if more_labels:
                readouts['finetune_more'][arm][seed].append(add(
                    f'ft_more_labels_{tag}_s{s}', 'finetune', '--classes', SOURCE, '--init', checkpoint(encoder),
                    '--seed', str(s), *shlex.split(sizes['more_labels']), needs=[encoder]))
            readouts['finetune_src'][arm][seed].append(add(
                f'ft_{tag}_s{s}', 'finetune', '--classes', SOURCE, '--init', checkpoint(encoder), '--seed', str(s),
                *arm_flags, needs=[encoder]))
            readouts['finetune_dst'][arm][seed].append(add(
                f'transfer_{tag}_s{s}', 'finetune', '--classes', TARGET, '--init',
                checkpoint(encoder), '--seed', str(s), *arm_flags, needs=[encoder]))

    if stage == 'finetune':     # one shared pre-training; the arms' fine-tunes, one per seed
        encoder = add('mae', 'pretrain_mae', '--classes', SOURCE, '--seed', '0')
        for arm, flags in arms.items():
            for seed in range(seeds):
                finetunes(arm, seed, encoder, arm, [seed], flags)
                readouts['loss'][arm][seed] = readouts['finetune_src'][arm][seed][:]
        del readouts['probe'], readouts['knn']            # the shared encoder's: the same for both arms
        del readouts['finetune_more']                     # the arms' own fine-tunes are the readout
        return stages, readouts

    teacher = add('teacher', 'teacher', '--classes', SOURCE) if stage == 'pretrain_distill' else None
    for arm, flags in arms.items():
        for seed in range(seeds):
            encoder = add(f'{arm}_p{seed}', stage, '--classes', SOURCE, '--seed', str(seed),
                          *(['--teacher', checkpoint(teacher)] if teacher else []), *flags,
                          needs=[teacher] if teacher else [])
            finetunes(arm, seed, encoder, f'{arm}_p{seed}', range(sizes['finetune_seeds']), more_labels=True)
            probe = add(f'probe_{arm}_p{seed}', 'linear_probe', '--classes', SOURCE, '--init', checkpoint(encoder),
                        needs=[encoder])
            readouts['probe'][arm][seed] = readouts['knn'][arm][seed] = [probe]
            readouts['loss'][arm][seed] = [encoder]
    return stages, readouts


def check_arm_flags(stage, arm, flags):
    """Refuse, before anything runs, a flag the stage does not take or one the regime sets."""
    words = shlex.split(flags)
    theirs = [w for w in words if w.split('=')[0] in REGIME_FLAGS]
    if theirs:
        raise RunError(f"--{arm} '{flags}': {theirs[0].split('=')[0]} is set by the ablation's regime for every "
                       f"arm; vary another flag")
    parser = importlib.import_module(stage).build_parser()
    parser.exit_on_error = False
    try:
        with contextlib.redirect_stderr(io.StringIO()) as printed:
            _, unknown = parser.parse_known_args(words)
    except (SystemExit, argparse.ArgumentError) as e:
        message = str(e) if isinstance(e, argparse.ArgumentError) else printed.getvalue().strip().splitlines()[-1]
        raise RunError(f"--{arm} '{flags}': {message.removeprefix(f'{parser.prog}: error: ')}") from None
    if unknown:
        raise RunError(f"--{arm} '{flags}': {stage}.py takes no {' '.join(unknown)} (see python {stage}.py --help)")
    return words


# --------------------------------------------------------------------------------------------------
# Running the stages: JOBS at a time, each THREADS threads, each one command in its own process
# --------------------------------------------------------------------------------------------------
def command_line(stage, threads):
    return f"OMP_NUM_THREADS={threads} python {stage.script}.py {shlex.join(stage.flags)}"


def done_earlier(stages, run, threads):
    """-> {name: seconds} of the stages an earlier run in RUN finished with the same command, and
    whose needs it finished too (a stage whose input runs again, runs again)."""
    records = {r['stage']: r for r in read_jsonl(run / 'times.jsonl')}
    done = {}
    for stage in stages:                # in plan order: a stage's needs come before it
        record = records.get(stage.name)
        if (record and record['command'] == command_line(stage, threads) and (run / stage.name).is_dir()
                and all(n in done for n in stage.needs)):
            done[stage.name] = record['seconds']
    return done


def run_stages(stages, run, jobs, threads):
    """Run every stage once its needs are done, but those done_earlier. -> [{'name', 'seconds'}] in
    the order they finished."""
    times_file = run / 'times.jsonl'
    (run / 'logs').mkdir(parents=True, exist_ok=True)
    times, done, running = [], set(), {}
    for name, seconds in done_earlier(stages, run, threads).items():
        print(f"   {name}: done in an earlier run ({seconds:.0f} s)")
        times.append({'name': name, 'seconds': seconds})
        done.add(name)
    pending = [s for s in stages if s.name not in done]
    try:
        while pending or running:
            ready = [s for s in pending if all(n in done for n in s.needs)]
            for stage in ready[:jobs - len(running)]:
                pending.remove(stage)
                line = command_line(stage, threads)
                print(f"== {stage.name}: {line}", flush=True)
                log = open(run / 'logs' / f'{stage.name}.log', 'w')
                log.write(line + '\n')
                log.flush()
                process = subprocess.Popen([sys.executable, f'{stage.script}.py', *stage.flags], stdout=log,
                                           stderr=subprocess.STDOUT, env={**os.environ, 'OMP_NUM_THREADS': str(threads)},
                                           cwd=REPO)
                running[stage.name] = (stage, process, log, time.time())
            time.sleep(0.2)
            for name, (stage, process, log, start) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                if process.returncode != 0:
                    last = (run / 'logs' / f'{name}.log').read_text().strip().splitlines()[-1:]
                    raise RunError(f"stage {name} failed ({last[0] if last else 'no output'}); its log: "
                                   f"{run / 'logs' / f'{name}.log'}")
                seconds = time.time() - start
                print(f"   {name} done in {seconds:.0f} s", flush=True)
                with open(times_file, 'a') as f:
                    f.write(json.dumps({'stage': name, 'seconds': seconds, 'command': command_line(stage, threads)}) + '\n')
                times.append({'name': name, 'seconds': seconds})
                done.add(name)
    finally:
        for _, process, log, _ in running.values():     # a failure, Ctrl-C or SIGTERM: stop the others too
            process.terminate()
            process.wait()
            log.close()
    return times


# --------------------------------------------------------------------------------------------------
# Reading out and judging
# --------------------------------------------------------------------------------------------------
def last_value(run, name, key):
    record = last_record(run / name, key)
    if record is None:
        raise RunError(f"{run / name / 'log.jsonl'} has no {key}: did the stage finish?")
    return record[key]


READOUT_KEYS = {'finetune_src': 'val_top1', 'finetune_dst': 'val_top1', 'finetune_more': 'val_top1',
                'probe': 'val_top1', 'knn': 'knn_top1', 'loss': 'loss'}


def judge(a, b, lower_is_better=False):
    """-> (verdict, b - a, SE) by mini_report.verdict's rule for a difference."""
    result, diff, se = verdict('difference', b, a)
    if lower_is_better:
        result = {'agrees': 'disagrees', 'disagrees': 'agrees'}.get(result, result)
    return {'agrees': 'b better', 'disagrees': 'a better'}.get(result, 'no difference shown'), diff, se


def read_out(run, readouts):
    """-> {readout: {'a': [one number per seed], 'b': [...], 'diff', 'se', 'verdict'}}."""
    results = {}
    for readout, arms in readouts.items():
        values = {arm: [sum(last_value(run, n, READOUT_KEYS[readout]) for n in names) / len(names)
                        for names in per_seed] for arm, per_seed in arms.items()}
        result, diff, se = judge(values['a'], values['b'], lower_is_better=readout == 'loss')
        results[readout] = {**values, 'diff': diff, 'se': se, 'verdict': result}
    return results


def write_outputs(run, args, results, times, wall_time):
    summary = {'stage': args.stage, 'a': args.a, 'b': args.b, 'seeds': args.seeds,
               'finetune_seeds': 1 if args.stage == 'finetune' else SIZES[args.size]['finetune_seeds'],
               'readouts': results, 'stages': times, 'wall_time_s': wall_time}
    (run / 'ablation.json').write_text(json.dumps(summary, indent=1) + '\n')
    lines = [f"# Ablation of {args.stage}.py: a = `{args.a}`, b = `{args.b}`", "",
             f"`python ablate.py {shlex.join(sys.argv[1:])}`: {wall_time / 60:.1f} min of wall time, "
             f"{args.seeds} seeds of {args.stage} per arm, {summary['finetune_seeds']} fine-tune seed(s) each; "
             f"mean ± standard error over the seeds.", "",
             "| readout | a | b | b - a | SE | verdict |", "|---|---:|---:|---:|---:|---|",
             *[f"| {READOUTS[name]} | {describe(r['a'], 2)} | {describe(r['b'], 2)} | {r['diff']:+.2f} | {r['se']:.2f} | "
               f"{r['verdict']} |" for name, r in results.items()], "",
             "A verdict needs the difference beyond twice its standard error; \"no difference shown\" is not "
             "evidence that there is none. For the loss, lower is better, and it compares only when both arms "
             "keep the same objective.", "",
             "| stage | seconds |", "|---|---:|", *[f"| {t['name']} | {t['seconds']:.0f} |" for t in times]]
    (run / 'ablation.md').write_text('\n'.join(lines) + '\n')
    return lines


# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--stage', required=True, choices=['pretrain_mae', 'pretrain_distill', 'pretrain_moco',
                                                           'finetune'], help='the stage whose flags differ')
    parser.add_argument('--a', default='', help='flags of arm a, one quoted string (e.g. "--mask-ratio 0.75")')
    parser.add_argument('--b', default='', help='flags of arm b')
    parser.add_argument('--seeds', type=int, default=None,
                        help='seeds of the varied stage per arm (default: 2, --full 3; at least 2 for a verdict)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--smoke', dest='size', action='store_const', const='smoke',
                      help='seconds per stage, to check the pipeline (the tests); the numbers mean nothing')
    size.add_argument('--full', dest='size', action='store_const', const='full',
                      help="the miniature's GPU scale: all images, longer schedules, 1,000 labels, 5 fine-tune seeds")
    parser.set_defaults(size='quick')
    parser.add_argument('--run-dir', default=None, help='output folder (default: runs/ablate_<stage>)')
    parser.add_argument('--data-root', default=None, help='passed to every stage (where Fashion-MNIST is)')
    cores = os.cpu_count() or 1
    parser.add_argument('--jobs', type=int, default=min(2, cores), help='stages side by side (default: 2, or 1 on one core)')
    parser.add_argument('--threads', type=int, default=None, help='threads per stage (default: cores / jobs)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.seeds = args.seeds or SIZES[args.size]['seeds']
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.seeds < 1 or args.jobs < 1 or threads < 1:
        raise RunError("--seeds, --jobs and --threads must be at least 1")
    arms = {arm: check_arm_flags(args.stage, arm, flags) for arm, flags in (('a', args.a), ('b', args.b))}
    run = Path(args.run_dir).resolve() if args.run_dir else REPO / 'runs' / f'ablate_{args.stage}'
    extra = ['--data-root', str(Path(args.data_root).resolve())] if args.data_root else []
    stages, readouts = plan(args.stage, arms, args.seeds, args.size, run, extra)

    counts = Counter(stage.config for stage in stages)
    estimate = sum(QUICK_SECONDS[s.config] for s in stages) / args.jobs / 60
    print(f"ablate {args.stage}: a = '{args.a}', b = '{args.b}', {args.seeds} seeds per arm, in {run}")
    print(f"{len(stages)} stages ({', '.join(f'{n} {c}' for c, n in counts.items())}), {args.jobs} at a time "
          f"with {threads} thread(s) each" + (f"; about {estimate:.0f} min on a 2-core CPU like the one in "
                                             f"RESULTS.md" if args.size == 'quick' else ''), flush=True)
    if args.seeds < 2:
        print("one seed per arm: no standard error, so no verdict", flush=True)
    start = time.time()
    times = run_stages(stages, run, args.jobs, threads)
    results = read_out(run, readouts)
    lines = write_outputs(run, args, results, times, time.time() - start)
    print('\n'.join(lines[:6 + len(results)]))                 # the title, the command and the table
    print(f"wrote {run / 'ablation.md'} and {run / 'ablation.json'}")


if __name__ == '__main__':
    run_main(main)
