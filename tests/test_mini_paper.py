"""The paper in miniature: mini_paper.sh runs every stage end to end (at smoke size) and mini_report.py
reads the run into REPORT.md and report.json (its verdict rule is tested in test_mini_report.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.ops
def test_every_stage_of_the_script_runs_end_to_end(fashion_root, tmp_path):
    run = tmp_path / 'mini'
    result = subprocess.run(['bash', str(ROOT / 'mini_paper.sh'), str(run), '--smoke', '--moco'],
                            capture_output=True, text=True, timeout=1200,
                            env={**os.environ, 'PYTHON': sys.executable,
                                 'MINI_PAPER_ARGS': f'--data-root {fashion_root}'})
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [json.loads(line)['stage'] for line in (run / 'times.jsonl').read_text().splitlines()]
    assert stages[:5] == ['mae_tiny', 'mae_teacher', 'dmae_tiny', 'supervised', 'moco_tiny']
    finetunes = [s for s in stages if s.startswith(('ft_', 'transfer_'))]
    assert len(finetunes) == 7                                      # 1 seed x 7 (init, task) at smoke size
    report = json.loads((run / 'report.json').read_text())
    assert set(report['claims']) == {'1', '2', '2b', '3', '4'}      # 2b: MoCo v3 against MAE
    assert len(report['claims']['1']['higher']['values']) == 1       # one per seed
    assert report['claims']['1']['verdict'] == 'untested'           # one seed: no standard error
    assert len(report['claims']['3']['higher']['values']) == 4       # the lowest third of 13 layers
    assert {f['name'] for f in report['finetunes']} == set(finetunes)
    assert [s['name'] for s in report['stages']] == stages
    assert 'the teacher' in (run / 'REPORT.md').read_text()
    assert (run / 'cka_mae_vs_supervised' / 'cka.png').exists()
    assert (run / 'attention_dmae_tiny' / 'attention_distance.png').exists()
    assert (run / 'recon_teacher' / 'reconstruction.json').exists()
