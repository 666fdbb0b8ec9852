"""ablate.py: two settings of one stage compared with seeds, in the miniature's regime, judged by
mini_report's rule. The smoke run is an A/A comparison: the same flags on both arms must give the same
numbers, and no verdict."""
import json

import pytest

import ablate
import finetune
import pretrain_mae
from conftest import assert_one_line_error, run_script
from operations import RunError


# -- the verdict ---------------------------------------------------------------------------------
def test_a_difference_inside_two_standard_errors_shows_nothing():
    a, b = [90.0, 91.0, 92.0], [91.0, 92.0, 93.0]          # diff +1, SE 0.82: 1 < 1.63
    assert ablate.judge(a, b)[0] == 'no difference shown'
    assert ablate.judge(a, [95.0, 96.0, 97.0])[0] == 'b better'       # +5, SE 0.82
    assert ablate.judge([95.0, 96.0, 97.0], a)[0] == 'a better'


def test_for_a_loss_lower_is_better_and_one_seed_gives_no_verdict():
    assert ablate.judge([0.50, 0.51, 0.52], [0.40, 0.41, 0.42], lower_is_better=True)[0] == 'b better'
    assert ablate.judge([0.40, 0.41, 0.42], [0.50, 0.51, 0.52], lower_is_better=True)[0] == 'a better'
    verdict, diff, se = ablate.judge([90.0], [99.0])
    assert verdict == 'no difference shown' and diff != diff and se != se       # nan: no standard error


# -- the plan ------------------------------------------------------------------------------------
def test_stages_the_arms_do_not_change_are_planned_once(tmp_path):
    arms = {'a': ['--distill-layers', '-1'], 'b': ['--distill-layers', '5,-1']}
    stages, readouts = ablate.plan('pretrain_distill', arms, 3, 'quick', tmp_path, [])
    names = [s.name for s in stages]
    assert names.count('teacher') == 1 and len(names) == len(set(names))
    students = [s for s in stages if s.config == 'pretrain_distill']
    assert len(students) == 6 and all(s.needs == ['teacher'] for s in students)
    for s in stages:    # the arm's flags reach its own pre-training runs, and nothing else
        assert ('5,-1' in s.flags) == (s.config == 'pretrain_distill' and s.name.startswith('b_'))
    assert [len(per_seed) for per_seed in readouts['finetune_src']['b']] == [1, 1, 1]

    stages, readouts = ablate.plan('finetune', {'a': ['--layer-decay', '0.85'], 'b': ['--layer-decay', '0.65']},
                                   2, 'quick', tmp_path, [])
    assert [s.name for s in stages if s.config == 'pretrain_mae'] == ['mae']
    assert all(s.needs == ['mae'] for s in stages if s.config == 'finetune')
    assert set(readouts) == {'finetune_src', 'finetune_dst', 'loss'}     # probe and kNN: the shared encoder's


def test_a_pretraining_ablation_also_fine_tunes_each_encoder_on_claim_4s_more_labels(tmp_path):
    stages, readouts = ablate.plan('pretrain_mae', {'a': [], 'b': ['--mask-ratio', '0.5']}, 2, 'quick', tmp_path, [])
    more = {s.name: s for s in stages if s.name.startswith('ft_more_labels_')}
    assert readouts['finetune_more'] == {arm: [[f'ft_more_labels_{arm}_p{p}_s0'] for p in (0, 1)] for arm in 'ab'}
    for name, stage in more.items():      # 1,000 SOURCE labels for 10 epochs, the arm's encoder, not its flags
        args = finetune.build_parser().parse_args(stage.flags)
        assert (args.subset, args.epochs, args.classes) == (1000, 10, [0, 1, 4, 5, 8]), name
        encoder = name.removeprefix('ft_more_labels_').rsplit('_s', 1)[0]
        assert stage.needs == [encoder] and args.init == str(tmp_path / encoder / 'checkpoint.pth')
        assert '0.5' not in stage.flags
    full = next(s for s in ablate.plan('pretrain_mae', {'a': [], 'b': []}, 2, 'full', tmp_path, [])[0]
                if s.name.startswith('ft_more_labels_'))
    assert finetune.build_parser().parse_args(full.flags).subset == 0          # --full: every label


