"""What the framework adapters share: the hook a callback keeps across the framework's runs (registered on the DDP
model the framework builds, a loaded checkpoint waiting for it, the state carried into a new DDP wrapper)."""
import warnings

from pyperf.comm.hooks import KINDS, OPTIONS


def framework_missing(module, package, error):
    return ImportError("%s needs %s, which is not installed (%s): pip install %s. pyperf itself does not depend on it."
                       % (module, package, error, package))


class KeeperViews:
    """The read-only views a callback holding a HookKeeper in `self._keeper` gives its users."""

    @property
    def kind(self):
        return self._keeper.kind

    @property
    def options(self):
        return dict(self._keeper.options)

    @property
    def state(self):
        return self._keeper.state


class HookKeeper:
    """Owns one pyperf hook for a framework callback.

    attach(ddp): registers the hook on `ddp` (or keeps the one already there if it is ours), then restores a state
        that load() received before the model existed, or else carries over the state of the DDP model of a
        previous run of the same callback (a second fit()/train() builds a new wrapper).
    state_dict() / load(sd): every rank's state (AllRanks); load applies at once if the hook exists, else waits."""

    def __init__(self, owner, kind, options, fresh_hint=""):
        if kind not in KINDS:
            raise ValueError("%s: kind: expected one of %s, got %r" % (owner, ", ".join(KINDS), kind))
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError("%s: unknown option(s) %s (expected some of %s)"
                            % (owner, ", ".join(unknown), ", ".join(OPTIONS)))
        self.owner, self.kind, self.options = owner, kind, dict(options)
        self.fresh_hint = fresh_hint   # how to leave the hook state out of this framework's checkpoint
        self.state = None          # the HookState once registered
        self.pending = None        # an AllRanks dict loaded before the hook existed

    def attach(self, ddp):
        from pyperf import hooks
        existing = getattr(ddp, "_pyperf_hook_state", None)
        if existing is not None:
            if existing is not self.state:
                raise RuntimeError("%s: this DDP model already has a pyperf %r hook registered by other code; DDP "
                                   "takes one comm hook per model" % (self.owner, existing.kind))
        else:
            previous, self.state = self.state, hooks.register(ddp, self.kind, **self.options)
            if self.pending is None and previous is not None:
                try:
                    self.state.load_state_dict(previous.state_dict())
                except ValueError as e:
                    warnings.warn("%s: the hook state of the previous run does not fit this model (%s); starting "
                                  "with zero residuals" % (self.owner, e), stacklevel=3)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._load(pending)
        return self.state

    def _load(self, sd):
        try:
            self.state.all_ranks().load_state_dict(sd)
        except ValueError as e:
            raise ValueError("%s: cannot restore the hook state from the checkpoint: %s%s"
                             % (self.owner, e, " (%s)" % self.fresh_hint if self.fresh_hint else "")) from None

    def state_dict(self):
        """A collective when the hook exists (every rank must call it); {} or the not yet applied dict otherwise."""
        if self.state is None:
            return self.pending if self.pending is not None else {}
        return self.state.all_ranks().state_dict()

    def load(self, sd):
        if self.state is None:
            self.pending = sd
        else:
            self._load(sd)
