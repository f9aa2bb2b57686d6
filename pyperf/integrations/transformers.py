"""pyperf's DDP comm hooks in the transformers Trainer (docs/integrations.md).

    from pyperf.integrations.transformers import CommHookCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CommHookCallback("int8")])
    trainer.train(resume_from_checkpoint=...)       # every rank's hook state is in each checkpoint-N folder

The Trainer has no comm-hook argument, and it builds its DDP model (through Accelerate) inside train(), after the
callbacks are made; it hands callbacks the unwrapped model only. So the callback finds the Trainer whose train()
is running (the frame of transformers.Trainer.train on the call stack: the Trainer, its DDP model
`model_wrapped`, and the checkpoint it resumes from) when the training begins and when a checkpoint is saved.
"""
import inspect
import os
import sys
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pyperf.integrations._keeper import HookKeeper, KeeperViews, framework_missing

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as _e:
    raise framework_missing("pyperf.integrations.transformers", "transformers", _e) from None

__all__ = ["CommHookCallback"]

FILENAME = "pyperf_comm_hook.pt"


def _running_train():
    """The Trainer whose train() runs this callback, and train()'s `resume_from_checkpoint` and `trial`."""
    code = inspect.unwrap(Trainer.train).__code__
    f = sys._getframe(1)
    try:
        while f is not None:
            if f.f_code is code:
                loc = f.f_locals
                return loc["self"], loc.get("resume_from_checkpoint"), loc.get("trial")
            f = f.f_back
    finally:
        del f                          # a frame reference would keep the whole stack alive
    raise RuntimeError("CommHookCallback: no transformers.Trainer.train() on the call stack; the callback works "
                       "inside Trainer.train() (and subclasses whose train() calls it)")


class CommHookCallback(KeeperViews, TrainerCallback):
    """A TrainerCallback that registers pyperf's `kind` comm hook (allreduce, bf16, fp16, int8, int4, fp8, ...;
    options as for pyperf.hooks.register) on the Trainer's DistributedDataParallel model when training begins, and
    saves every rank's hook state with each Trainer checkpoint (checkpoint-N/pyperf_comm_hook.pt, an AllRanks dict,
    written where the Trainer writes its own files) and restores it on train(resume_from_checkpoint=...): resume is
    bit-identical. A checkpoint without that file (saved before the callback was added) resumes with a warning and
    zero residuals.

    state: the pyperf HookState once training has begun (its .stats), None before.
    A single process started without a launcher has no DDP model: the callback warns and does nothing. FSDP and
    DeepSpeed raise."""

    def __init__(self, kind, **options):
        self._keeper = HookKeeper("CommHookCallback", kind, options,
                                  fresh_hint="to start the hook afresh, delete %s from the checkpoint folder"
                                             % FILENAME)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, resume, _ = _running_train()
        model = trainer.model_wrapped
        if not isinstance(model, DDP):
            if args.world_size > 1:
                raise TypeError("CommHookCallback: pyperf's hooks are DistributedDataParallel comm hooks, but the "
                                "Trainer wrapped the model in %s (FSDP and DeepSpeed are not supported)"
                                % type(model).__name__)
            if args.process_index == 0:
                warnings.warn("CommHookCallback: a single process has no DistributedDataParallel model and no "
                              "gradients to communicate; the %r hook is not registered" % self.kind, stacklevel=2)
            return
        self._keeper.attach(model)
        if resume is True:             # train() resolves True itself; stay correct if that ever moves
            resume = get_last_checkpoint(args.output_dir)
        if resume:
            path = os.path.join(resume, FILENAME)
            if os.path.isfile(path):
                # mmap: each rank pages in its own part only, not every rank's
                self._keeper.load(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            elif args.process_index == 0:
                warnings.warn("CommHookCallback: %s holds no pyperf hook state (%s); the %r hook starts with zero "
                              "residuals, so this resume is not bit-identical" % (resume, FILENAME, self.kind),
                              stacklevel=2)

    def on_save(self, args, state, control, **kwargs):
        if self._keeper.state is None or args.save_only_model:
            return                     # save_only_model: the Trainer keeps nothing to resume from either
        sd = self._keeper.state_dict()  # a collective: the Trainer calls on_save on every process
        if not args.should_save:
            return
        trainer, _, trial = _running_train()
        get_dir = getattr(trainer, "_get_output_dir", None)     # the run's folder (hyperparameter search: a sub-folder)
        run_dir = get_dir(trial=trial) if get_dir is not None else args.output_dir
        folder = os.path.join(run_dir, "%s-%d" % (PREFIX_CHECKPOINT_DIR, state.global_step))
        if not os.path.isdir(folder):
            raise RuntimeError("CommHookCallback: the Trainer's checkpoint folder %s does not exist; cannot save the "
                               "pyperf hook state next to it" % folder)
        torch.save(sd, os.path.join(folder, FILENAME))

    def __repr__(self):
        return "CommHookCallback(%r%s)" % (self.kind, "".join(", %s=%r" % kv for kv in self._keeper.options.items()))
