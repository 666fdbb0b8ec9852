"""--amp bf16|fp16|none: how the flag resolves, fp16 with its gradient scaler (a real run, exact resume,
skipped steps, divergence), the logits kept in fp32 under autocast, and a build without fp16 autocast.
fp16 autocast runs on CPU, slowly (no fast fp16 matmul there): the fp16 runs are short."""
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import pretrain_mae
import training
from conftest import read_log
from operations import RunError, run_main
from pretrain_distill import attention_distillation_loss
from pretrain_moco import contrastive_loss
from training import parse_args, resolve_amp
from vit import Attention

TIMING = ('img_per_s', 'epoch_time_s')


def fp16_args(folder, out, *extra):
    """A short fp16 MAE run: 12 steps of 4 images an epoch, 2 epochs."""
    return [str(a) for a in ('--data', folder, '--img-size', 16, '--patch-size', 4, '--subset', 48,
                             '--batch-size', 4, '--epochs', 2, '--warmup-epochs', 0.5, '--lr', 1e-3,
                             '--num-workers', 0, '--amp', 'fp16', '--output-dir', out, *extra)]


def without_timing(log):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in log]


@pytest.fixture(scope='module')
def fp16_run(fashion_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('fp16')
    pretrain_mae.main(fp16_args(fashion_folder, out))
    return out


# -- the flag --------------------------------------------------------------------------------------
@pytest.mark.parametrize('given, device, expected', [
    ('fp16', 'cpu', 'fp16'), ('bf16', 'cuda', 'bf16'), ('none', 'cuda', 'none'),   # named: as given
    (None, 'cpu', 'none'),                                      # not given, on CPU: fp32
    (True, 'cpu', 'bf16'),                                      # bare --amp / `amp: true` on CPU: bf16
    (False, 'cuda', 'none'),                                    # --no-amp / `amp: false`
    ('FP16', 'cpu', 'fp16'),                                    # a YAML value in capitals
])
def test_amp_resolves_to_a_mode(given, device, expected):
    assert resolve_amp(given, device) == expected


@pytest.mark.parametrize('native_bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_the_cuda_default_is_bf16_where_the_gpu_has_it_natively_else_fp16(native_bf16, expected,
                                                                           monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    assert resolve_amp(None, 'cuda') == resolve_amp(True, 'cuda:1') == expected
    assert asked == [False, False]                 # an emulated bf16 (T4, V100) does not count


def test_an_unknown_amp_value_is_one_error_line():
    with pytest.raises(RunError, match='--amp fp8: choose bf16, fp16'):
        resolve_amp('fp8', 'cpu')


@pytest.mark.parametrize('argv, expected', [
    (['--amp', 'fp16'], 'fp16'), (['--amp', 'bf16'], 'bf16'), (['--amp', 'none'], 'none'),
    (['--amp'], 'bf16'), (['--no-amp'], 'none'), ([], 'none'),
])
def test_the_command_line_forms_of_amp(argv, expected):
    assert parse_args(pretrain_mae.build_parser(), ['--device', 'cpu', *argv]).amp == expected


@pytest.mark.parametrize('value, expected', [(True, 'bf16'), (False, 'none'), ('fp16', 'fp16'),
                                             ('none', 'none')])
def test_a_yaml_config_may_say_amp_true_false_or_a_mode(value, expected, tmp_path):
    config = tmp_path / 'config.yaml'
    config.write_text(yaml.safe_dump({'amp': value}))
    parser = pretrain_mae.build_parser
    assert parse_args(parser(), ['--config', str(config), '--device', 'cpu']).amp == expected
    assert parse_args(parser(), ['--config', str(config), '--device', 'cpu', '--no-amp']).amp == 'none'


@pytest.mark.parametrize('saved, expected', [(True, 'bf16'), (False, 'none'), ('fp16', 'fp16')])
def test_a_resumed_run_keeps_the_amp_of_its_checkpoint(saved, expected, tmp_path):
    """Older checkpoints saved --amp as true/false, newer ones the resolved mode."""
    path = tmp_path / 'checkpoint.pth'
    torch.save({'stage': 'pretrain_mae', 'args': {'amp': saved, 'device': 'cpu'}}, path)
    assert parse_args(pretrain_mae.build_parser(), ['--resume', str(path)]).amp == expected
    assert parse_args(pretrain_mae.build_parser(), ['--resume', str(path), '--amp', 'bf16']).amp == 'bf16'


def test_only_fp16_gets_a_gradient_scaler():
    cpu = torch.device('cpu')
    assert isinstance(training.grad_scaler('fp16', cpu), torch.amp.GradScaler)
    assert training.grad_scaler('bf16', cpu) is None and training.grad_scaler('none', cpu) is None


# -- fp16 runs -------------------------------------------------------------------------------------
def test_a_short_fp16_run_lowers_the_loss_and_saves_its_scaler(fp16_run):
    log = read_log(fp16_run)
    assert [line['epoch'] for line in log] == [0, 1]
    assert log[1]['loss'] < 0.9 * log[0]['loss'], log
    assert all('skipped_steps' in line for line in log)
    scaler = torch.load(fp16_run / 'checkpoint.pth', weights_only=True)['scaler']
    assert scaler['scale'] == 65536.0 * 0.5 ** sum(line['skipped_steps'] for line in log)   # no growth yet
    assert yaml.safe_load((fp16_run / 'config.yaml').read_text())['amp'] == 'fp16'


def test_the_first_line_names_the_amp(fashion_folder, tmp_path, capsys):
    pretrain_mae.main(fp16_args(fashion_folder, tmp_path, '--epochs', 1, '--subset', 8))
    assert 'amp fp16 + GradScaler' in capsys.readouterr().out.splitlines()[0]


def test_an_fp16_run_stopped_after_an_epoch_resumes_exactly(fp16_run, fashion_folder, tmp_path, monkeypatch):
    real_save = pretrain_mae.save_checkpoint

    def save_then_die(path, **state):                               # killed right after epoch 0
        real_save(path, **state)
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain_mae, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mae.main(fp16_args(fashion_folder, tmp_path))
    monkeypatch.undo()
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['scaler'] is not None
    pretrain_mae.main(['--resume', str(tmp_path / 'checkpoint.pth')])

    assert without_timing(read_log(tmp_path)) == without_timing(read_log(fp16_run))
    whole, resumed = (torch.load(d / 'checkpoint.pth', weights_only=True) for d in (fp16_run, tmp_path))
    assert whole['scaler'] == resumed['scaler']
    assert all(torch.equal(whole['model'][k], resumed['model'][k]) for k in whole['model'])


def test_steps_skipped_for_inf_gradients_are_counted_and_do_not_stop_the_run(fashion_folder, tmp_path,
                                                                              monkeypatch):
    # a scale of 2^60 overflows every fp16 gradient: each step is skipped and halves the scale
    monkeypatch.setattr(pretrain_mae, 'grad_scaler',
                        lambda amp, device: torch.amp.GradScaler(device.type, init_scale=2.0 ** 60))
    pretrain_mae.main(fp16_args(fashion_folder, tmp_path, '--epochs', 1, '--subset', 16))
    [line] = read_log(tmp_path)
    assert line['skipped_steps'] == 4 and torch.isfinite(torch.tensor(line['loss']))
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['scaler']['scale'] == 2.0 ** 56


def test_a_nan_loss_still_stops_an_fp16_run_with_one_line(fashion_folder, tmp_path, monkeypatch):
    real_loss = pretrain_mae.MAE.forward_loss
    monkeypatch.setattr(pretrain_mae.MAE, 'forward_loss',
                        lambda self, imgs, pred, mask: real_loss(self, imgs, pred, mask) * float('nan'))
    with pytest.raises(RunError) as error:
        pretrain_mae.main(fp16_args(fashion_folder, tmp_path, '--epochs', 1, '--subset', 8))
    assert 'loss is nan' in str(error.value) and 'training diverged' in str(error.value)
    assert '\n' not in str(error.value)


def test_fp16_on_a_device_without_fp16_autocast_is_one_error_line(fashion_folder, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(training, 'fp16_autocast_works', lambda device: False)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(lambda: pretrain_mae.main(fp16_args(fashion_folder, tmp_path)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith('error: --amp fp16: ') and 'no fp16 autocast on cpu' in lines[-1]
    assert '--amp bf16 or --amp none' in lines[-1] and 'Traceback' not in '\n'.join(lines)
    assert not (Path(tmp_path) / 'log.jsonl').exists()


def test_this_build_runs_fp16_autocast_on_cpu():
    assert training.fp16_autocast_works(torch.device('cpu'))


# -- logits in fp32 --------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_mocos_contrastive_logits_are_fp32_under_autocast(dtype, monkeypatch):
    seen = []
    real_cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, 'cross_entropy', lambda logits, *a, **k: seen.append(logits.dtype)
                        or real_cross_entropy(logits, *a, **k))
    torch.manual_seed(0)
    q, k = torch.randn(4, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    with torch.autocast('cpu', dtype=dtype):
        loss = contrastive_loss(q, k, 0.2)
    assert seen == [torch.float32] and loss.dtype == torch.float32
    torch.testing.assert_close(loss, contrastive_loss(q.float(), k.float(), 0.2))   # as in fp32


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_attention_logits_are_fp32_under_autocast(dtype):
    torch.manual_seed(0)
    attention, x = Attention(32, 4), torch.randn(2, 5, 32)
    with torch.autocast('cpu', dtype=dtype):
        out, logits = attention(x, return_attn_logits=True)
        qkv = attention.qkv(x)                                                    # (B, N, 3 D) in dtype
    assert logits.dtype == torch.float32 and out.dtype == dtype
    q, k, _ = qkv.view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)                      # each (B, heads, N, d)
    reference = (q.float() * attention.scale) @ k.float().transpose(-2, -1)
    torch.testing.assert_close(logits, reference)        # from the autocast q and k, no rounding after


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_the_attention_distillation_loss_is_fp32_under_autocast(dtype):
    """The head-mixing 1x1 convolution of D-MAE runs in fp32 too: the loss is the fp32 formula's."""
    torch.manual_seed(0)
    adapter = torch.nn.Conv2d(3, 6, 1, bias=False)
    student, teacher = torch.randn(2, 3, 5, 5) * 4, torch.randn(2, 6, 5, 5) * 4        # logits, fp32
    expected = ((torch.einsum('ts,bsij->btij', adapter.weight[:, :, 0, 0], student) - teacher) ** 2).mean()
    with torch.autocast('cpu', dtype=dtype):
        loss = attention_distillation_loss(student, teacher, adapter)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)      # bf16 mixing would miss by ~1e-3


def test_attention_logits_without_autocast_are_the_fp32_formula_bit_for_bit():
    torch.manual_seed(0)
    attention, x = Attention(32, 4), torch.randn(2, 5, 32)
    out, logits = attention(x, return_attn_logits=True)
    q, k, v = attention.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected_logits = (q * attention.scale) @ k.transpose(-2, -1)
    expected_out = attention.proj((expected_logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.equal(logits, expected_logits) and torch.equal(out, expected_out)
