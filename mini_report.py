"""The paper in miniature, read out: RUN/REPORT.md and RUN/report.json from a `mini_paper.sh` run.

    python mini_report.py runs/mini_paper

Each claim of the paper's abstract becomes one comparison of two sets of numbers, `higher` (what the
claim says should come out higher) and `lower`. A side that was pre-trained holds one number per
pre-training seed (the mean of that seed's fine-tunes), a side trained from scratch one per fine-tune
seed, claim 3 one per layer. With diff = mean(higher) - mean(lower) and SE its Welch standard error,
sqrt(s_h^2 / n_h + s_l^2 / n_l), the verdict follows from those numbers alone (`verdict`):

    kind            "agrees" exactly when           "disagrees" exactly when
    difference      diff > 2 SE                      diff < -2 SE
    equivalence     |diff| + 2 SE <= margin          |diff| - 2 SE > margin
    noninferiority  diff - 2 SE > -margin            diff + 2 SE < -margin

Anything else is "not shown". "untested": fewer than 2 numbers on a side, a fine-tune that did not
fit its own labelled set (clean train top-1 below 90%), or, for the D-MAE claims, a teacher that is
not better than its student (held-out reconstruction loss and probe). The margins are in CLAIMS and
README says why. ablate.py judges its comparisons with the same `verdict`.

The run folders it reads (mini_paper.sh writes them): ft_<init>[_p<P>]_s<S> (fine-tunes on a few labels
of the pre-training classes: P the pre-training seed, S the fine-tune seed), transfer_<init>[_p<P>]_s<S>
(on the classes no pre-training saw), probe_<model>_{src,dst} (linear probe + kNN of the first
pre-training seed), recon_{mae_tiny,teacher} (held-out reconstruction loss), cka_mae_vs_supervised,
attention_<model>, and times.jsonl (the wall time of every stage).
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import yaml

CONVERGED_TRAIN_TOP1 = 90.0      # a fine-tune below this on its own clean training images is not evidence


# --------------------------------------------------------------------------------------------------
# The statistics and the verdict
# --------------------------------------------------------------------------------------------------
def mean_and_se(values):
    """(mean, standard error of the mean); the SE is nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def verdict(kind, higher, lower, margin=None, untested_because=None):
    """-> (verdict, diff, SE) by the rule of the module docstring; kind is 'difference',
    'equivalence' or 'noninferiority' (the last two need a margin)."""
    if untested_because or len(higher) < 2 or len(lower) < 2:
        return 'untested', math.nan, math.nan
    (mean_h, se_h), (mean_l, se_l) = mean_and_se(higher), mean_and_se(lower)
    diff, se = mean_h - mean_l, math.sqrt(se_h ** 2 + se_l ** 2)
    if kind == 'difference':
        agrees, disagrees = diff > 2 * se, diff < -2 * se
    elif kind == 'equivalence':
        agrees, disagrees = abs(diff) + 2 * se <= margin, abs(diff) - 2 * se > margin
    else:   # noninferiority
        agrees, disagrees = diff - 2 * se > -margin, diff + 2 * se < -margin
    return ('agrees' if agrees else 'disagrees' if disagrees else 'not shown'), diff, se


def describe(values, digits=1):
    """'78.3 ± 0.4 (n=3)'."""
    if not values:
        return '-'
    mean, se = mean_and_se(values)
    spread = '' if math.isnan(se) else f" ± {se:.{digits}f}"
    return f"{mean:.{digits}f}{spread} (n={len(values)})"


RULES = {'difference': "difference more than twice its standard error",
         'equivalence': "|difference| + 2 SE within the margin {margin}",
         'noninferiority': "difference - 2 SE above -{margin}"}


