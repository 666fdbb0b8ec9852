"""The paper in miniature: `analyze.py report` builds the paper's table and judges every claim from
the logs; mini_paper.sh runs every stage end to end (at smoke size)."""
import json
import os
import subprocess
import sys

import analyze
from conftest import ROOT


def write_log(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'log.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))


def fake_run(run, scratch, mae, dmae, probes, cka_diagonal):
    for name, accuracies in (('ft_scratch', scratch), ('ft_mae', mae), ('ft_dmae', dmae)):
        write_log(run / name, [{'epoch': i, 'val_top1': a, 'best_top1': max(accuracies[:i + 1])}
                               for i, a in enumerate(accuracies)])
    for name, top1 in zip(('probe_random', 'probe_mae', 'probe_dmae'), probes):
        write_log(run / name, [{'epoch': 0, 'top1': top1 - 5}, {'epoch': 1, 'top1': top1}])
    for name in ('mae_tiny', 'mae_small_teacher', 'dmae_tiny'):
        write_log(run / name, [{'epoch': 0, 'loss': 0.9}])
    (run / 'cka_mae_vs_scratch').mkdir()
    n = len(cka_diagonal)
    (run / 'cka_mae_vs_scratch' / 'cka.json').write_text(json.dumps(
        [[cka_diagonal[i] if i == j else 0.1 for j in range(n)] for i in range(n)]))
    (run / 'times.jsonl').write_text(''.join(json.dumps({'stage': s, 'seconds': t}) + '\n' for s, t in (
        ('mae_tiny', 120), ('ft_scratch', 60), ('ft_mae', 60), ('probe_mae', 30), ('mae_small_teacher', 300))))


def test_report_builds_the_papers_table_from_the_logs(tmp_path):
    fake_run(tmp_path, scratch=[60.0, 70.0], mae=[75.0, 80.5], dmae=[79.0, 78.0],
             probes=[40.0, 65.0, 66.0], cka_diagonal=[0.9, 0.9, 0.8, 0.5, 0.3, 0.2])
    analyze.main(['report', str(tmp_path)])
    report = (tmp_path / 'REPORT.md').read_text()
    assert '| ViT-Tiny | none (supervised from scratch) | 70.0 | 40.0 | 1.0 |' in report
    assert '| ViT-Tiny | MAE | 80.5 | 65.0 | 3.5 |' in report              # 120 + 60 + 30 s
    assert '| ViT-Tiny | D-MAE (teacher: the MAE ViT-Small below) | 79.0 | 66.0 | 0.0 |' in report
    assert '| ViT-Small | MAE (the D-MAE teacher) | - | - | 5.0 |' in report


def test_report_names_every_claim_and_judges_it_by_the_numbers(tmp_path):
    fake_run(tmp_path, scratch=[70.0], mae=[80.5], dmae=[79.0], probes=[40.0, 65.0, 66.0],
             cka_diagonal=[0.9, 0.9, 0.8, 0.5, 0.3, 0.2])
    analyze.main(['report', str(tmp_path)])
    claims = [line for line in (tmp_path / 'REPORT.md').read_text().splitlines() if line[:3] in ('1. ', '2. ', '3. ', '4. ')]
    assert len(claims) == 4
    assert 'not tested' in claims[0]
    assert 'agrees' in claims[1] and '80.5% vs from scratch 70.0%' in claims[1]
    assert 'agrees' in claims[2] and '0.90' in claims[2] and '0.25' in claims[2]
    assert 'does not agree' in claims[3] and 'D-MAE 79.0% vs MAE 80.5%' in claims[3]


def test_report_says_when_a_claim_does_not_hold(tmp_path):
    fake_run(tmp_path, scratch=[85.0], mae=[80.0], dmae=[82.0], probes=[40.0, 65.0, 66.0],
             cka_diagonal=[0.2, 0.3, 0.9, 0.9])
    analyze.main(['report', str(tmp_path)])
    claims = [line for line in (tmp_path / 'REPORT.md').read_text().splitlines() if line[:3] in ('2. ', '3. ', '4. ')]
    assert [('does not agree' in c, 'agrees' in c) for c in claims] == [(True, False), (True, False), (False, True)]


def test_every_stage_of_the_script_runs_end_to_end(fashion_root, tmp_path):
    run = tmp_path / 'mini'
    result = subprocess.run(['bash', str(ROOT / 'mini_paper.sh'), str(run), '--smoke'],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, 'PYTHON': sys.executable,
                                 'MINI_PAPER_ARGS': f'--data-root {fashion_root}'})
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [json.loads(line)['stage'] for line in (run / 'times.jsonl').read_text().splitlines()]
    assert stages[:9] == ['mae_tiny', 'mae_small_teacher', 'dmae_tiny', 'ft_scratch', 'ft_mae', 'ft_dmae',
                          'probe_random', 'probe_mae', 'probe_dmae'] and len(stages) == 17
    report = (run / 'REPORT.md').read_text()
    assert report.count('| ViT-') == 4 and ' - | - |' not in report.split('ViT-Small')[0]
    assert (run / 'cka_dmae_vs_teacher' / 'cka.png').exists()
    assert (run / 'attention_dmae_tiny' / 'attention_distance.png').exists()
