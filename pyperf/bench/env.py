"""The environment a benchmark ran in; stored in every JSON/CSV record so figures are never separated from it."""
import datetime
import os
import platform
import subprocess

import torch


def source_root():
    """The pyperf source tree this package sits in (with benchmarks/), or None when installed without it."""
    env = os.environ.get("PYPERF_SOURCE_ROOT")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.exists(os.path.join(here, "setup.py")) and os.path.isdir(os.path.join(here, "csrc")) \
        else None


def git_sha(root):
    if root is None:
        return ""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "%s (%d cores)" % (cpu_name(), os.cpu_count() or 0)


def environment(device, threads=None):
    try:
        import pyperf
        version = pyperf.__version__
    except Exception as e:  # the harness still reports torch baselines if _C is missing
        version = "unavailable (%s)" % str(e).split(";")[0]
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "pyperf": version,
        "git_sha": git_sha(source_root()),
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
