"""mini_report.py: the miniature's verdicts follow from its numbers by the rule of each claim's kind,
read from synthetic run folders."""
import json
import math

import pytest
import yaml

import mini_report
from mini_report import mean_and_se, verdict


def write_finetune(run, name, top1, train_top1=99.0, labels=100):
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


# (init, task) -> one top-1 per (pre-training seed, fine-tune seed), 2 x 2; a start from scratch: per seed
PRETRAINED = {
    ('mae', 'ft'): [[80.0, 80.4], [80.4, 80.8]],
    ('mae_more_labels', 'ft'): [[88.0, 88.4], [88.4, 88.8]],     # claim 4, on 10x the labels
    ('dmae_more_labels', 'ft'): [[88.5, 88.1], [88.9, 89.1]],    # the same as MAE
    ('mae_small_data', 'ft'): [[80.1, 80.5], [80.3, 80.9]],  # the same as MAE: equivalent within 1.5
    ('mae_low', 'ft'): [[79.0, 79.2], [79.4, 79.6]],
    ('mae_high', 'ft'): [[74.0, 74.2], [74.6, 74.8]],
    ('mae', 'transfer'): [[85.0, 85.2], [86.0, 86.2]],
    ('supervised', 'transfer'): [[90.0, 90.2], [91.0, 91.2]],
    ('moco', 'transfer'): [[85.5, 85.1], [85.7, 86.3]],
    ('dmae', 'transfer'): [[85.1, 85.5], [85.9, 86.1]],
}
SCRATCH = {('scratch', 'ft'): [70.0, 71.0, 72.0], ('mobilenet', 'ft'): [80.0, 80.6, 81.2]}


@pytest.fixture
def run(tmp_path):
    """A run where claims 0, 1, 2, 3, 3b and 5 hold clearly and D-MAE and MoCo equal MAE; the teacher
    beats its student."""
    for (init, task), by_pretrain_seed in PRETRAINED.items():
        for p, top1s in enumerate(by_pretrain_seed):
            for s, top1 in enumerate(top1s):
                write_finetune(tmp_path, f'{task}_{init}_p{p}_s{s}', top1,
                               labels=1000 if init.endswith('more_labels') else 100)
    for (init, task), top1s in SCRATCH.items():
        for s, top1 in enumerate(top1s):
            write_finetune(tmp_path, f'{task}_{init}_s{s}', top1)
    write_probe(tmp_path, 'probe_mae_src', 60.0, knn=50.0)
    write_probe(tmp_path, 'probe_dmae_src', 63.0, knn=54.0)
    write_probe(tmp_path, 'probe_teacher_src', 65.0, knn=55.0)
    write_json(tmp_path, 'recon_mae_tiny', 'reconstruction.json', {'loss': 0.50})
    write_json(tmp_path, 'recon_teacher', 'reconstruction.json', {'loss': 0.45})
    cka = [[0.9 if i == j and i < 4 else 0.3 + 0.01 * i for j in range(13)] for i in range(13)]
    write_json(tmp_path, 'cka_mae_vs_supervised', 'cka.json', cka)
    (tmp_path / 'times.jsonl').write_text('{"stage": "mae_tiny_p0", "seconds": 120}\n'
                                          '{"stage": "ft_mae_p0_s0", "seconds": 30}\n')
    return tmp_path


# -- the rule ---------------------------------------------------------------------------------------
def test_mean_and_standard_error_by_hand():
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))   # sample std 1, n 3


def test_a_difference_inside_two_standard_errors_is_never_agrees_nor_disagrees():
    # each SE is 1/sqrt(3), the difference's Welch SE 0.816: |1.0| < 1.63
    assert verdict('difference', [2.0, 3.0, 4.0], [1.0, 2.0, 3.0])[0] == 'not shown'
    assert verdict('difference', [1.0, 2.0, 3.0], [2.0, 3.0, 4.0])[0] == 'not shown'
    assert verdict('difference', [11.0, 12.0, 13.0], [1.0, 2.0, 3.0])[0] == 'agrees'
    assert verdict('difference', [1.0, 2.0, 3.0], [11.0, 12.0, 13.0])[0] == 'disagrees'


def test_the_difference_and_its_welch_standard_error():
    _, diff, se = verdict('difference', [10.0, 12.0], [1.0, 2.0, 3.0])
    assert diff == pytest.approx(9.0)
    assert se == pytest.approx(math.sqrt(2.0 / 2 + 1.0 / 3))          # s_h^2 / n_h + s_l^2 / n_l


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    close = [10.0, 10.2, 10.4], [10.1, 10.3, 10.5]                   # diff -0.1, SE 0.163
    assert verdict('equivalence', *close, margin=1.0)[0] == 'agrees'   # 0.1 + 0.33 <= 1
    assert verdict('equivalence', *close, margin=0.3)[0] == 'not shown'  # 0.43 > 0.3, but 0.1 - 0.33 <= 0.3
    far = [10.0, 10.2, 10.4], [12.0, 12.2, 12.4]                      # |diff| 2, SE 0.163
    assert verdict('equivalence', *far, margin=1.0)[0] == 'disagrees'  # 2 - 0.33 > 1
    noisy = [8.0, 10.0, 12.0], [9.0, 11.0, 13.0]                     # diff -1, SE 1.63: inside and out
    assert verdict('equivalence', *noisy, margin=2.0)[0] == 'not shown'


