"""pyperf-bench harness: a synthetic case through the whole CLI (JSON/CSV/PNG, skipped impls, --compare), the
timing helpers, every benchmarks/bench_X.py module once at a tiny size, and the netns benchmark's set-up."""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT

from pyperf.bench import report, runner, timing
from pyperf.bench.__main__ import main, parse_size
from pyperf.bench.case import Case
from pyperf.bench.progress import Progress

SYNTH = textwrap.dedent('''
    import torch
    from pyperf.bench import Case

    def cases(device, dtype, quick):
        dtype = dtype or torch.float32
        n = 4099
        def setup():
            x = torch.randn(n, device=device, dtype=dtype)
            return x, torch.empty_like(x)
        def broken(inp):
            raise RuntimeError("torch.compile is not available here")
        return [Case(group="synth", name="scale n=%d" % n, setup=setup,
                     impls={"pyperf_mul": lambda i: torch.mul(i[0], 2.0, out=i[1]),
                            "torch_eager": lambda i: i[1].copy_(i[0] * 2.0),
                            "torch_compile": broken},
                     bytes=2 * n * 4, extra={"n": n},
                     measure=lambda impl, i: {"out_elems": i[1].numel()})]
''')

ENV_FIELDS = ("device_name", "torch", "cuda", "pyperf", "git_sha", "threads", "date")


@pytest.fixture
def synth(tmp_path):
    p = tmp_path / "bench_synth.py"
    p.write_text(SYNTH)
    return str(p)


