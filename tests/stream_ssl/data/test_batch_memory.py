"""Reused CPU batch memory: reuse only once nothing refers to the memory any more."""

import torch

from stream_ssl.data import batch_memory
from stream_ssl.data.augment import photometric, simclr_views

SHAPE = (4, 3, 8, 8)


def test_memory_is_reused_once_the_batch_is_dropped():
    a = batch_memory.empty(SHAPE)
    ptr = a.data_ptr()
    del a
    b = batch_memory.empty(SHAPE)
    assert b.shape == SHAPE and b.dtype == torch.float32 and b.data_ptr() == ptr


def test_memory_in_use_is_never_handed_out_again():
    a = batch_memory.empty(SHAPE)
    view = a[1:]
    ptr = a.data_ptr()
    del a
    assert batch_memory.empty(SHAPE).data_ptr() != ptr  # a view keeps it
    del view
    # what autograd saved for backward keeps it too, until backward frees it
    x = batch_memory.empty(SHAPE).fill_(1.0)
    ptr = x.data_ptr()
    w = torch.ones(8, requires_grad=True)
    loss = (x * w).sum()
    del x
    held = batch_memory.empty(SHAPE)
    assert held.data_ptr() != ptr
    loss.backward()
    assert torch.equal(w.grad, torch.full((8,), 4.0 * 3 * 8))
    assert batch_memory.empty(SHAPE).data_ptr() == ptr


def test_other_sizes_and_dtypes_get_their_own_memory_and_the_pool_stays_bounded():
    kept = [batch_memory.empty((i + 1, 5)) for i in range(3 * batch_memory._KEEP)]  # all in use
    assert len(batch_memory._arrays) <= batch_memory._KEEP
    assert len({t.data_ptr() for t in kept}) == len(kept)
    assert batch_memory.empty((2, 5), dtype="uint8").dtype == torch.uint8


def test_photometric_outputs_are_not_overwritten_by_the_next_batch():
    spec = simclr_views(16, blur=True)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    first = photometric(x, spec, g)
    copy = first.clone()
    second = photometric(x.flip(0), spec, g)
    assert torch.equal(first, copy) and first.data_ptr() != second.data_ptr()
    del first, copy
    third = photometric(x, spec, g)  # the first batch's memory is free again
    assert third.shape == x.shape and torch.isfinite(third).all()
