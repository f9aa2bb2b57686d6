"""pyperf's DDP comm hooks in Lightning (docs/integrations.md).

    from pyperf.integrations.lightning import CommHook
    hook = CommHook("int8", start_iter=30)
    trainer = L.Trainer(strategy="ddp", callbacks=[hook, ModelCheckpoint(...)])
    trainer.fit(module, loader, ckpt_path=...)      # every rank's hook state is in Lightning's checkpoints
    hook.state.stats

Why a callback and not DDPStrategy(ddp_comm_hook=...): Lightning registers that hook only when the root device is
CUDA (on CPU/Gloo it is skipped without a word), it takes a function and a state object, not pyperf's options, and
the hook state would not be in the checkpoints, which Lightning writes from rank 0 only.
"""
import sys

from torch.nn.parallel import DistributedDataParallel as DDP

from pyperf.integrations._keeper import HookKeeper, KeeperViews, framework_missing

# The unified package (lightning.pytorch) unless only the standalone one (pytorch_lightning) is in use: the base
# class should be the Callback of the package whose Trainer runs it.
if "pytorch_lightning" in sys.modules and "lightning" not in sys.modules:
    import pytorch_lightning as _pl
    from pytorch_lightning.utilities import rank_zero_warn
else:
    try:
        import lightning.pytorch as _pl
        from lightning.pytorch.utilities import rank_zero_warn
    except ImportError as _e:
        try:
            import pytorch_lightning as _pl
            from pytorch_lightning.utilities import rank_zero_warn
        except ImportError:
            raise framework_missing("pyperf.integrations.lightning", "lightning", _e) from None

__all__ = ["CommHook"]


class CommHook(KeeperViews, _pl.Callback):
    """A Lightning Callback that registers pyperf's `kind` comm hook (allreduce, bf16, fp16, int8, int4, fp8, ...;
    options as for pyperf.hooks.register) on the strategy's DistributedDataParallel model at the start of every
    fit, on any device (CPU/Gloo included), and keeps every rank's hook state in Lightning's checkpoints
    (checkpoint["callbacks"]["CommHook"], an AllRanks dict; saving it is a collective, which Lightning's
    checkpointing runs on every rank). `trainer.fit(..., ckpt_path=...)` restores it: resume is bit-identical.

    state: the pyperf HookState once fit has started (its .stats), None before.
    Without a DDP model (one device, strategy "auto") the callback warns and does nothing. Other distributed
    strategies (FSDP, DeepSpeed) raise."""

    def __init__(self, kind, **options):
        self._keeper = HookKeeper("CommHook", kind, options,
                                  fresh_hint="to start the hook afresh, delete checkpoint['callbacks'][%r] from the "
                                             "checkpoint file" % self.state_key)

    def on_fit_start(self, trainer, pl_module):
        strategy = trainer.strategy
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError("CommHook: the DDPStrategy has its own ddp_comm_hook too; DDP takes one comm hook per "
                             "model: drop DDPStrategy(ddp_comm_hook=...) or this callback")
        model = strategy.model
        if isinstance(model, DDP):
            self._keeper.attach(model)
        elif trainer.world_size > 1:
            raise TypeError("CommHook: pyperf's hooks are DistributedDataParallel comm hooks, but the %s strategy "
                            "wraps the model in %s; use strategy='ddp'" % (type(strategy).__name__,
                                                                         type(model).__name__))
        else:
            rank_zero_warn("CommHook: a single process has no DistributedDataParallel model and no gradients to "
                           "communicate; the %r hook is not registered" % self.kind)

    def state_dict(self):
        return self._keeper.state_dict()

    def load_state_dict(self, state_dict):
        self._keeper.load(state_dict)

    def __repr__(self):
        return "CommHook(%r%s)" % (self.kind, "".join(", %s=%r" % kv for kv in self._keeper.options.items()))
