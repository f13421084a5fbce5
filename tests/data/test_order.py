"""The sample order is a pure function of (seed, epoch, shard counts): a permutation per epoch."""

import numpy as np

from pretrain.data.order import SampleOrder, micro_batch_indices, owner


def _epoch(order: SampleOrder, epoch: int):
    g = epoch * order.epoch_size
    seen = []
    while g < (epoch + 1) * order.epoch_size:
        w = order.window_of(g)
        shards, idx = w.locate(np.arange(w.size), order.counts)
        seen += list(zip(shards.tolist(), idx.tolist()))
        g = w.start + w.size
    return seen


def test_each_epoch_is_a_permutation_of_all_samples():
    counts = [5, 9, 3, 7, 11]
    order = SampleOrder(counts, seed=3, window=2)
    everything = {(s, i) for s, c in enumerate(counts) for i in range(c)}
    e0, e1 = _epoch(order, 0), _epoch(order, 1)
    assert set(e0) == everything and len(e0) == sum(counts)
    assert set(e1) == everything and e0 != e1  # reshuffled every epoch


def test_order_is_reproducible_and_seeded():
    a = _epoch(SampleOrder([4, 4, 4], seed=1), 0)
    assert a == _epoch(SampleOrder([4, 4, 4], seed=1), 0)
    assert a != _epoch(SampleOrder([4, 4, 4], seed=2), 0)
    assert _epoch(SampleOrder([4, 4, 4], seed=1, shuffle=False), 0) == [
        (s, i) for s in range(3) for i in range(4)]


def test_micro_batches_partition_the_stream_across_ranks():
    start, dp, micro = 24, 3, 4
    got = np.concatenate([micro_batch_indices(start, k, dp, r, micro)
                          for k in range(5) for r in range(dp)])
    assert got.tolist() == list(range(start, start + 5 * dp * micro))
    rank, worker = owner(got, start, dp, micro, workers=2)
    assert rank.tolist() == [r for k in range(5) for r in range(dp) for _ in range(micro)]
    assert worker.tolist() == [k % 2 for k in range(5) for _ in range(dp) for _ in range(micro)]
