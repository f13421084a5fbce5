"""pretrain.direct_write: torch.save's format, the tensor bytes written with O_DIRECT. Files read
back with torch.load (weights-only too) equal to the state; what cannot go direct (unaligned
buffers, tails, no O_DIRECT, non-ASCII paths) goes through the page cache into the same file."""

import errno
import os

import pytest
import torch

from pretrain import direct_write
from pretrain.direct_write import ALIGN, CHUNK, host_buffer
from tests.helpers.disks import small_ext4


def staged(t: torch.Tensor) -> torch.Tensor:
    buf = host_buffer(t.shape, t.dtype)
    buf.copy_(t)
    return buf


def a_state(make=staged):
    """Something like a DeepSpeed optimizer file: sizes that are no multiple of a block, a tensor
    over one write call (CHUNK), bf16 and int64, one tensor reached twice, empty ones, objects."""
    g = torch.Generator().manual_seed(0)
    big = make(torch.randn(CHUNK // 4 + 1000, generator=g))
    return {
        "optimizer_state_dict": {
            "state": {0: {"exp_avg": make(torch.randn(3, 1001, generator=g)),
                          "exp_avg_sq": make(torch.rand(3, 1001, generator=g)),
                          "step": make(torch.tensor(7.0))}},
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0]}],
        },
        "fp32_flat": [big, make(torch.randn(ALIGN // 4, generator=g))],
        "same": big,
        "bf16": make(torch.randn(17, 5, generator=g).bfloat16()),
        "ids": make(torch.arange(12345)),
        "empty": make(torch.empty(0, 4)),
        "ds_version": "0.19.8", "step": 42,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def total_bytes(state) -> int:
    seen, n = set(), 0

    def walk(x):
        nonlocal n
        if isinstance(x, torch.Tensor):
            if x.untyped_storage().data_ptr() not in seen:
                seen.add(x.untyped_storage().data_ptr())
                n += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(state)
    return n


def test_host_buffers_are_aligned_and_hold_exactly_their_tensor():
    for shape, dtype in (((3, 1001), torch.float32), ((17, 5), torch.bfloat16), ((0,), torch.int64),
                         ((), torch.float32)):
        t = host_buffer(shape, dtype)
        assert t.shape == torch.Size(shape) and t.dtype == dtype and t.is_contiguous()
        assert t.untyped_storage().data_ptr() % ALIGN == 0 or t.numel() == 0
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_saved_file_loads_as_the_state_and_goes_direct(tmp_path):
    state = a_state()
    path = tmp_path / "mp_rank_00_optim_states.pt"
    written = direct_write.save(state, str(path))
    assert_same(state, torch.load(path, weights_only=True))
    loaded = torch.load(path, weights_only=False)
    assert loaded["same"] is loaded["fp32_flat"][0]  # one storage, as torch.save keeps it
    assert written.direct + written.buffered == total_bytes(state)
    # this machine's ext4 takes O_DIRECT: all but the partial last block of each record
    assert written.direct >= total_bytes(state) - 8 * ALIGN and written.direct % ALIGN == 0
    # the file is torch.save's format: the same records (torch.save aligns records to 64 bytes)
    torch.save(state, tmp_path / "peer.pt")
    ours = torch._C.PyTorchFileReader(str(path)).get_all_records()
    peer = torch._C.PyTorchFileReader(str(tmp_path / "peer.pt")).get_all_records()
    assert sorted(ours) == sorted(peer)


def test_unaligned_tensors_go_through_the_page_cache(tmp_path):
    state = a_state(make=lambda t: t.clone())  # torch's allocator: 64-byte aligned
    assert any(t.untyped_storage().data_ptr() % ALIGN for t in state["fp32_flat"])
    written = direct_write.save(state, str(tmp_path / "f.pt"))
    assert_same(state, torch.load(tmp_path / "f.pt", weights_only=True))
    assert written.buffered > 0


def test_without_o_direct_the_same_file_goes_through_the_page_cache(tmp_path, monkeypatch):
    """A platform without O_DIRECT (or a file system refusing it: the same path in the code)."""
    monkeypatch.delattr(os, "O_DIRECT")
    state = a_state()
    written = direct_write.save(state, str(tmp_path / "f.pt"))
    assert_same(state, torch.load(tmp_path / "f.pt", weights_only=True))
    assert written.direct == 0 and written.buffered == total_bytes(state)


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes (EINVAL: a logical block
    over 4096 bytes): the rest of the file goes through the page cache, the file is whole."""
    real_pwrite, direct_fds = os.pwrite, set()
    real_open = os.open

    def open_(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    state = a_state()
    written = direct_write.save(state, str(tmp_path / "f.pt"))
    monkeypatch.undo()
    assert_same(state, torch.load(tmp_path / "f.pt", weights_only=True))
    assert written.direct == 0 and written.buffered == total_bytes(state) and direct_fds


def test_a_non_ascii_path_is_saved_by_torch_save(tmp_path):
    state = a_state()
    path = tmp_path / "prüfung" / "f.pt"
    path.parent.mkdir()
    written = direct_write.save(state, str(path))
    assert_same(state, torch.load(path, weights_only=True))
    assert written.direct == 0 and written.buffered == total_bytes(state)


def test_a_full_disk_fails_the_save(tmp_path):
    """A hole the disk cannot fill fails the save with ENOSPC (the checkpointer then keeps the
    previous checkpoint), on a real ext4 that takes O_DIRECT; a state that fits is written."""
    with small_ext4(tmp_path / "disk", mib=4) as disk:
        small = {"w": staged(torch.randn(1 << 18))}  # 1 MiB
        assert direct_write.save(small, str(disk / "fits.pt")).direct > 0
        assert_same(small, torch.load(disk / "fits.pt", weights_only=True))
        with pytest.raises(OSError) as e:
            direct_write.save({"w": staged(torch.randn(1 << 20))}, str(disk / "full.pt"))
        assert e.value.errno == errno.ENOSPC
