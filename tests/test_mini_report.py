"""mini_report.py: the miniature's verdicts follow from its numbers, read from synthetic run folders."""
import json
import math

import pytest
import yaml

import mini_report
from mini_report import mean_and_se, verdict


def write_finetune(run, name, top1, train_top1=99.0, labels=250):
    folder = run / name
    folder.mkdir(parents=True)
    (folder / 'config.yaml').write_text(yaml.safe_dump({'subset': labels}))
    lines = [{'epoch': 0, 'loss': 1.0}, {'epoch': 1, 'loss': 0.5, 'val_top1': top1, 'train_top1': train_top1}]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))


def write_probe(run, name, top1, knn=None):
    folder = run / name
    folder.mkdir(parents=True)
    record = {'epoch': 9, 'val_top1': top1, **({'knn_top1': knn} if knn is not None else {})}
    (folder / 'log.jsonl').write_text(json.dumps(record) + '\n')


def write_json(run, name, file, payload):
    (run / name).mkdir(parents=True)
    (run / name / file).write_text(json.dumps(payload))


@pytest.fixture
def run(tmp_path):
    """A run where claims 1-3 hold clearly and D-MAE equals MAE; the teacher beats its student."""
    for seed, (scratch, mae, dmae, transfer_mae, transfer_sup) in enumerate(
            [(70.0, 80.0, 80.5, 85.0, 90.0), (71.0, 81.0, 80.0, 86.0, 91.0), (72.0, 79.0, 79.5, 84.0, 92.0)]):
        write_finetune(tmp_path, f'ft_scratch_s{seed}', scratch)
        write_finetune(tmp_path, f'ft_mae_s{seed}', mae)
        write_finetune(tmp_path, f'ft_dmae_s{seed}', dmae)
        write_finetune(tmp_path, f'transfer_mae_s{seed}', transfer_mae, labels=100)
        write_finetune(tmp_path, f'transfer_supervised_s{seed}', transfer_sup, labels=100)
    write_probe(tmp_path, 'probe_mae_src', 60.0, knn=50.0)
    write_probe(tmp_path, 'probe_teacher_src', 65.0, knn=55.0)
    write_json(tmp_path, 'recon_mae_tiny', 'reconstruction.json', {'loss': 0.50})
    write_json(tmp_path, 'recon_teacher', 'reconstruction.json', {'loss': 0.45})
    cka = [[0.9 if i == j and i < 4 else 0.3 + 0.01 * i for j in range(13)] for i in range(13)]
    write_json(tmp_path, 'cka_mae_vs_supervised', 'cka.json', cka)
    (tmp_path / 'times.jsonl').write_text('{"stage": "mae_tiny", "seconds": 120}\n{"stage": "ft_mae_s0", "seconds": 30}\n')
    return tmp_path


def test_mean_and_standard_error_by_hand():
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))   # sample std 1, n 3


def test_a_difference_inside_two_standard_errors_never_agrees():
    # means differ by 1.0; each SE is 1/sqrt(3), the difference's SE 0.816: 1.0 < 1.63
    assert verdict([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])[0] == 'disagrees'
    assert verdict([11.0, 12.0, 13.0], [1.0, 2.0, 3.0])[0] == 'agrees'
    assert verdict([1.0, 2.0, 3.0], [11.0, 12.0, 13.0])[0] == 'disagrees'


def test_one_number_on_a_side_is_untested():
    assert verdict([90.0], [10.0, 11.0])[0] == 'untested'


def test_report_verdicts_follow_from_the_logs(run):
    report, _ = mini_report.write_report(run)
    claims = report['claims']
    assert [claims[n]['verdict'] for n in '1234'] == ['agrees', 'agrees', 'agrees', 'disagrees']
    assert claims['1']['higher'] == {'name': 'from MAE', 'values': [80.0, 81.0, 79.0]}
    assert claims['1']['lower']['values'] == [70.0, 71.0, 72.0]
    assert claims['3']['higher']['values'] == [0.9] * 4                 # layers 0..3 of 13
    assert report['wall_time_s'] == 150.0
    assert {'name': 'ft_mae_s1', 'init': 'mae', 'labels': 250, 'seed': 1, 'top1': 81.0, 'train_top1': 99.0,
            'task': 'source'} in report['finetunes']
    assert report['stages'] == [{'name': 'mae_tiny', 'seconds': 120.0}, {'name': 'ft_mae_s0', 'seconds': 30.0}]
    written = json.loads((run / 'report.json').read_text())
    assert written['claims']['2']['verdict'] == 'agrees'
    text = (run / 'REPORT.md').read_text()
    assert '3 of 4 shown' in text and 'within two standard errors' in text


def test_a_teacher_that_is_not_better_leaves_claim_4_untested(run):
    (run / 'recon_teacher' / 'reconstruction.json').write_text(json.dumps({'loss': 0.60}))   # worse
    for seed in range(3):     # even a clear D-MAE win is no verdict then
        (run / f'ft_dmae_s{seed}' / 'log.jsonl').write_text(
            json.dumps({'epoch': 1, 'val_top1': 95.0 + seed * 0.1, 'train_top1': 99.0}) + '\n')
    report, _ = mini_report.write_report(run)
    assert report['claims']['4']['verdict'] == 'untested'
    assert 'teacher is not stronger' in report['claims']['4']['sentence']


def test_a_fine_tune_that_did_not_fit_its_training_images_leaves_its_claim_untested(run):
    (run / 'ft_scratch_s2' / 'log.jsonl').write_text(
        json.dumps({'epoch': 1, 'val_top1': 60.0, 'train_top1': 70.0}) + '\n')
    report, lines = mini_report.write_report(run)
    assert report['claims']['1']['verdict'] == 'untested'
    assert 'not converged' in report['claims']['1']['sentence']
    assert report['claims']['2']['verdict'] == 'agrees'          # its fine-tunes did converge
    assert any('ft_scratch_s2' in line and 'not converged' in line for line in lines)


def test_a_run_with_moco_adds_claim_2b_and_its_row(run):
    assert '2b' not in mini_report.write_report(run)[0]['claims']      # no MoCo in the run: no claim
    (run / 'moco_tiny').mkdir()
    for seed, top1 in enumerate([88.0, 89.0, 90.0]):                    # MAE transferred 84-86
        write_finetune(run, f'transfer_moco_s{seed}', top1, labels=100)
    write_probe(run, 'probe_moco_dst', 70.0, knn=65.0)
    report, lines = mini_report.write_report(run)
    assert list(report['claims']) == ['1', '2', '2b', '3', '4']
    assert report['claims']['2b']['verdict'] == 'agrees'
    assert report['claims']['2b']['higher']['values'] == [88.0, 89.0, 90.0]
    assert any(line.startswith('| MoCo v3') and '89.0 ± 0.6 (n=3)' in line and '/ 70.0 |' in line for line in lines)
    assert '4 of 5 shown' in (run / 'REPORT.md').read_text()
