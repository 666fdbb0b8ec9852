"""The paper in miniature: mini_paper.sh runs every stage end to end (at smoke size) and mini_report.py
reads the run into REPORT.md and report.json (its verdict rule is tested in test_mini_report.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_smoke(run, stage_args, timeout):
    """`bash mini_paper.sh RUN --smoke`, every stage given `stage_args` (MINI_PAPER_ARGS), two stages at a
    time (`nproc` would count one core under `pytest -n`, which sets OMP_NUM_THREADS=1)."""
    return subprocess.run(['bash', str(ROOT / 'mini_paper.sh'), str(run), '--smoke'], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, 'PYTHON': sys.executable,
                                                           'MINI_PAPER_ARGS': stage_args, 'MINI_PAPER_JOBS': '2'})


@pytest.mark.ops
def test_every_stage_of_the_script_runs_end_to_end(fashion_root, tmp_path):
    run = tmp_path / 'mini'
    result = run_smoke(run, f'--data-root {fashion_root}', timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [json.loads(line)['stage'] for line in (run / 'times.jsonl').read_text().splitlines()]
    assert {'mae_teacher', 'mae_tiny_p0', 'mae_small_data_p0', 'dmae_tiny_p0', 'supervised_p0',
            'moco_tiny_p0'} <= set(stages)
    assert stages.index('dmae_tiny_p0') > stages.index('mae_teacher')     # the student waits for its teacher
    finetunes = [s for s in stages if s.startswith(('ft_', 'transfer_'))]
    assert len(finetunes) == 13               # 1 seed x (6 pre-trained + 2 from scratch, 4 + 1 transfer)
    report = json.loads((run / 'report.json').read_text())
    assert set(report['claims']) == {'0', '1', '2', '2b', '3', '3b', '4', '4b', '5', '6'}
    assert len(report['claims']['1']['higher']['values']) == 1       # one per pre-training seed
    assert report['claims']['1']['verdict'] == 'untested'           # one seed: no standard error
    assert report['claims']['0']['kind'] == 'noninferiority'
    assert len(report['claims']['3']['higher']['values']) == 4       # the lowest third of 13 layers
    assert {f['name'] for f in report['finetunes']} == set(finetunes)
    assert [s['name'] for s in report['stages']] == stages
    assert 'the teacher' in (run / 'REPORT.md').read_text()
    assert (run / 'cka_mae_vs_supervised' / 'cka.png').exists()
    assert (run / 'attention_dmae_tiny' / 'attention_distance.png').exists()
    assert (run / 'recon_teacher' / 'reconstruction.json').exists()


def test_a_failing_stage_stops_the_script_with_its_name(fashion_root, tmp_path):
    run = tmp_path / 'mini'
    result = run_smoke(run, f'--data-root {tmp_path / "no_data_here"} --data /nowhere', timeout=600)
    assert result.returncode == 1
    assert 'mae_teacher FAILED' in result.stderr and 'stopped:' in result.stderr
    assert not (run / 'report.json').exists()