def test_a_rerun_skips_what_is_done_but_not_what_depends_on_a_stage_that_runs_again(tmp_path):
    stages, _ = ablate.plan('pretrain_mae', {'a': [], 'b': ['--mask-ratio', '0.5']}, 2, 'quick', tmp_path, [])
    records = []
    for stage in stages:                    # an earlier run that finished every stage
        (tmp_path / stage.name).mkdir()
        records.append({'stage': stage.name, 'seconds': 1.0, 'command': ablate.command_line(stage, 1)})

    def write():
        (tmp_path / 'times.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    write()
    assert set(ablate.done_earlier(stages, tmp_path, 1)) == {s.name for s in stages}
    assert ablate.done_earlier(stages, tmp_path, 2) == {}                  # another thread count: another command
    records[[r['stage'] for r in records].index('b_p0')]['command'] += ' --epochs 3'     # b_p0 runs again,
    write()
    again = {s.name for s in stages} - set(ablate.done_earlier(stages, tmp_path, 1))
    assert again == {s.name for s in stages if s.name == 'b_p0' or s.needs == ['b_p0']}   # and all it feeds
    assert len(again) == 1 + 4          # its fine-tunes on SOURCE, TARGET and more labels, and its probe


@pytest.mark.parametrize('size', ['quick', 'smoke', 'full'])
def test_an_arms_flag_wins_over_the_regimes_setting_of_it(size, tmp_path):
    stages, _ = ablate.plan('pretrain_mae', {'a': ['--amp', 'none', '--epochs', '7'], 'b': []}, 1, size, tmp_path, [])
    a_pretraining = next(s for s in stages if s.name.startswith('a_'))
    args = pretrain_mae.build_parser().parse_args(a_pretraining.flags)
    assert (args.amp, args.epochs) == ('none', 7)


@pytest.mark.parametrize('flags, message', [
    ('--no-such-flag 3', 'pretrain_mae.py takes no --no-such-flag'),
    ('--mask-ratio abc', "invalid float value: 'abc'"),
    ('--seed 3', '--seed is set by the ablation'),
])
def test_a_flag_the_stage_does_not_take_is_refused_before_anything_runs(tmp_path, flags, message):
    with pytest.raises(RunError, match=message):
        ablate.main(['--stage', 'pretrain_mae', '--a', '--mask-ratio 0.75', '--b', flags, '--run-dir',
                     str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()


def test_the_refusal_is_one_line_from_the_command_line(tmp_path):
    result = run_script('ablate.py', '--stage', 'finetune', '--a', '--layer-decay 0.85', '--b', '--mask-ratio 0.5',
                        '--run-dir', tmp_path / 'run')
    assert_one_line_error(result, 'finetune.py takes no --mask-ratio 0.5')
    assert not (tmp_path / 'run').exists()


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.ops
def test_an_a_a_smoke_run_gives_identical_numbers_and_no_verdict(fashion_root, tmp_path):
    """A fine-tune ablation whose arms are the same: the shared pre-training runs once, each arm's
    fine-tunes run on their own, and both arms give the same numbers to the last digit."""
    run = tmp_path / 'run'
    args = ['--stage', 'finetune', '--a', '--smoothing 0.1', '--b', '--smoothing 0.1', '--smoke', '--run-dir', run,
            '--data-root', fashion_root]
    result = run_script('ablate.py', *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / 'ablation.json').read_text())
    assert set(report['readouts']) == {'finetune_src', 'finetune_dst', 'loss'}
    for name, readout in report['readouts'].items():
        assert len(readout['a']) == 2 and readout['a'] == readout['b'], name          # one per seed
        assert readout['diff'] == 0 and readout['verdict'] == 'no difference shown'
    assert len(set(report['readouts']['finetune_src']['a'] + report['readouts']['finetune_dst']['a'])) > 1
    names = [s['name'] for s in report['stages']]
    assert names.count('mae') == 1 and len(names) == 1 + 2 * 2 * 2       # shared MAE + 2 arms x 2 seeds x 2
    assert sorted(names[1:]) == sorted(f'{task}_{arm}_s{seed}' for task in ('ft', 'transfer') for arm in 'ab'
                                       for seed in (0, 1))
    assert '| fine-tune top-1 %, unseen classes' in (run / 'ablation.md').read_text()
    again = run_script('ablate.py', *args)                      # everything done: nothing runs again
    assert again.returncode == 0 and again.stdout.count('done in an earlier run') == len(names)
