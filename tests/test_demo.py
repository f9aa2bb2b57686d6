"""The training demo (examples/train_gpt_ddp.py) on 2 real Gloo ranks: every hook trains a few steps, and a
resumed run is bit-identical to an uninterrupted one (model, optimizer, every rank's hook state)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

DEMO = os.path.join(ROOT, "examples", "train_gpt_ddp.py")
TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "2",
        "--data-bytes", str(1 << 20), "--threads", "1"]


def _run(args, timeout=300):
    r = subprocess.run([sys.executable, DEMO] + TINY + args, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, "demo failed (rc %d):\n%s\n%s" % (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def _demo_module():
    spec = importlib.util.spec_from_file_location("train_gpt_ddp", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_hook_trains_and_compare_reports(tmp_path):
    """One 2-rank launch trains every pyperf hook and torch's baselines in turn (--compare), with pyperf's fused
    layers and selective checkpointing; the table, the JSON and the loss-curve PNG come out."""
    demo = _demo_module()
    hooks = demo.HOOKS + demo.TORCH_HOOKS
    j, png = tmp_path / "r.json", tmp_path / "loss.png"
    out = _run(["--compare", "--hooks", ",".join(hooks), "--steps", "3", "--fused", "--checkpoint", "selective",
                "--json", str(j), "--plot", str(png)])
    assert "final loss" in out and "vs fp32" in out
    res = {r["hook"]: r for r in json.loads(j.read_text())["results"]}
    assert set(res) == set(hooks)
    for h, r in res.items():
        assert len(r["losses"]) == 3 and all(l == l and 0 < l < 10 for l in r["losses"]), (h, r["losses"])
        assert r["median_step_s"] > 0
    ratio = {h: res[h]["bytes_per_step"] / res[h]["fp32_bytes_per_step"] for h in demo.HOOKS}
    assert ratio["allreduce"] == pytest.approx(1.0, rel=0.05)
    assert ratio["bf16"] == pytest.approx(0.5, rel=0.05) and ratio["fp16"] == pytest.approx(0.5, rel=0.05)
    assert ratio["int4"] < ratio["int8"] < 0.5 and ratio["fp8"] < 0.5
    # the same seeds and data: the first step's loss (before any update) is the same for every hook
    first = {h: r["losses"][0] for h, r in res.items()}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load(p):
    return torch.load(p, map_location="cpu", weights_only=False)


def _assert_equal(a, b, path=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if str(k).endswith("time_s"):  # wall-clock counters in the hook stats
                continue
            _assert_equal(a[k], b[k], "%s.%s" % (path, k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, "%s[%d]" % (path, i))
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


@pytest.mark.parametrize("hook", ["int8"])
def test_resume_is_bit_identical(hook, tmp_path):
    """6 steps straight == 3 steps, save, resume, 3 more: model, optimizer, hook state (error-feedback residuals
    of both ranks), data position and losses all bit-identical."""
    a, b, c = (str(tmp_path / n) for n in ("a.pt", "b.pt", "c.pt"))
    common = ["--hook", hook, "--steps", "6", "--quiet"]
    _run(common + ["--save", a])
    _run(common + ["--stop-at", "3", "--save", b])
    assert _load(b)["step"] == 3
    _run(common + ["--resume", b, "--save", c])
    ca, cc = _load(a), _load(c)
    assert cc["step"] == 6 and cc["data_pos"] == ca["data_pos"]
    _assert_equal(ca["model"], cc["model"], "model")
    _assert_equal(ca["optim"]["state"], cc["optim"]["state"], "optim")
    _assert_equal(ca["losses"], cc["losses"], "losses")
    _assert_equal(ca["hook_state"], cc["hook_state"], "hook_state")
    assert len(ca["hook_state"]) == 2 and all(s is not None for s in ca["hook_state"])


def test_bad_arguments_are_reported(tmp_path):
    demo = _demo_module()
    with pytest.raises(SystemExit):
        demo.parse_args(["--hook", "int3"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--resume", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        demo.parse_args(["--compare", "--save", "x.pt"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--d-model", "30", "--heads", "4"])


def test_corpus_is_the_standard_library():
    demo = _demo_module()
    data = demo.load_corpus(1 << 18)
    assert data.dtype == torch.long and len(data) == 1 << 18 and int(data.max()) < 256
    assert b"import" in bytes(data[:1 << 16].to(torch.uint8).tolist())
    bt = demo.Batches(data, 16, 3, rank=1, world_size=2, seed=0)
    x, y = bt.next()
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1]) and bt.pos == 6