def judge(statement, kind, higher_name, higher, lower_name, lower, unit, margin=None, untested_because=None,
          note=None, digits=1, seeds=(None, None)):
    """One claim: its verdict, the numbers and the sentence that says it."""
    result, diff, se = verdict(kind, higher, lower, margin, untested_because)
    numbers = f"{higher_name} {describe(higher, digits)} vs {lower_name} {describe(lower, digits)} {unit}"
    if result == 'untested':
        sentence = f"*{statement}*: untested ({untested_because or 'fewer than two numbers on a side'}; {numbers})."
    else:
        rule = RULES[kind].format(margin=margin)
        how = {'agrees': f"shown: {rule}", 'disagrees': "the numbers say the opposite",
               'not shown': f"not shown: the rule asks for a {rule}"}[result]
        sentence = (f"*{statement}*: {result} ({numbers}; difference {diff:+.{digits + 1}f}, standard "
                    f"error {se:.{digits + 1}f}; {how}).")
    if note and result != 'agrees':
        sentence += f" {note}"
    return {'verdict': result, 'sentence': sentence, 'kind': kind, 'margin': margin,
            'pretrain_seeds': seeds[0], 'finetune_seeds': seeds[1], 'difference': diff, 'se': se,
            'higher': {'name': higher_name, 'values': higher}, 'lower': {'name': lower_name, 'values': lower}}


# --------------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------------
def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_record(run_dir, key):
    """The last log.jsonl line of a run that has `key`, or None."""
    records = [r for r in read_jsonl(run_dir / 'log.jsonl') if key in r]
    return records[-1] if records else None


def read_finetunes(run):
    """Every finished fine-tune of the run: name, init, task, labels, pre-training seed (None for a
    start from scratch), fine-tune seed, top-1 (last epoch, not the best: picking the best epoch on
    the test images would flatter it), clean train top-1."""
    finetunes = []
    for folder in sorted(run.iterdir()):
        match = re.fullmatch(r'(ft|transfer)_(\w+?)(?:_p(\d+))?_s(\d+)', folder.name)
        record = last_record(folder, 'train_top1') if match else None
        if record is None:
            continue
        config = yaml.safe_load((folder / 'config.yaml').read_text())
        finetunes.append({'name': folder.name, 'init': match[2], 'task': 'source' if match[1] == 'ft' else
                          'downstream', 'labels': config['subset'],
                          'pretrain_seed': None if match[3] is None else int(match[3]), 'seed': int(match[4]),
                          'top1': record['val_top1'], 'train_top1': record['train_top1']})
    return finetunes


def probe_result(run, name):
    """(linear probe top-1 of the last epoch, kNN top-1) of probe run `name`, or (None, None)."""
    record = last_record(run / name, 'val_top1')
    return (record['val_top1'], record.get('knn_top1')) if record else (None, None)


def reconstruction_loss(run, name):
    path = run / name / 'reconstruction.json'
    return json.loads(path.read_text())['loss'] if path.exists() else None


def cka_diagonal(run, name):
    path = run / name / 'cka.json'
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    return [rows[i][i] for i in range(min(len(rows), len(rows[0])))]


# --------------------------------------------------------------------------------------------------
# The claims
# --------------------------------------------------------------------------------------------------
def of(finetunes, task, init):
    return [f for f in finetunes if f['task'] == task and f['init'] == init]


def values(finetunes, task, init):
    """One number per pre-training seed (the mean of its fine-tunes), or per fine-tune seed for a start
    from scratch."""
    runs = of(finetunes, task, init)
    if all(f['pretrain_seed'] is None for f in runs):
        return [f['top1'] for f in sorted(runs, key=lambda f: f['seed'])]
    by_seed = {}
    for f in runs:
        by_seed.setdefault(f['pretrain_seed'], []).append(f['top1'])
    return [sum(top1s) / len(top1s) for _, top1s in sorted(by_seed.items())]


def seed_counts(finetunes, task, inits):
    """(pre-training seeds, fine-tune seeds per pre-training seed) of the pre-trained sides."""
    runs = [f for init in inits for f in of(finetunes, task, init) if f['pretrain_seed'] is not None]
    if not runs:
        return None, None
    pretrain = {f['pretrain_seed'] for f in runs}
    return len(pretrain), len(runs) // max(1, len(pretrain) * len({f['init'] for f in runs}))


def unconverged(finetunes, task, inits):
    """The reason a comparison is no evidence, when one of its fine-tunes did not fit its training set."""
    bad = [f"{f['name']} {f['train_top1']:.1f}%" for init in inits for f in of(finetunes, task, init)
           if f['train_top1'] < CONVERGED_TRAIN_TOP1]
    return (f"not converged: clean train top-1 below {CONVERGED_TRAIN_TOP1:.0f}% for {', '.join(bad)}"
            if bad else None)


