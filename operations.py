"""Operations: what keeps a run alive on a laptop, a GPU box and a cluster, kept off the reading path.

  run_main       a user's mistake (missing data, a junk checkpoint, a NaN loss) ends in one line and exit
                 code 2, never a traceback; SIGTERM (a scheduler's or torchrun's stop) in one line and
                 exit code 143, the last checkpoint intact
  resume_path    `--resume auto`: one command for the first start and every restart
  attempt_store  the process group's store, safe across torchrun restarts

Nothing here is part of the method; a reader of the paper can skip this file.
"""
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from data import DataError
from vit import CheckpointError


class RunError(Exception):
    """A problem with the run's input or state (bad config, wrong checkpoint, non-finite loss)."""


USER_ERRORS = (RunError, DataError, CheckpointError)


class Terminated(Exception):
    """SIGTERM: what a scheduler or torchrun sends before it stops a job."""
    received = False


def raise_terminated(signum, frame):
    Terminated.received = True
    raise Terminated()


def run_main(main):
    """Call main(); a user-facing error becomes one line on stderr and exit code 2, no traceback.
    SIGTERM stops the run at once with one line and exit code 143 (128 + 15); checkpoints are written
    to a temporary file and renamed, so the last one is intact."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main()
    except USER_ERRORS as e:
        # an error raised in a DataLoader worker arrives wrapped with the worker's traceback: its
        # last line holds our message
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = message.split(f"{type(e).__name__}: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        sys.exit(130)
    except Exception:
        if not Terminated.received:
            raise
        # what SIGTERM interrupted (a collective whose peer is gone, DataLoader workers stopped by
        # the same signal) may fail with its own error after ours: the cause is still the SIGTERM
        print("stopped by SIGTERM; the last checkpoint is intact: the same command with --resume auto "
              "continues from it", file=sys.stderr)
        sys.exit(143)


def resume_path(resume, output_dir):
    """The checkpoint to resume from: --resume PATH as given; with 'auto', OUTPUT_DIR/checkpoint.pth
    when it exists, else None (a fresh start), said in one line. One command then serves the first
    start and every restart (torchrun --max-restarts, a scheduler, a crash)."""
    if resume != 'auto':
        return resume
    path = Path(output_dir) / 'checkpoint.pth'
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"--resume auto: {f'continuing from {path}' if path.exists() else f'no {path} yet, starting fresh'}",
              flush=True)
    return str(path) if path.exists() else None


def attempt_store():
    """The store the process group meets in: torchrun's (env://), with its keys prefixed by the restart
    attempt when one torchrun agent shares its store with every attempt (its default). Without the
    prefix a restarted process can read a peer's address left by the attempt before, and connect to
    a dead socket (init_process_group fails) or to one that an orphaned DataLoader worker of the
    killed process still holds (it hangs); pytorch/pytorch#135712. Agents on several nodes count
    restarts each on their own, so there the attempt is no common key: run them with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a fresh store."""
    store, _, _ = next(dist.rendezvous('env://'))
    shared = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    if shared and os.environ.get('GROUP_WORLD_SIZE', '1') == '1':
        return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store
