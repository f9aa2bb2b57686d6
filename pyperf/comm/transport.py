"""Moving equal rows between the ranks of a group at the link's rate, on Gloo too.

Gloo sends each peer's part of a collective (all_to_all_single, all_gather_into_tensor) as one message over its TCP
pair, and a single message of a few megabytes does not fill the link: on the project VM, 2 ranks over a veth pair
shaped to 1 Gbit/s (benchmarks/netns_bandwidth.py's topology, 2026-12-05), all_to_all_single of 6.4 MB per rank ran at
~490 Mbit/s and all_gather_into_tensor at ~640 Mbit/s, while the same bytes as 1 MB isend/irecv messages, all posted
before the first wait, ran at 930-950 Mbit/s (and faster with no limit: 25.5 MB in 24 ms against 45 ms). So on Gloo the
rows go as point-to-point messages of CHUNK_BYTES; other backends (NCCL pipelines its own) keep the collective.

These are collectives: every rank of the group makes the same calls in the same order. Each call's messages get
tags no other call of the group uses (a per-group counter that advances alike on every rank), so a pair's messages
match one to one even while an earlier asynchronous call is still in flight.
"""
import torch.distributed as dist

CHUNK_BYTES = 1 << 20
_TAG_SPACE = 1 << 30
_next_tag = {}      # group name -> the next unused tag


class RowsWork(dist.Work):
    """The messages of an asynchronous exchange: wait() returns when all of them have arrived. A torch.distributed
    Work, so that code which waits on the Works it is handed (FSDP's all-gather) waits on this one."""

    def __init__(self, works):
        super().__init__()
        self._works = works

    def wait(self, timeout=None):
        works, self._works = self._works, []
        for w in works:
            w.wait()
        return True

    def is_completed(self):
        return all(w.is_completed() for w in self._works)


def _pipelined(group):
    return dist.get_backend(group) == "gloo"


def _spans(n, elem_bytes):
    step = max(1, CHUNK_BYTES // max(1, elem_bytes))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _check_rows(name, t, W):
    if t.dim() != 2 or t.size(0) != W or not t.is_contiguous():
        raise ValueError("%s: expected a contiguous [world_size=%d, n] tensor, got shape %s%s"
                         % (name, W, tuple(t.shape), "" if t.is_contiguous() else " (not contiguous)"))


def all_to_all_rows(recv, send, group=None, async_op=False):
    """recv[s] = send[me] of rank s, for every rank s of the group: all_to_all_single of equal rows.

    send and recv: contiguous [world_size, n] tensors of one dtype. On Gloo, as CHUNK_BYTES point-to-point messages.
    async_op: return a Work to wait on (None when the exchange is complete on return); recv is undefined until then,
    and send must not change.
    """
    group = group or dist.group.WORLD
    W, me = dist.get_world_size(group), dist.get_rank(group)
    _check_rows("send", send, W)
    _check_rows("recv", recv, W)
    if send.shape != recv.shape or send.dtype != recv.dtype:
        raise ValueError("recv: expected the shape and dtype of send %s %s, got %s %s"
                         % (tuple(send.shape), send.dtype, tuple(recv.shape), recv.dtype))
    if not _pipelined(group):
        return dist.all_to_all_single(recv.view(-1), send.view(-1), group=group, async_op=async_op)
    recv[me].copy_(send[me])
    work = RowsWork(_post([(p, send[p], recv[p]) for p in _peers(W, me)], group, send.element_size()))
    if async_op:
        return work
    work.wait()
    return None


def all_gather_rows(out, inp, group=None, async_op=False):
    """out[s] = inp of rank s: all_gather_into_tensor into a contiguous [world_size, n] out from an n-element inp.
    On Gloo, as CHUNK_BYTES point-to-point messages (each rank sends its row to every peer: the bytes of a ring).
    async_op: return a Work to wait on (None when the exchange is complete on return); out is undefined until then,
    and inp must not change."""
    group = group or dist.group.WORLD
    W, me = dist.get_world_size(group), dist.get_rank(group)
    _check_rows("out", out, W)
    flat = inp.reshape(-1)
    if flat.numel() != out.size(1) or inp.dtype != out.dtype:
        raise ValueError("inp: expected %d elements of %s (a row of out), got %d of %s"
                         % (out.size(1), out.dtype, flat.numel(), inp.dtype))
    if not _pipelined(group):
        return dist.all_gather_into_tensor(out.view(-1), flat.contiguous(), group=group, async_op=async_op)
    if out[me].data_ptr() != flat.data_ptr():
        out[me].copy_(flat)
    works = _post([(p, out[me], out[p]) for p in _peers(W, me)], group, out.element_size())
    if async_op:
        return RowsWork(works)
    RowsWork(works).wait()
    return None


def _peers(W, me):
    """Peers in the order (me + 1, me + 2, ...): every rank sends to a different one at each position."""
    return [(me + i) % W for i in range(1, W)]


def _tags(group, count):
    """`count` tags for one call, unused by the group's other calls (the counter advances alike on every rank)."""
    key = getattr(group, "group_name", None) or id(group)
    base = _next_tag.get(key, 0)
    _next_tag[key] = (base + count) % _TAG_SPACE
    return [(base + c) % _TAG_SPACE for c in range(count)]


def _post(pairs, group, elem_bytes):
    """Post every message of one exchange; returns their Works. pairs: (peer, what to send it, where its message
    lands), all of one length: the row for peer p goes to p, p's row for us lands in the third."""
    if not pairs:
        return []
    spans = _spans(pairs[0][1].numel(), elem_bytes)
    tags = _tags(group, len(spans))
    works = []
    for (a, b), tag in zip(spans, tags):
        for p, s, r in pairs:
            peer = p if group is dist.group.WORLD else dist.get_global_rank(group, p)
            works.append(dist.irecv(r[a:b], src=peer, group=group, tag=tag))
            works.append(dist.isend(s[a:b], dst=peer, group=group, tag=tag))
    return works