def teacher_check(run):
    """-> (passed, sentence): is the teacher better than its student, MAE-Tiny, on held-out images?"""
    loss_student, loss_teacher = reconstruction_loss(run, 'recon_mae_tiny'), reconstruction_loss(run, 'recon_teacher')
    probe_student, probe_teacher = probe_result(run, 'probe_mae_src')[0], probe_result(run, 'probe_teacher_src')[0]
    if None in (loss_student, loss_teacher, probe_student, probe_teacher):
        return False, "the teacher check did not run"
    passed = loss_teacher < loss_student and probe_teacher > probe_student
    return passed, (f"the teacher {'is' if passed else 'is NOT'} better than the MAE-Tiny student: held-out "
                    f"reconstruction loss {loss_teacher:.4f} vs {loss_student:.4f}, linear probe "
                    f"{probe_teacher:.1f}% vs {probe_student:.1f}%")


def frozen_readouts(run, higher, lower, split):
    """The sentence for a fine-tune claim that does not agree: do the frozen features still differ?"""
    (probe_h, knn_h), (probe_l, knn_l) = probe_result(run, f'probe_{higher}_{split}'), probe_result(run, f'probe_{lower}_{split}')
    if None in (probe_h, probe_l):
        return None
    knn = f", kNN {knn_h - knn_l:+.1f}" if None not in (knn_h, knn_l) else ''
    return (f"The frozen features of the first pre-training seed still differ (linear probe "
            f"{probe_h - probe_l:+.1f}{knn}, one run each): the fine-tune erases the difference.")


# (id, kind, statement, higher init, lower init, task, margin, what the claim needs beyond converged fine-tunes)
CLAIMS = [
    ('0', 'noninferiority', "MAE pre-training makes a vanilla ViT-Tiny comparable to a hand-designed lightweight "
     "network (MobileNetV3-Large, of ViT-Tiny's size, trained from scratch with its own tuned recipe)", 'mae',
     'mobilenet', 'source', 2.0, None),
    ('1', 'difference', "MAE pre-training, then fine-tuning, beats supervised training from scratch",
     'mae', 'scratch', 'source', None, None),
    ('2', 'difference', "MAE transfers worse than supervised pre-training to a data-insufficient task it never saw",
     'supervised', 'mae', 'downstream', None, None),
    ('2b', 'difference', "MAE transfers worse than contrastive (MoCo v3) pre-training to a data-insufficient "
     "task it never saw", 'moco', 'mae', 'downstream', None, None),
    ('3b', 'difference', "With enough labels downstream, MAE's lower layers matter more than its higher ones "
     "(keep blocks 0-5 of MAE, re-initialise the rest; vs keep blocks 6-11)", 'mae_low', 'mae_high', 'source',
     None, None),
    ('4', 'difference', "D-MAE (distilling a bigger MAE's attention during pre-training) beats plain MAE after "
     "fine-tuning on enough labels (more than the other fine-tunes: the data-sufficient side, as the paper's "
     "ImageNet)", 'dmae_more_labels', 'mae_more_labels', 'source', None, 'teacher'),
    ('4b', 'difference', "D-MAE beats plain MAE on the data-insufficient task it never saw", 'dmae', 'mae',
     'downstream', None, 'teacher'),
    ('5', 'equivalence', "MAE gains nothing from more pre-training data (30,000 images vs 6,000, the same "
     "optimizer steps)", 'mae', 'mae_small_data', 'source', 1.5, None),
]
INIT_NAMES = {'mae': 'from MAE', 'scratch': 'ViT-Tiny from scratch', 'mobilenet': 'MobileNetV3-Large from scratch',
              'supervised': 'from supervised pre-training', 'moco': 'from MoCo v3', 'dmae': 'from D-MAE',
              'mae_more_labels': 'from MAE', 'dmae_more_labels': 'from D-MAE',
              'mae_low': 'MAE blocks 0-5 kept', 'mae_high': 'MAE blocks 6-11 kept',
              'mae_small_data': 'from MAE on 6,000 images'}
PROBES = {'mae': 'mae', 'dmae': 'dmae', 'moco': 'moco', 'supervised': 'supervised',   # init -> probe name
          'mae_more_labels': 'mae', 'dmae_more_labels': 'dmae'}
