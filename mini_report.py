"""The paper in miniature, read out: RUN/REPORT.md and RUN/report.json from a `mini_paper.sh` run.

    python mini_report.py runs/mini_paper

Each of the paper's four claims (its abstract and Sec. 4-5; claim 2 twice when the run has
MoCo v3, `mini_paper.sh --moco`: against supervised and against contrastive pre-training) becomes one
comparison of two sets of numbers: `higher`, what the claim says should come out higher, and `lower`, one number per
seed (claim 3: one per layer). The verdict follows from those numbers alone:

    agrees     mean(higher) - mean(lower) > 2 x SE of the difference, SE = sqrt(se_h^2 + se_l^2),
               se = sample std / sqrt(n)
    disagrees  otherwise: within two standard errors (not shown), or reversed
    untested   fewer than 2 numbers on a side, a fine-tune that did not fit its own training images
               (clean train top-1 below 90%: not converged, so not evidence), or, for claim 4, a
               teacher that is not better than its student (held-out reconstruction loss and probe)

The run folders it reads (mini_paper.sh writes them):
    ft_{scratch,mae,dmae}_s{seed}          fine-tunes on a few labels of the pre-training classes
    transfer_{mae,supervised,moco}_s{seed} fine-tunes on a few labels of the classes it never saw
    probe_{model}_{src,dst}                linear probe (+ kNN) of a frozen encoder
    recon_{mae_tiny,teacher}               held-out reconstruction loss (the teacher check)
    cka_mae_vs_supervised                  layer CKA of MAE against the supervised reference
    moco_tiny                              MoCo v3 pre-training (when the run has it)
    times.jsonl                            the wall time of every stage
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


def verdict(higher, lower, untested_because=None):
    """-> (verdict, difference of means, its SE). See the module docstring for the rule."""
    if untested_because or len(higher) < 2 or len(lower) < 2:
        return 'untested', math.nan, math.nan
    (mean_h, se_h), (mean_l, se_l) = mean_and_se(higher), mean_and_se(lower)
    difference, se = mean_h - mean_l, math.sqrt(se_h ** 2 + se_l ** 2)
    return ('agrees' if difference > 2 * se else 'disagrees'), difference, se


def describe(values, digits=1):
    """'78.3 ± 0.4 (n=3)'."""
    if not values:
        return '-'
    mean, se = mean_and_se(values)
    spread = '' if math.isnan(se) else f" ± {se:.{digits}f}"
    return f"{mean:.{digits}f}{spread} (n={len(values)})"


def claim(statement, higher_name, higher, lower_name, lower, unit, untested_because=None, digits=1):
    """One claim: its verdict and the sentence that says it with its numbers."""
    result, difference, se = verdict(higher, lower, untested_because)
    numbers = f"{higher_name} {describe(higher, digits)} vs {lower_name} {describe(lower, digits)} {unit}"
    if result == 'untested':
        reason = untested_because or 'fewer than two numbers on a side'
        sentence = f"*{statement}*: untested ({reason}; {numbers})."
    elif result == 'agrees':
        sentence = (f"*{statement}*: agrees ({numbers}; difference {difference:+.{digits + 1}f}, more than "
                    f"twice its standard error {se:.{digits + 1}f}).")
    else:
        how = 'reversed' if difference < -2 * se else 'within two standard errors'
        sentence = (f"*{statement}*: does not show ({numbers}; difference {difference:+.{digits + 1}f} "
                    f"with standard error {se:.{digits + 1}f}: {how}).")
    return {'verdict': result, 'sentence': sentence,
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
    """Every finished fine-tune of the run: name, init, task, labels, seed, top-1 (last epoch, not the
    best: picking the best epoch on the test images would flatter it), clean train top-1."""
    finetunes = []
    for folder in sorted(run.iterdir()):
        match = re.fullmatch(r'(ft|transfer)_(\w+?)_s(\d+)', folder.name)
        record = last_record(folder, 'train_top1') if match else None
        if record is None:
            continue
        config = yaml.safe_load((folder / 'config.yaml').read_text())
        finetunes.append({'name': folder.name, 'init': match[2], 'task': 'source' if match[1] == 'ft' else
                          'downstream', 'labels': config['subset'], 'seed': int(match[3]),
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
# The four claims
# --------------------------------------------------------------------------------------------------
def top1s(finetunes, task, init):
    return [f['top1'] for f in finetunes if f['task'] == task and f['init'] == init]


def unconverged(finetunes, task, inits):
    """The reason a comparison is no evidence, when one of its fine-tunes did not fit its training set."""
    bad = [f"{f['name']} {f['train_top1']:.1f}%" for f in finetunes
           if f['task'] == task and f['init'] in inits and f['train_top1'] < CONVERGED_TRAIN_TOP1]
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


def the_claims(run, finetunes):
    labels = {f['task']: f['labels'] for f in finetunes}
    source = f"top-1 % on the pre-training classes, {labels.get('source', '?')} labels"
    downstream = f"top-1 % on the unseen classes, {labels.get('downstream', '?')} labels"
    diagonal = cka_diagonal(run, 'cka_mae_vs_supervised')
    third = max(1, len(diagonal) // 3)
    teacher_ok, teacher_sentence = teacher_check(run)
    claims = {
        '1': claim("MAE pre-training, then fine-tuning, beats supervised training from scratch",
                   'from MAE', top1s(finetunes, 'source', 'mae'),
                   'from scratch', top1s(finetunes, 'source', 'scratch'), source,
                   unconverged(finetunes, 'source', ('mae', 'scratch'))),
        '2': claim("MAE transfers worse than supervised pre-training to a data-insufficient task it never saw",
                   'from supervised pre-training', top1s(finetunes, 'downstream', 'supervised'),
                   'from MAE', top1s(finetunes, 'downstream', 'mae'), downstream,
                   unconverged(finetunes, 'downstream', ('mae', 'supervised'))),
        '3': claim("MAE's lower layers resemble a supervised model's more than its higher layers do",
                   f"CKA of the lowest {third} layers", diagonal[:third],
                   f"CKA of the highest {third} layers", diagonal[-third:] if diagonal else [],
                   '(layer i of MAE vs layer i of the supervised reference)', digits=2),
        '4': claim("D-MAE (distilling a bigger MAE's attention during pre-training) beats plain MAE after fine-tuning",
                   'from D-MAE', top1s(finetunes, 'source', 'dmae'),
                   'from MAE', top1s(finetunes, 'source', 'mae'), source,
                   unconverged(finetunes, 'source', ('dmae', 'mae'))
                   or (None if teacher_ok else f"the teacher is not stronger: {teacher_sentence}")),
    }
    if has_moco(run):
        claims['2b'] = claim("MAE transfers worse than contrastive (MoCo v3) pre-training to a data-insufficient "
                             "task it never saw", 'from MoCo v3', top1s(finetunes, 'downstream', 'moco'),
                             'from MAE', top1s(finetunes, 'downstream', 'mae'), downstream,
                             unconverged(finetunes, 'downstream', ('mae', 'moco')))
    return dict(sorted(claims.items())), teacher_sentence


def has_moco(run):
    return (run / 'moco_tiny').is_dir()


# --------------------------------------------------------------------------------------------------
# REPORT.md and report.json
# --------------------------------------------------------------------------------------------------
ROWS = [   # (label of the row, init name of its fine-tunes, its probe runs' model name)
    ('none: random init, supervised from scratch', 'scratch', 'random'),
    ('MAE ViT-Tiny (no labels)', 'mae', 'mae'),
    ('D-MAE ViT-Tiny from the teacher (no labels)', 'dmae', 'dmae'),
    ('MAE ViT-Small, the teacher (no labels)', None, 'teacher'),
    ('supervised ViT-Tiny (labels of the pre-training classes)', 'supervised', 'supervised'),
]
MOCO_ROW = ('MoCo v3 ViT-Tiny (no labels)', 'moco', 'moco')


def table(run, finetunes):
    def cell(values):
        return describe(values) if values else '-'

    def readout(name, which):
        value = probe_result(run, name)[which]
        return '-' if value is None else f"{value:.1f}"

    lines = ["| pre-training (on the 5 pre-training classes) | fine-tune, same classes | fine-tune, unseen "
             "classes | linear probe, same / unseen | kNN, same / unseen |",
             "|---|---:|---:|---:|---:|"]
    for label, init, probe in ROWS + ([MOCO_ROW] if has_moco(run) else []):
        lines.append(f"| {label} | {cell(top1s(finetunes, 'source', init))} | "
                     f"{cell(top1s(finetunes, 'downstream', init))} | "
                     f"{readout(f'probe_{probe}_src', 0)} / {readout(f'probe_{probe}_dst', 0)} | "
                     f"{readout(f'probe_{probe}_src', 1)} / {readout(f'probe_{probe}_dst', 1)} |")
    return lines


def write_report(run):
    finetunes = read_finetunes(run)
    stages = [{'name': r['stage'], 'seconds': float(r['seconds'])} for r in read_jsonl(run / 'times.jsonl')]
    wall_time = sum(s['seconds'] for s in stages)
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
        "all 5,000 test images of those classes, at the last epoch; mean ± standard error over seeds "
        "(n = seeds). Probes and kNN: one run each.", "",
        *table(run, finetunes), "",
        f"## The claims: {shown} of {len(claims)} shown", "",
        *[f"{number}. {c['sentence']}" for number, c in claims.items()], "",
        f"Teacher check: {teacher_sentence}.", "",
        "A claim is shown ('agrees') only where the difference exceeds twice its standard error; "
        "a miniature is minutes of CPU on 28-pixel clothes, not ImageNet: a claim it does not show is "
        "not refuted by it, and one it shows is not proven at the paper's scale.", "",
        "## Fine-tunes", "",
        "| run | init | task | labels | seed | top-1 | clean train top-1 |", "|---|---|---|---:|---:|---:|---:|",
        *[f"| {f['name']} | {f['init']} | {f['task']} | {f['labels']} | {f['seed']} | {f['top1']:.2f} | "
          f"{f['train_top1']:.1f}{'' if f['train_top1'] >= CONVERGED_TRAIN_TOP1 else ' (not converged)'} |"
          for f in finetunes], "",
        "## Wall time of each stage", "",
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
