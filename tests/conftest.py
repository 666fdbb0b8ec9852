"""Shared fixtures: real data (Fashion-MNIST from Debian's package) as a named data set and as a
small image folder in ImageNet layout, and a runner for the stage scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if os.environ.get('PYTEST_XDIST_WORKER'):    # `pytest -n auto`: the workers share the cores, one thread each
    os.environ['OMP_NUM_THREADS'] = '1'      # (the stage scripts a test starts inherit it)
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

import data  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'ops: operations, not the method: restarts, SIGTERM, resuming a killed '
                                       'run, several processes, the end-to-end scripts. `pytest -m "not ops"` '
                                       'runs the specification alone')


@pytest.fixture(scope='session')
def fashion_root(tmp_path_factory):
    """A --data-root holding real Fashion-MNIST: unpacked from Debian's dataset-fashion-mnist when
    installed, else downloaded once by torchvision to data/ (needs internet)."""
    if any(data.DEBIAN_FASHION_MNIST.glob('*-ubyte.gz')):
        root = tmp_path_factory.mktemp('data')
        data.fashion_mnist_from_debian(root)
        return root
    try:
        data.build_dataset('fashion_mnist', ROOT / 'data', train=True, transform=None)
        return ROOT / 'data'
    except data.DataError as e:
        if os.environ.get('CI'):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope='session')
def fashion_folder(fashion_root, tmp_path_factory):
    """A small real image folder, DIR/{train,val}/<class>/*.png: 40 train and 20 val grayscale
    Fashion-MNIST images for each of the first 4 classes."""
    from torchvision import datasets
    root = tmp_path_factory.mktemp('fashion_folder')
    for split, train, per_class in (('train', True, 40), ('val', False, 20)):
        ds = datasets.FashionMNIST(fashion_root, train=train)
        counts = {}
        for img, label in ds:
            if label >= 4 or counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / ds.classes[label].replace('/', '_')
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{counts[label]:03d}.png')
            if sum(counts.values()) == 4 * per_class:
                break
    return root


@pytest.fixture(scope='session')
def unlabelled_folder(fashion_folder, tmp_path_factory):
    """A folder of unlabelled images for pre-training: fashion_folder's 160 training images, no class
    folders and no train/ or val/, spread over depths 0 to 3, with a text file among them."""
    root = tmp_path_factory.mktemp('unlabelled')
    depths = ['', 'a', 'a/b', 'c/d/e']
    for i, src in enumerate(sorted((fashion_folder / 'train').glob('*/*.png'))):
        folder = root / depths[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{i:03d}.png').write_bytes(src.read_bytes())
    (root / 'a' / 'notes.txt').write_text('not an image')
    return root


def run_script(script, *args, cwd=None, timeout=600):
    """Run a stage script as a user would: a fresh process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def read_log(folder):
    """The lines of a run's log.jsonl."""
    return [json.loads(line) for line in (folder / 'log.jsonl').read_text().splitlines()]


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, and one line 'error: ...' last on stderr (after any progress bar)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith('error: ')]
    assert 'Traceback' not in result.stderr and errors == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