ATTENTION_NOT_JUDGED = ("The attention plots (distance and entropy per head) are drawn, not judged: the "
                        "direction of the paper's attention finding (which model attends more locally, in "
                        "which layers) is not stated in the material this project was built from, and a "
                        "verdict needs a stated direction.")


def units(finetunes, task, inits):
    """What a fine-tune claim's numbers are: top-1 on which classes, after how many labels."""
    labels = sorted({f['labels'] for init in inits for f in of(finetunes, task, init)})
    classes = 'the pre-training classes' if task == 'source' else 'the unseen classes'
    return f"top-1 % on {classes}, {' and '.join(map(str, labels)) or '?'} labels"


def the_claims(run, finetunes):
    teacher_ok, teacher_sentence = teacher_check(run)
    claims = {}
    for number, kind, statement, higher, lower, task, margin, needs in CLAIMS:
        split = 'src' if task == 'source' else 'dst'
        why = unconverged(finetunes, task, (higher, lower))
        if needs == 'teacher' and not teacher_ok:
            why = why or f"the teacher is not stronger: {teacher_sentence}"
        note = (frozen_readouts(run, PROBES[higher], PROBES[lower], split)
                if higher in PROBES and lower in PROBES else None)
        claims[number] = judge(statement, kind, INIT_NAMES[higher], values(finetunes, task, higher),
                               INIT_NAMES[lower], values(finetunes, task, lower),
                               units(finetunes, task, (higher, lower)), margin, why, note,
                               seeds=seed_counts(finetunes, task, (higher, lower)))
    diagonal = cka_diagonal(run, 'cka_mae_vs_supervised')
    third = max(1, len(diagonal) // 3)
    claims['3'] = judge("MAE's lower layers resemble a supervised model's more than its higher layers do",
                        'difference', f"CKA of the lowest {third} layers", diagonal[:third],
                        f"CKA of the highest {third} layers", diagonal[-third:] if diagonal else [],
                        '(layer i of MAE vs layer i of the supervised reference, first pre-training seeds)',
                        digits=2, seeds=(1, None))
    claims['6'] = {'verdict': 'untested', 'kind': None, 'margin': None, 'pretrain_seeds': None,
                   'finetune_seeds': None, 'sentence': f"*The attention maps show the effect of the "
                   f"pre-training*: untested. {ATTENTION_NOT_JUDGED}",
                   'higher': {'name': None, 'values': []}, 'lower': {'name': None, 'values': []}}
    return dict(sorted(claims.items())), teacher_sentence


# --------------------------------------------------------------------------------------------------
# REPORT.md and report.json
# --------------------------------------------------------------------------------------------------
ROWS = [   # (label of the row, init name of its fine-tunes, its probe runs' model name)
    ('none: ViT-Tiny from scratch (random init)', 'scratch', 'random'),
    ('none: MobileNetV3-Large from scratch', 'mobilenet', None),
    ('MAE ViT-Tiny (no labels)', 'mae', 'mae'),
    ('MAE ViT-Tiny on 6,000 of the images, same steps', 'mae_small_data', None),
    ('MAE ViT-Tiny, blocks 0-5 kept, 6-11 re-initialised', 'mae_low', None),
    ('MAE ViT-Tiny, blocks 6-11 kept, 0-5 re-initialised', 'mae_high', None),
    ('MAE ViT-Tiny, fine-tuned on more labels (claim 4)', 'mae_more_labels', None),
    ('D-MAE ViT-Tiny from the teacher (no labels)', 'dmae', 'dmae'),
    ('D-MAE ViT-Tiny, fine-tuned on more labels (claim 4)', 'dmae_more_labels', None),
    ('MAE ViT-Small, the teacher (no labels)', None, 'teacher'),
    ('supervised ViT-Tiny (labels of the pre-training classes)', 'supervised', 'supervised'),
    ('MoCo v3 ViT-Tiny (no labels)', 'moco', 'moco'),
]


def table(run, finetunes):
    def cell(init, task):
        return describe(values(finetunes, task, init)) if init and of(finetunes, task, init) else '-'

    def readout(probe, split, which):
        value = probe_result(run, f'probe_{probe}_{split}')[which] if probe else None
        return '-' if value is None else f"{value:.1f}"

    lines = ["| pre-training (on the 5 pre-training classes) | fine-tune, same classes | fine-tune, unseen "
             "classes | linear probe, same / unseen | kNN, same / unseen |",
             "|---|---:|---:|---:|---:|"]
    for label, init, probe in ROWS:
        lines.append(f"| {label} | {cell(init, 'source')} | {cell(init, 'downstream')} | "
                     f"{readout(probe, 'src', 0)} / {readout(probe, 'dst', 0)} | "
                     f"{readout(probe, 'src', 1)} / {readout(probe, 'dst', 1)} |")
    return lines


def write_report(run):
    finetunes = read_finetunes(run)
    stages = [{'name': r['stage'], 'seconds': float(r['seconds'])} for r in read_jsonl(run / 'times.jsonl')]
    wall = read_jsonl(run / 'wall.jsonl')
    wall_time = wall[-1]['seconds'] if wall else sum(s['seconds'] for s in stages)
    claims, teacher_sentence = the_claims(run, finetunes)
    report = {'wall_time_s': wall_time, 'claims': claims, 'finetunes': finetunes, 'stages': stages}
    (run / 'report.json').write_text(json.dumps(report, indent=1) + '\n')

    shown = sum(c['verdict'] == 'agrees' for c in claims.values())
    figures = sorted(run.glob('*/*.png'))
    lines = [
        "# The paper in miniature", "",
        f"`bash mini_paper.sh` in `{run}`: {wall_time / 60:.1f} min of wall time. Fashion-MNIST at 28 px, "
        "patches of 7; pre-training sees only 5 of the 10 classes (T-shirt, trouser, coat, sandal, bag), "
        "the downstream task is the other 5 (pullover, dress, shirt, sneaker, ankle boot). Top-1 in %, on "
        "all 5,000 test images of those classes, at the last epoch; mean ± standard error over the "
        "pre-training seeds (each the mean of its fine-tune seeds), or over the fine-tune seeds of a start "
        "from scratch (n = seeds). Probes and kNN: the first pre-training seed, one run each.", "",
        *table(run, finetunes), "",
        f"## The claims: {shown} of {len(claims)} shown", "",
        *[f"{number}. {c['sentence']}" for number, c in claims.items()], "",
        f"Teacher check: {teacher_sentence}.", "",
        "A claim is shown ('agrees') only by the rule of its kind on these numbers; a miniature is minutes "
        "of CPU on 28-pixel clothes, not ImageNet: a claim it does not show is not refuted by it, and one "
        "it shows is not proven at the paper's scale.", "",
        "## Fine-tunes", "",
        "| run | init | task | labels | pre-training seed | seed | top-1 | clean train top-1 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *[f"| {f['name']} | {f['init']} | {f['task']} | {f['labels']} | "
          f"{'-' if f['pretrain_seed'] is None else f['pretrain_seed']} | {f['seed']} | {f['top1']:.2f} | "
          f"{f['train_top1']:.1f}{'' if f['train_top1'] >= CONVERGED_TRAIN_TOP1 else ' (not converged)'} |"
          for f in finetunes], "",
        "## Wall time of each stage", "",
        "Stages run side by side (mini_paper.sh's JOBS): their seconds add up to more than the wall time.", "",
        "| stage | seconds |", "|---|---:|", *[f"| {s['name']} | {s['seconds']:.0f} |" for s in stages], "",
        "## Figures", "",
        *[f"**{path.parent.name}/{path.name}**\n\n![{path.parent.name}]({path.relative_to(run)})\n"
          for path in figures],
    ]
    (run / 'REPORT.md').write_text('\n'.join(lines) + '\n')
    return report, lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', help='the folder mini_paper.sh wrote')
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not run.is_dir():
        print(f"error: no run folder {run}: run `bash mini_paper.sh {run}` first", file=sys.stderr)
        sys.exit(2)
    report, lines = write_report(run)
    print(f"wrote {run / 'REPORT.md'} and {run / 'report.json'}")
    for number, c in report['claims'].items():
        print(f"claim {number}: {c['verdict']}")


if __name__ == '__main__':
    main()