def test_synthetic_case_end_to_end(synth, tmp_path, capsys):
    j, c, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = main([synth, "--device", "cpu", "--quick", "--json", str(j), "--csv", str(c), "--plot", str(png),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "measured copy bandwidth" in out and "baseline" in out and "skipped: RuntimeError" in out

    doc = json.loads(j.read_text())
    assert doc["limit"]["copy_gbps"] > 0
    recs = {r["impl"]: r for r in doc["records"]}
    assert set(recs) == {"pyperf_mul", "torch_eager", "torch_compile"}
    for r in recs.values():
        for k in ENV_FIELDS:
            assert k in r, k
    ok = recs["pyperf_mul"]
    assert ok["status"] == "ok" and ok["median_s"] > 0 and ok["p10_s"] <= ok["median_s"] <= ok["p90_s"]
    assert ok["gbps"] > 0 and ok["pct_of_limit"] > 0 and ok["speedup"] > 0 and ok["baseline"] == "torch_eager"
    assert ok["metrics"] == {"out_elems": 4099}
    assert recs["torch_eager"]["speedup"] == pytest.approx(1.0)
    assert ok["rotation_sets"] > 1  # 32 kB inputs rotate past the cache
    sk = recs["torch_compile"]
    assert sk["status"] == "skipped" and "torch.compile is not available" in sk["reason"]

    rows = list(csv.DictReader(io.StringIO(c.read_text())))
    assert len(rows) == 3 and all(r["torch"] == torch.__version__ for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # compare against itself: no regression; against a run twice as fast: every ok impl flagged
    assert main([synth, "--device", "cpu", "--once", "--compare", str(j), "--no-progress"]) == 0
    fast = dict(doc)
    fast["records"] = [dict(r, median_s=r["median_s"] / 1000) if r["status"] == "ok" else r for r in doc["records"]]
    fj = tmp_path / "fast.json"
    fj.write_text(json.dumps(fast))
    capsys.readouterr()
    rc = main([synth, "--device", "cpu", "--once", "--compare", str(fj), "--fail-on-regression", "--no-progress"])
    assert rc == 1
    assert "2 regression(s)" in capsys.readouterr().out


def test_compare_text_and_ratio(tmp_path):
    old = {"env": {}, "records": [{"group": "g", "case": "c", "impl": "a", "status": "ok", "median_s": 1.0},
                                  {"group": "g", "case": "c", "impl": "b", "status": "ok", "median_s": 1.0}]}
    p = tmp_path / "old.json"
    p.write_text(json.dumps(old))
    new = [{"group": "g", "case": "c", "impl": "a", "status": "ok", "median_s": 1.05},
           {"group": "g", "case": "c", "impl": "b", "status": "ok", "median_s": 1.5}]
    text, n = report.compare(new, str(p), threshold=0.10)
    assert n == 1 and "REGRESSION" in text and "1.50x" in text


def test_timing_helpers():
    assert timing.rotation_count(0, 32 << 20) == 2
    assert timing.rotation_count(1 << 30, 32 << 20) == 1
    n = timing.rotation_count(1 << 20, 32 << 20)
    assert n * (1 << 20) > 2 * (32 << 20) or n == 64  # capped at max_sets
    assert timing.rotation_count(4 << 20, 32 << 20) * (4 << 20) > 2 * (32 << 20)
    s = timing._summary([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median_s"] == 3.0 and s["p10_s"] == pytest.approx(1.4) and s["p90_s"] == pytest.approx(4.6)
    assert s["iqr_s"] == pytest.approx(2.0) and s["n_runs"] == 5
    assert timing.cache_bytes("cpu") > 0
    r = timing.time_cpu(lambda x: x.add_(1), [torch.zeros(16)], warmup=1, blocks=3, budget_s=0.01, threads=1)
    assert r["median_s"] > 0 and r["n_runs"] >= 3
    lim = timing.measure_copy_bandwidth("cpu", quick=True)
    assert lim["copy_gbps"] > 0
    assert parse_size("16M") == 16 << 20 and parse_size("1k") == 1024 and parse_size("100") == 100


def test_progress_plain_text():
    buf = io.StringIO()
    p = Progress(2, label="x ", stream=buf)
    p.update("a")
    p.update("b")
    p.close()
    assert buf.getvalue() == "x [1/2] a\nx [2/2] b\n"


def test_setup_failure_and_baseline_missing():
    def bad_setup():
        raise MemoryError("too big")

    c = Case(group="g", name="n", setup=bad_setup, impls={"pyperf_x": lambda i: None, "torch_x": lambda i: None})
    recs = runner.run_case(c, "cpu", 10.0, once=True, llc=1 << 20)
    assert [r["status"] for r in recs] == ["skipped", "skipped"] and "too big" in recs[0]["reason"]
    c = Case(group="g", name="n", setup=lambda: torch.zeros(4), impls={"pyperf_x": lambda i: i.add_(1)})
    (r,) = runner.run_case(c, "cpu", 10.0, once=True, llc=1 << 20)
    assert r["status"] == "ok" and "speedup" not in r and r["baseline"] is None
    assert "pyperf_x" in report.table([r])


def test_unknown_group_and_missing_source_tree(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="unknown group"):
        main(["nosuchgroup", "--device", "cpu"])
    monkeypatch.setenv("PYPERF_SOURCE_ROOT", str(tmp_path))  # a "source tree" without benchmarks/
    assert main(["pack", "--device", "cpu"]) == 2
    assert "installed without it" in capsys.readouterr().err


BENCH_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_")
                     and f.endswith(".py"))


@pytest.mark.parametrize("fname", BENCH_FILES)
def test_every_benchmark_module_runs_once(fname, tmp_path):
    """Each case of benchmarks/bench_X.py, every impl called once at the quick size on CPU: valid JSON, and an impl
    that cannot run here is reported as skipped with a reason (never a crash). torch.compile baselines are left
    out: compiling them on 2 CPU cores takes minutes (they run in the real benchmark)."""
    j, c, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    rc = main([os.path.join(ROOT, "benchmarks", fname), "--device", "cpu", "--quick", "--once", "--json", str(j),
               "--csv", str(c), "--plot", str(png), "--no-progress", "--skip-impl", "compile"])
    assert rc == 0
    assert len(list(csv.DictReader(io.StringIO(c.read_text())))) == len(json.loads(j.read_text())["records"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(j.read_text())
    assert not doc["problems"], doc["problems"]
    assert doc["records"], "no cases"
    for r in doc["records"]:
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert r["reason"]
    assert any(r["status"] == "ok" and r["impl"].startswith("pyperf") for r in doc["records"]), \
        [(r["impl"], r.get("reason")) for r in doc["records"]]


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pyperf.bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--compare" in out.stdout and "--plot" in out.stdout


# --------------------------------------------------------------------------------------- netns bandwidth benchmark
def _netns_module():
    spec = importlib.util.spec_from_file_location("netns_bandwidth", os.path.join(ROOT, "benchmarks",
                                                                                  "netns_bandwidth.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_netns_topology_setup_and_cleanup():
    nb = _netns_module()
    why = nb.missing_requirements()
    if why:
        pytest.skip("netns benchmark: " + why)
    topo = nb.Topology(2, tag="pt%d" % (os.getpid() % 10000))
    try:
        try:
            topo.create()
        except RuntimeError as e:
            pytest.skip("cannot create network namespaces here: %s" % e)
        topo.set_rate(1.0)
        qd = subprocess.run(topo.exec_prefix(0) + ["tc", "qdisc", "show", "dev", topo.rank_if[0]],
                            capture_output=True, text=True).stdout
        assert "tbf" in qd and "1Gbit" in qd
        # a TCP round trip from rank 1's namespace to rank 0's address, through the bridge
        server_code = "\n".join([
            "import socket",
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)",
            "s.bind(('%s', 29411)); s.listen(1); print('ready', flush=True)" % topo.addrs[0],
            "c, _ = s.accept(); c.sendall(c.recv(16)[::-1]); c.close()"])
        client_code = "\n".join([
            "import socket",
            "c = socket.create_connection(('%s', 29411), timeout=20)" % topo.addrs[0],
            "c.sendall(b'abc'); print(c.recv(16).decode())"])
        server = subprocess.Popen(topo.exec_prefix(0) + [sys.executable, "-c", server_code], stdout=subprocess.PIPE,
                                  text=True)
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run(topo.exec_prefix(1) + [sys.executable, "-c", client_code], capture_output=True,
                                text=True, timeout=60)
        server.wait(timeout=30)
        assert client.stdout.strip() == "cba", client.stderr
        topo.set_rate(None)
    finally:
        topo.destroy()
    assert topo.exists() == []


def test_netns_skips_cleanly_without_requirements(monkeypatch, capsys):
    nb = _netns_module()
    monkeypatch.setattr(nb, "missing_requirements", lambda: "needs root (test)")
    assert nb.main(["--rates", "1"]) == 0
    assert "skipped: needs root (test)" in capsys.readouterr().out
