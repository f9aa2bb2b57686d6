"""pyperf.integrations.transformers.CommHookCallback (the docs/integrations.md recipe), 2 Gloo processes launched as
under torchrun: int8 ends within 3% of the run without the hook, the Trainer's checkpoint of step 40 (mid-epoch)
resumed with resume_from_checkpoint= in fresh processes continues bit-identically; the same checkpoint without the
hook's file resumes with a warning and is not bit-identical (the residuals matter); bad arguments are refused."""
import os
import shutil

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (requirements-dev.txt installs it)")
pytest.importorskip("accelerate", reason="the Trainer needs Accelerate (requirements-dev.txt installs it)")

import torch  # noqa: E402

from _dist import launch_ranks  # noqa: E402
import _integrations as I  # noqa: E402

STEPS, SAVE_AT = 96, 40          # 16 steps per epoch: the checkpoint is in the middle of the third epoch
ENV = {"ACCELERATE_USE_CPU": "true"}
ARGS_KW = dict(disable_tqdm=True, logging_strategy="no")


class _Regression(torch.nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = I.mlp()
        self.losses = []

    def forward(self, x, labels):
        loss = torch.nn.functional.mse_loss(self.net(x), labels)
        self.losses.append(loss.item())
        return {"loss": loss}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.xs, self.ys = I.data()

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return {"x": self.xs[i], "labels": self.ys[i]}


def _body(rank, W, out, phase):
    train = I.recipe("transformers")["train"]
    ds = _Pairs()
    rec = {}
    if phase == "full":
        for kind in (None, "int8"):
            m = _Regression()
            state = train(m, ds, kind=kind, steps=STEPS, save_steps=SAVE_AT,
                          output_dir=os.path.join(out, "run" if kind else "plain"), **ARGS_KW)
            rec["plain" if kind is None else kind] = dict(
                losses=m.losses, eval=I.eval_loss(m.net), stats=state.stats.as_dict() if state else None,
                params=[p.detach().clone() for p in m.net.parameters()])
    else:
        # the same checkpoint without the hook's file: a warning, zero residuals, other losses
        m = _Regression()
        ckpt = os.path.join(out, "nohook", "checkpoint-%d" % SAVE_AT)
        if rank == 0:
            with pytest.warns(UserWarning, match="holds no pyperf hook state.*not bit-identical"):
                train(m, ds, kind="int8", steps=STEPS, output_dir=os.path.join(out, "nohook"), resume_from=ckpt,
                      **ARGS_KW)
        else:
            train(m, ds, kind="int8", steps=STEPS, output_dir=os.path.join(out, "nohook"), resume_from=ckpt,
                  **ARGS_KW)
        without = m.losses
        m = _Regression()
        state = train(m, ds, kind="int8", steps=STEPS, output_dir=os.path.join(out, "run"),
                      resume_from=os.path.join(out, "run", "checkpoint-%d" % SAVE_AT), **ARGS_KW)
        assert len(without) == len(m.losses) and without != m.losses
        rec = dict(losses=m.losses, stats=state.stats.as_dict(),
                   params=[p.detach().clone() for p in m.net.parameters()])
    I.record(os.path.join(out, "%s_rank%d.pt" % (phase, rank)), **rec)


def test_transformers_int8_loss_and_bit_identical_resume(tmp_path):
    out = str(tmp_path)
    launch_ranks(_body, 2, out, "full", env=ENV)
    ckpt = os.path.join(out, "run", "checkpoint-%d" % SAVE_AT)
    # written next to the Trainer's own files by the process that writes them; both ranks' states inside
    sd = torch.load(os.path.join(ckpt, "pyperf_comm_hook.pt"), weights_only=True)
    assert sd["world_size"] == 2 and [r["rank"] for r in sd["ranks"]] == [0, 1] and sd["ranks"][1]["iter"] == SAVE_AT
    shutil.copytree(ckpt, os.path.join(out, "nohook", "checkpoint-%d" % SAVE_AT))
    os.remove(os.path.join(out, "nohook", "checkpoint-%d" % SAVE_AT, "pyperf_comm_hook.pt"))
    launch_ranks(_body, 2, out, "resumed", env=ENV)
    I.check_runs(out, SAVE_AT, STEPS)


def test_transformers_callback_arguments():
    from pyperf.integrations.transformers import CommHookCallback
    cb = CommHookCallback("fp8", error_feedback=False)
    assert cb.kind == "fp8" and cb.options == dict(error_feedback=False) and cb.state is None
    with pytest.raises(ValueError, match="CommHookCallback: kind: expected one of"):
        CommHookCallback("int3")
    with pytest.raises(TypeError, match="CommHookCallback: unknown option.* blocksize"):
        CommHookCallback("int8", blocksize=64)
    with pytest.raises(RuntimeError, match="no transformers.Trainer.train.. on the call stack"):
        cb.on_train_begin(None, None, None)


def _body_single(rank, W, out):
    train = I.recipe("transformers")["train"]
    with pytest.warns(UserWarning, match="CommHookCallback: a single process has no DistributedDataParallel model"):
        state = train(_Regression(), _Pairs(), kind="int8", steps=2, output_dir=out, **ARGS_KW)
    assert state is None


def test_transformers_single_process_warns(tmp_path):
    launch_ranks(_body_single, 1, str(tmp_path), env=ENV, as_torchrun=False)
