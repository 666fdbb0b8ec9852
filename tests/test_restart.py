"""DDP under torchrun on CPU (gloo) with DataLoader worker processes: the job trains as one (one process
speaks, the global batch), and with --max-restarts a worker killed mid-epoch is restarted together with
its peer, and the job ends with the losses of the same job run without the kill."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_log

TORCHRUN = shutil.which('torchrun', path=str(Path(sys.executable).parent)) or shutil.which('torchrun')
pytestmark = [pytest.mark.ops, pytest.mark.skipif(TORCHRUN is None, reason='torchrun is not installed')]


def start_job(output_dir, data_root):
    """2 processes x 2 loader workers, 3 epochs of 8 steps, --resume auto: the command a restart repeats."""
    command = [TORCHRUN, '--standalone', '--nproc_per_node=2', '--max-restarts=1', str(ROOT / 'pretrain_mae.py'),
               '--config', str(ROOT / 'configs/mae_tiny_fashion_mnist_quick.yaml'), '--no-data-on-device',
               '--data', 'fashion_mnist', '--data-root', str(data_root), '--subset', '1024', '--epochs', '3',
               '--batch-size', '64', '--num-workers', '2', '--device', 'cpu', '--resume', 'auto',
               '--output-dir', str(output_dir)]
    with open(f'{output_dir}.out', 'w') as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def processes():
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / 'stat').read_text()
            cmdline = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except (OSError, ValueError):
            continue
        found[int(entry.name)] = (int(stat.rsplit(')', 1)[1].split()[1]), cmdline)
    return found


def local_rank_1_worker(agent_pid):
    """The training process torchrun started as LOCAL_RANK 1 (not one of its DataLoader workers)."""
    for pid, (parent, cmdline) in processes().items():
        if parent == agent_pid and 'pretrain_mae.py' in cmdline:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            if b'LOCAL_RANK=1' in environ:
                return pid
    return None


def kill_leftovers(output_dir):
    """Every process of this job, orphaned loader workers included (they keep their parent's command line)."""
    for pid, (_, cmdline) in processes().items():
        if str(output_dir) in cmdline and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_killed_mid_epoch_is_restarted_and_ends_with_the_uninterrupted_loss(fashion_root, tmp_path):
    reference, killed = tmp_path / 'reference', tmp_path / 'killed'
    try:
        job = start_job(reference, fashion_root)
        assert job.wait(timeout=180) == 0, Path(f'{reference}.out').read_text()[-3000:]
        output = Path(f'{reference}.out').read_text()                # DDP: one speaker, the global batch
        assert output.count('effective batch') == 1 and 'x 2 |' in output and 'effective batch 128' in output

        job = start_job(killed, fashion_root)
        deadline = time.time() + 120
        while not ((killed / 'checkpoint.pth').exists() and (killed / 'log.jsonl').exists()):
            assert job.poll() is None and time.time() < deadline, Path(f'{killed}.out').read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.3)                                              # into epoch 1 (of 0, 1, 2)
        victim = local_rank_1_worker(job.pid)
        assert victim is not None and job.poll() is None
        os.kill(victim, signal.SIGKILL)
        try:
            returncode = job.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the restarted job hung:\n{Path(f'{killed}.out').read_text()[-3000:]}")
        output = Path(f'{killed}.out').read_text()
        assert returncode == 0, output[-3000:]
        assert 'continuing from' in output                          # it did restart, from the checkpoint
    finally:
        kill_leftovers(tmp_path)

    expected, got = read_log(reference), read_log(killed)
    assert expected[-1]['loss'] < expected[0]['loss']
    assert [r['epoch'] for r in got] == [0, 1, 2]
    assert got[-1]['loss'] == expected[-1]['loss']
