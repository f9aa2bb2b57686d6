"""Every rank's state in one checkpointable object: `state.all_ranks()`.

Training frameworks checkpoint an object by calling its `state_dict()` on every process and writing only the main
process's result (Accelerate's `register_for_checkpointing`, Lightning's callback states, the transformers
Trainer's files). A pyperf hook state is per rank (each rank's error-feedback residuals are its own), so every rank
but the main one would lose its part. `AllRanks(state).state_dict()` is a collective that gathers every rank's
`state.state_dict()` and returns the same dict on every rank; whichever process writes it, the file holds them all,
and `load_state_dict(sd)` on each rank restores that rank's part.

    accelerator.register_for_checkpointing(state.all_ranks())     # any object with state_dict/load_state_dict:
    AllRanks(obj, process_group)                                    #   a state class adds all_ranks() in one line

Cost: the dict holds world_size per-rank states (for the DDP hooks, about 4 bytes per parameter each) in CPU memory
on every rank while it is being saved; see docs/integrations.md.
"""
import collections

import torch
import torch.distributed as dist

FORMAT = "pyperf.all_ranks"
VERSION = 1


def _to_cpu(obj):
    """A copy of a nested dict/list/tuple whose tensors are on the CPU: a rank's CUDA tensors must not be unpickled
    onto another rank's device by all_gather_object, nor pin a checkpoint to the device it was saved from."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        # other dict subclasses (defaultdict: its first argument is a factory) come back as plain dicts
        items = [(k, _to_cpu(v)) for k, v in obj.items()]
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):           # a namedtuple takes its fields as arguments
        return type(obj)(*(_to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class AllRanks:
    """Every rank's state of `state` (any object with state_dict() and load_state_dict()) as one checkpointable
    object.

    state_dict(): a collective over `process_group` (default: the default group); call it on every rank. Returns
        {"format": "pyperf.all_ranks", "version": 1, "state_type": ..., "world_size": W, "ranks": [sd_0, ...]},
        the same on every rank, tensors on the CPU.
    load_state_dict(sd): restores this rank's entry (not a collective). Raises ValueError when sd is not such a
        dict, holds another type of state, or was saved by another number of ranks; the wrapped state's own
        load_state_dict checks the rest (for the DDP hooks: kind, options, the model's parameters).
    Without an initialized process group it is a world of one rank."""

    def __init__(self, state, process_group=None):
        if not (callable(getattr(state, "state_dict", None)) and callable(getattr(state, "load_state_dict", None))):
            raise TypeError("state: expected an object with state_dict() and load_state_dict() methods, got %s"
                            % type(state).__name__)
        self.state = state
        self.process_group = process_group

    def _rank_and_size(self):
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise RuntimeError("AllRanks: a process_group was given but torch.distributed is not initialized")
            return 0, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return dist.get_rank(group), dist.get_world_size(group)

    def state_dict(self):
        rank, world = self._rank_and_size()
        mine = _to_cpu(self.state.state_dict())
        if world == 1:
            ranks = [mine]
        else:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine, group=self.process_group)
        return {"format": FORMAT, "version": VERSION, "state_type": type(self.state).__name__, "world_size": world,
                "ranks": ranks}

    def load_state_dict(self, state_dict):
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            keys = sorted(map(str, sd))[:8] if isinstance(sd, dict) else None
            raise ValueError("AllRanks.load_state_dict: expected the dict that AllRanks.state_dict() returns (every "
                             "rank's state, format %r), got %s; a single rank's state loads with "
                             "state.load_state_dict() instead"
                             % (FORMAT, "a dict with keys %s" % keys if keys is not None else type(sd).__name__))
        if sd.get("version") != VERSION:
            raise ValueError("AllRanks.load_state_dict: format version %r is not supported (this pyperf reads "
                             "version %d)" % (sd.get("version"), VERSION))
        want = type(self.state).__name__
        if sd["state_type"] != want:
            raise ValueError("AllRanks.load_state_dict: the checkpoint holds a %s, this is a %s"
                             % (sd["state_type"], want))
        rank, world = self._rank_and_size()
        saved = sd["world_size"]
        if saved != world or len(sd["ranks"]) != saved:
            raise ValueError(
                "AllRanks.load_state_dict: the checkpoint holds the %s of %d ranks, this run has %d. Each rank's "
                "state (error-feedback residuals) is its own and cannot be split or merged onto another number of "
                "ranks: resume with %d ranks, or leave this state out of the checkpoint you load (it then starts "
                "fresh: zero residuals, counters at 0)" % (want, saved, world, saved))
        self.state.load_state_dict(sd["ranks"][rank])

    def __repr__(self):
        return "AllRanks(%s)" % type(self.state).__name__
