import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.synthetic import indexed_samples, write_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small dataset of learnable sequences (repeated patterns), seq_len 128, vocab 256."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    rng = np.random.default_rng(0)
    base = rng.integers(1, 256, size=(32, 129))
    train = np.concatenate([base] * 20).astype(np.uint16)  # 640 samples
    val = rng.integers(1, 256, size=(16, 129)).astype(np.uint16)
    return write_dataset(root, train, [160] * 4, 256, val=val)


@pytest.fixture(scope="session")
def indexed_dataset(tmp_path_factory) -> Path:
    """1000 samples in 7 uneven shards; each sample's first tokens spell its index."""
    root = tmp_path_factory.mktemp("indexed_dataset")
    samples = indexed_samples(1000, 16, 1024)
    return write_dataset(root, samples, [150, 130, 170, 100, 160, 140, 150], 1024,
                         val=indexed_samples(40, 16, 1024, seed=1))


@pytest.fixture(scope="module")
def dist():
    """A one-rank gloo group in this process (the benchmarks' own, bench.common.cpu_dist), for
    in-process engines; shut down after the module if the module started it."""
    import torch

    from bench import common

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started_here = not torch.distributed.is_initialized()
    common._DIST = None
    d = common.cpu_dist()
    yield d
    common._DIST = None
    if started_here:
        d.shutdown()
