"""pyperf's hooks under Accelerate (the docs/integrations.md recipe), 2 Gloo processes launched as under torchrun:
int8 ends within 3% of the run without the hook, and save_state at step 40 -> load_state in fresh processes
continues bit-identically (state.all_ranks() registered for checkpointing)."""
import os

import pytest

pytest.importorskip("accelerate", reason="Accelerate is not installed (requirements-dev.txt installs it for CI)")

import torch  # noqa: E402

from _dist import launch_ranks  # noqa: E402
import _integrations as I  # noqa: E402

STEPS, SAVE_AT = 96, 40          # 16 steps per epoch: the checkpoint is in the middle of the third epoch
ENV = {"ACCELERATE_USE_CPU": "true"}     # what `accelerate launch --cpu` sets


def _body(rank, W, out, phase):
    train = I.recipe("accelerate")["train"]
    xs, ys = I.data()
    ds = torch.utils.data.TensorDataset(xs, ys)
    rec = {}
    if phase == "full":
        for kind in (None, "int8"):
            net = I.mlp()
            losses, state = train(net, ds, kind=kind, steps=STEPS, save_every=SAVE_AT if kind else None,
                                  save_dir=os.path.join(out, "ckpt"))
            rec["plain" if kind is None else kind] = dict(
                losses=losses, eval=I.eval_loss(net), stats=state.stats.as_dict() if state else None,
                params=[p.detach().clone() for p in net.parameters()])
    else:
        net = I.mlp()
        losses, state = train(net, ds, kind="int8", steps=STEPS,
                              resume_from=os.path.join(out, "ckpt", "step_%d" % SAVE_AT))
        rec = dict(losses=losses, stats=state.stats.as_dict(), params=[p.detach().clone() for p in net.parameters()])
    I.record(os.path.join(out, "%s_rank%d.pt" % (phase, rank)), **rec)


def test_accelerate_int8_loss_and_bit_identical_resume(tmp_path):
    out = str(tmp_path)
    launch_ranks(_body, 2, out, "full", env=ENV)
    # written by the main process alone, it holds both ranks' residuals
    sd = torch.load(os.path.join(out, "ckpt", "step_%d" % SAVE_AT, "custom_checkpoint_0.pkl"), weights_only=True)
    assert sd["world_size"] == 2 and [r["rank"] for r in sd["ranks"]] == [0, 1]
    assert not torch.equal(sd["ranks"][0]["residual"], sd["ranks"][1]["residual"])
    launch_ranks(_body, 2, out, "resumed", env=ENV)
    I.check_runs(out, SAVE_AT, STEPS)
