"""pyperf.integrations.lightning.CommHook (the docs/integrations.md recipe), 2 Gloo processes launched as under
torchrun: int8 ends within 3% of the run without the hook, the checkpoint of epoch 3 (step 48) resumed with
ckpt_path= in fresh processes continues bit-identically, resuming it on 4 processes fails with a clear error, and
bad arguments are refused when the callback is made."""
import glob
import os

import pytest

pytest.importorskip("lightning", reason="Lightning is not installed (requirements-dev.txt installs it for CI)")

import torch  # noqa: E402

from _dist import launch_ranks  # noqa: E402
import _integrations as I  # noqa: E402

EPOCHS, STEPS_PER_EPOCH, RESUME_EPOCH = 6, 16, 2      # resume from the end of the 3rd epoch: step 48
TRAINER_KW = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def _module():
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = I.mlp()
            self.losses = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Regression()


def _ckpt(out):
    return glob.glob(os.path.join(out, "ckpt", "epoch=%d-step=*.ckpt" % RESUME_EPOCH))[0]


def _body(rank, W, out, phase):
    train = I.recipe("lightning")["train"]
    ds = torch.utils.data.TensorDataset(*I.data())
    rec = {}
    if phase == "full":
        for kind in (None, "int8"):
            m = _module()
            state = train(m, ds, kind=kind, epochs=EPOCHS, save_dir=os.path.join(out, "ckpt" if kind else "plain"),
                          devices=W, **TRAINER_KW)
            rec["plain" if kind is None else kind] = dict(
                losses=m.losses, eval=I.eval_loss(m.net), stats=state.stats.as_dict() if state else None,
                params=[p.detach().clone() for p in m.net.parameters()])
    elif phase == "resumed":
        m = _module()
        state = train(m, ds, kind="int8", epochs=EPOCHS, save_dir=os.path.join(out, "resumed"), resume_from=_ckpt(out),
                      devices=W, **TRAINER_KW)
        rec = dict(losses=m.losses, stats=state.stats.as_dict(),
                   params=[p.detach().clone() for p in m.net.parameters()])
    else:                           # 4 ranks resume the 2-rank checkpoint
        with pytest.raises(ValueError, match=r"CommHook: cannot restore the hook state from the checkpoint: .*"
                                             r"HookState of 2 ranks, this run has 4.*delete checkpoint\['callbacks'\]"
                                             r"\['CommHook'\]"):
            train(_module(), ds, kind="int8", epochs=EPOCHS, save_dir=os.path.join(out, "four"),
                  resume_from=_ckpt(out), devices=W, **TRAINER_KW)
        return
    I.record(os.path.join(out, "%s_rank%d.pt" % (phase, rank)), **rec)


def test_lightning_int8_loss_bit_identical_resume_and_world_size_check(tmp_path):
    out = str(tmp_path)
    launch_ranks(_body, 2, out, "full")
    # rank 0 wrote the checkpoint; the callback's entry holds both ranks' states
    sd = torch.load(_ckpt(out), weights_only=True)["callbacks"]["CommHook"]
    assert sd["world_size"] == 2 and [r["rank"] for r in sd["ranks"]] == [0, 1]
    assert sd["ranks"][0]["iter"] == (RESUME_EPOCH + 1) * STEPS_PER_EPOCH
    launch_ranks(_body, 2, out, "resumed")
    I.check_runs(out, (RESUME_EPOCH + 1) * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH)
    launch_ranks(_body, 4, out, "four")


def test_lightning_comm_hook_arguments():
    from pyperf.integrations.lightning import CommHook
    hook = CommHook("int4", block_size=128, start_iter=10)
    assert hook.kind == "int4" and hook.options == dict(block_size=128, start_iter=10) and hook.state is None
    assert hook.state_dict() == {}          # nothing registered yet: no collective, nothing saved
    with pytest.raises(ValueError, match="CommHook: kind: expected one of allreduce, bf16"):
        CommHook("int3")
    with pytest.raises(TypeError, match="CommHook: unknown option.* blocksize"):
        CommHook("int8", blocksize=64)


def _body_single(rank, W, out):
    import lightning as L

    from pyperf.integrations.lightning import CommHook
    hook = CommHook("int8")
    trainer = L.Trainer(max_epochs=1, callbacks=[hook], default_root_dir=out, **TRAINER_KW)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*I.data(64)), batch_size=16)
    with pytest.warns(UserWarning, match="CommHook: a single process has no DistributedDataParallel model"):
        trainer.fit(_module(), loader)
    assert hook.state is None and hook.state_dict() == {}


def test_lightning_single_process_warns(tmp_path):
    launch_ranks(_body_single, 1, str(tmp_path), as_torchrun=False)
