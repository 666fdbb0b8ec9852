"""Every flag a stage accepts is one its code reads: a short real run of each stage records which
flags the code reads (outside argparse), and none of the parser's may be left unread."""
import argparse
import sys

import pytest

import finetune
import linear_probe
import pretrain_distill
import pretrain_mae
import pretrain_moco

# flags whose reader is training.parse_args itself; its other reads (e.g. resolving --amp) do not count
READ_BY_PARSE_ARGS = {'config', 'resume'}


def recording_namespace(read):
    """An argparse.Namespace that adds to `read` the name of every flag the code reads."""

    class Recording(argparse.Namespace):
        def __getattribute__(self, name):
            caller = sys._getframe(1)
            module, function = caller.f_globals.get('__name__'), caller.f_code.co_name
            from_parse_args = module == 'training' and function == 'parse_args'
            if not name.startswith('_') and module != 'argparse' and \
                    (not from_parse_args or name in READ_BY_PARSE_ARGS):
                read.add(name)
            return super().__getattribute__(name)

    return Recording


def flags_of(stage):
    return {a.dest for a in stage.build_parser()._actions if a.dest != 'help'}


def common(folder, out, *extra):
    return [str(a) for a in ('--data', folder, '--img-size', 16, '--patch-size', 4, '--subset', 32,
                             '--batch-size', 16, '--epochs', 2, '--warmup-epochs', 1, '--num-workers', 0,
                             '--output-dir', out, *extra)]


@pytest.fixture(scope='module')
def mae_checkpoint(fashion_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('mae')
    pretrain_mae.main(common(fashion_folder, out))
    return out / 'checkpoint.pth'


@pytest.mark.parametrize('stage, extra', [
    (pretrain_mae, []),
    (pretrain_distill, ['--teacher-model', 'vit_tiny']),
    (finetune, ['--eval-every', 2]),
    (linear_probe, ['--cached-features']),
    (pretrain_moco, ['--mlp-dim', 64, '--out-dim', 32]),
])
def test_a_stage_reads_every_flag_it_accepts(stage, extra, fashion_folder, mae_checkpoint, tmp_path,
                                             monkeypatch):
    read = set()
    monkeypatch.setattr(argparse, 'Namespace', recording_namespace(read))
    init = ['--teacher' if stage is pretrain_distill else '--init', mae_checkpoint]
    stage.main(common(fashion_folder, tmp_path, *init, *extra))
    unread = flags_of(stage) - read
    assert not unread, f"{stage.__name__} accepts flags its code never reads: {sorted(unread)}"


def test_the_check_sees_a_flag_that_nothing_reads(fashion_folder, mae_checkpoint, tmp_path, monkeypatch):
    build = pretrain_mae.build_parser

    def with_a_dead_flag():
        parser = build()
        parser.add_argument('--dead-flag', type=int, default=0)
        return parser

    monkeypatch.setattr(pretrain_mae, 'build_parser', with_a_dead_flag)
    read = set()
    monkeypatch.setattr(argparse, 'Namespace', recording_namespace(read))
    pretrain_mae.main(common(fashion_folder, tmp_path, '--epochs', 1))
    assert flags_of(pretrain_mae) - read == {'dead_flag'}
