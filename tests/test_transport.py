"""pyperf.comm.transport on real Gloo ranks: the point-to-point exchanges give exactly what all_to_all_single and
all_gather_into_tensor give, for every dtype, empty, single-element and odd rows, messages cut at odd sizes, on a
subgroup, with asynchronous all-gathers still in flight while other exchanges run; bad shapes are refused."""
import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks

DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64)


def _rows(rank, W, n, dtype, salt):
    g = torch.Generator().manual_seed(7919 * rank + salt)
    x = torch.randn(W, n, generator=g, dtype=torch.float64) * 100
    return x.to(dtype) if dtype.is_floating_point else x.abs().to(dtype)


def _body_exact(rank, W):
    from pyperf.comm import transport
    saved = transport.CHUNK_BYTES
    try:
        for chunk in (saved, 64, 6):          # whole rows, many messages, messages that split elements' runs oddly
            transport.CHUNK_BYTES = chunk
            for dtype in DTYPES:
                for n in (0, 1, 7, 1031):
                    send = _rows(rank, W, n, dtype, n)
                    ref = torch.empty_like(send)
                    dist.all_to_all_single(ref.view(-1), send.view(-1))
                    got = torch.full_like(send, 77)          # poison: an unwritten element shows
                    transport.all_to_all_rows(got, send)
                    assert torch.equal(got, ref), (chunk, dtype, n)

                    row = send[0].clone()
                    ref = torch.empty(W, n, dtype=dtype)
                    dist.all_gather_into_tensor(ref.view(-1), row)
                    got = torch.full_like(ref, 77)
                    transport.all_gather_rows(got, row)
                    assert torch.equal(got, ref), (chunk, dtype, n)
                    # in place, as FSDP calls it: the input is this rank's row of the output
                    got = torch.full_like(ref, 77)
                    got[rank].copy_(row)
                    transport.all_gather_rows(got, got[rank])
                    assert torch.equal(got, ref), (chunk, dtype, n)
    finally:
        transport.CHUNK_BYTES = saved


def _body_async(rank, W):
    """Asynchronous all-gathers left in flight while other exchanges run: each message lands where it belongs."""
    from pyperf.comm import transport
    saved = transport.CHUNK_BYTES
    transport.CHUNK_BYTES = 256
    try:
        rows = [_rows(rank, W, n, torch.float32, 100 + n)[0].clone() for n in (300, 301, 5)]
        outs = [torch.full((W, r.numel()), float("nan")) for r in rows]
        works = [transport.all_gather_rows(o, r, async_op=True) for o, r in zip(outs[:2], rows[:2])]
        assert all(isinstance(w, dist.Work) for w in works)
        send = _rows(rank, W, 999, torch.uint8, 3)
        got = torch.empty_like(send)
        transport.all_to_all_rows(got, send)          # synchronous, between the two pending all-gathers' messages
        works.append(transport.all_gather_rows(outs[2], rows[2], async_op=True))
        for w in reversed(works):
            w.wait()
        for o, r in zip(outs, rows):
            ref = torch.empty_like(o)
            dist.all_gather_into_tensor(ref.view(-1), r)
            assert torch.equal(o, ref)
        ref = torch.empty_like(send)
        dist.all_to_all_single(ref.view(-1), send.view(-1))
        assert torch.equal(got, ref)
    finally:
        transport.CHUNK_BYTES = saved


def _body_subgroup(rank, W):
    """Ranks 1 and 3 of 4 as their own group: peers are addressed by their global ranks."""
    from pyperf.comm import transport
    sub = dist.new_group([1, 3])
    if rank in (1, 3):
        me = dist.get_rank(sub)
        send = _rows(rank, 2, 513, torch.float32, 9)
        got = torch.empty_like(send)
        transport.all_to_all_rows(got, send, group=sub)
        ref = torch.empty_like(send)
        dist.all_to_all_single(ref.view(-1), send.view(-1), group=sub)
        assert torch.equal(got, ref)
        out = torch.empty(2, 513)
        transport.all_gather_rows(out, send[me], group=sub)
        assert torch.equal(out[me], send[me])
    dist.barrier()
    dist.destroy_process_group(sub)


def _body_errors(rank, W):
    from pyperf.comm import transport
    with pytest.raises(ValueError, match="send: expected a contiguous"):
        transport.all_to_all_rows(torch.empty(W, 4), torch.empty(W + 1, 4))
    with pytest.raises(ValueError, match="send: expected a contiguous"):
        transport.all_to_all_rows(torch.empty(W, 4), torch.empty(4, W).t())
    with pytest.raises(ValueError, match="recv: expected the shape and dtype"):
        transport.all_to_all_rows(torch.empty(W, 4, dtype=torch.float16), torch.empty(W, 4))
    with pytest.raises(ValueError, match="inp: expected 4 elements"):
        transport.all_gather_rows(torch.empty(W, 4), torch.empty(5))


def _all(rank, W, bodies):
    for b in bodies:
        b(rank, W)


def test_transport_2_ranks():
    run_ranks(_all, 2, [_body_exact, _body_async, _body_errors])


def test_transport_4_ranks():
    run_ranks(_all, 4, [_body_exact, _body_async, _body_subgroup])