def test_noninferiority_by_its_one_sided_bounds():
    assert verdict('noninferiority', [79.0, 79.2, 79.4], [80.0, 80.2, 80.4], margin=2.0)[0] == 'agrees'
    assert verdict('noninferiority', [75.0, 75.2, 75.4], [80.0, 80.2, 80.4], margin=2.0)[0] == 'disagrees'
    assert verdict('noninferiority', [75.0, 78.0, 81.0], [80.0, 80.2, 80.4], margin=2.0)[0] == 'not shown'


def test_one_number_on_a_side_is_untested():
    for kind in ('difference', 'equivalence', 'noninferiority'):
        assert verdict(kind, [90.0], [10.0, 11.0], margin=1.0)[0] == 'untested'


# -- the report of a run ----------------------------------------------------------------------------
def test_report_verdicts_follow_from_the_logs(run):
    report, _ = mini_report.write_report(run)
    claims = report['claims']
    assert {n: c['verdict'] for n, c in claims.items()} == {
        '0': 'agrees', '1': 'agrees', '2': 'agrees', '2b': 'not shown', '3': 'agrees', '3b': 'agrees',
        '4': 'not shown', '4b': 'not shown', '5': 'agrees', '6': 'untested'}
    assert claims['0']['kind'] == 'noninferiority' and claims['0']['margin'] == 2.0
    assert claims['0']['lower']['values'] == [80.0, 80.6, 81.2]      # MobileNetV3
    assert claims['5']['kind'] == 'equivalence' and claims['1']['margin'] is None
    assert report['wall_time_s'] == 150.0
    assert report['stages'] == [{'name': 'mae_tiny_p0', 'seconds': 120.0}, {'name': 'ft_mae_p0_s0', 'seconds': 30.0}]
    written = json.loads((run / 'report.json').read_text())
    assert written['claims']['2']['verdict'] == 'agrees'
    text = (run / 'REPORT.md').read_text()
    assert '6 of 10 shown' in text and 'not judged' in text


def test_a_pretrained_side_holds_one_number_per_pretraining_seed(run):
    claim = mini_report.write_report(run)[0]['claims']['1']
    assert claim['higher'] == {'name': 'from MAE', 'values': [pytest.approx(80.2), pytest.approx(80.6)]}
    assert claim['lower']['values'] == [70.0, 71.0, 72.0]             # from scratch: one per fine-tune seed
    assert (claim['pretrain_seeds'], claim['finetune_seeds']) == (2, 2)


def test_a_claim_that_is_not_shown_says_what_the_frozen_features_show(run):
    sentence = mini_report.write_report(run)[0]['claims']['4']['sentence']
    assert 'linear probe +3.0, kNN +4.0' in sentence and 'erases' in sentence


def test_each_claim_names_the_labels_of_its_own_fine_tunes(run):
    claims = mini_report.write_report(run)[0]['claims']
    assert claims['4']['higher']['values'] == [pytest.approx(88.3), pytest.approx(89.0)]   # D-MAE on 1,000
    assert 'on the pre-training classes, 1000 labels' in claims['4']['sentence']
    assert 'on the pre-training classes, 100 labels' in claims['1']['sentence']


def test_one_pretraining_seed_leaves_its_claim_untested(run):
    for s in range(2):
        for name in (f'ft_mae_p1_s{s}',):
            (run / name / 'log.jsonl').unlink()
    report, _ = mini_report.write_report(run)
    assert report['claims']['1']['verdict'] == 'untested'
    assert report['claims']['1']['higher']['values'] == [pytest.approx(80.2)]


def test_a_teacher_that_is_not_better_leaves_the_d_mae_claims_untested(run):
    (run / 'recon_teacher' / 'reconstruction.json').write_text(json.dumps({'loss': 0.60}))   # worse
    report, _ = mini_report.write_report(run)
    for number in ('4', '4b'):
        assert report['claims'][number]['verdict'] == 'untested'
        assert 'teacher is not stronger' in report['claims'][number]['sentence']


def test_a_fine_tune_that_did_not_fit_its_training_images_leaves_its_claim_untested(run):
    (run / 'ft_scratch_s2' / 'log.jsonl').write_text(
        json.dumps({'epoch': 1, 'val_top1': 60.0, 'train_top1': 70.0}) + '\n')
    report, lines = mini_report.write_report(run)
    assert report['claims']['1']['verdict'] == 'untested'
    assert 'not converged' in report['claims']['1']['sentence']
    assert report['claims']['2']['verdict'] == 'agrees'          # its fine-tunes did converge
    assert any('ft_scratch_s2' in line and 'not converged' in line for line in lines)
