"""docs/slurm_pretrain_mae.sbatch: it parses, launches one torchrun per node with --resume auto, and
near the time limit stops the run with SIGTERM and requeues the job (srun and scontrol stubbed)."""
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT

SCRIPT = ROOT / 'docs' / 'slurm_pretrain_mae.sbatch'


def test_the_sbatch_script_parses():
    result = subprocess.run(['bash', '-n', str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def stub(bin_dir, name, body):
    path = bin_dir / name
    path.write_text('#!/bin/bash\n' + body)
    path.chmod(0o755)


def start_job(tmp_path, run_ends):
    """The script as Slurm starts it on a 2-node allocation, with srun and scontrol stubs that write
    what they are asked into calls.txt. The srun stub runs until SIGTERM unless `run_ends`."""
    bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls.txt'
    bin_dir.mkdir()
    stub(bin_dir, 'srun', f'echo "srun $* share=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" >> {calls}\n'
                          f'{"exit 0" if run_ends else ""}\n'
                          f'trap \'echo "run got TERM" >> {calls}; exit 143\' TERM\n'
                          'while true; do sleep 0.05; done\n')
    stub(bin_dir, 'scontrol', f'if [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"; '
                              f'else echo "scontrol $*" >> {calls}; fi\n')
    env = {**os.environ, 'PATH': f"{bin_dir}:{os.environ['PATH']}", 'SLURM_JOB_NODELIST': 'gpu-[a-b]',
           'SLURM_NNODES': '2', 'SLURM_JOB_ID': '4242'}
    job = subprocess.Popen(['bash', str(SCRIPT)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return job, calls


def wait_for(calls, text, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if calls.exists() and text in calls.read_text():
            return calls.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no '{text}' in {calls.read_text() if calls.exists() else 'nothing'}")


@pytest.mark.ops
def test_near_the_time_limit_the_run_gets_sigterm_and_the_job_requeues(tmp_path):
    job, calls = start_job(tmp_path, run_ends=False)
    launched = wait_for(calls, 'srun')
    for flag in ('torchrun --nnodes=2 --nproc-per-node=8 --max-restarts=3', '--rdzv-backend=c10d',
                 '--rdzv-endpoint=gpu-a:29500', '--resume auto', 'share=1'):
        assert flag in launched, launched
    job.send_signal(signal.SIGUSR1)                 # what --signal=B:USR1@120 sends
    job.wait(timeout=10)
    lines = calls.read_text().splitlines()
    assert job.returncode == 0 and lines[1:] == ['run got TERM', 'scontrol requeue 4242'], lines


@pytest.mark.ops
def test_a_run_that_ends_is_not_requeued(tmp_path):
    job, calls = start_job(tmp_path, run_ends=True)
    job.wait(timeout=10)
    assert job.returncode == 0 and 'requeue' not in calls.read_text()
