"""Registers, shared memory, stack frame and spills of every CUDA kernel of pyperf, from ptxas itself.

    python scripts/cuda_resources.py [--arch sm_90] [--log build.log] [--out table.txt] [csrc/cuda/X.cu ...]

Prints one row per kernel and exits 1 if any kernel spills registers or has a stack frame: the kernels keep their
working set in registers by design (a spill moves it to local memory, i.e. through L1/L2, on every access). The
figures come from `--log`, the output of a build with PYPERF_PTXAS_VERBOSE=1 (`make build` keeps it), for the .cu
files that build compiled; the others are compiled here (`nvcc -cubin -Xptxas -v`, device code only, setup.py's
flags).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import sources  # noqa: E402

_FUNC = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse(text):
    """ptxas -v output -> [(mangled kernel, arch, frame, spill stores, spill loads, registers, static smem)]."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "frame": 0, "st": 0, "ld": 0, "regs": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["frame"], cur["st"], cur["ld"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
            cur = None
    return rows


def from_log(path, arch):
    """{.cu path: rows} for the sources a logged build compiled: each nvcc command line is followed by its output."""
    if not os.path.exists(path):
        return {}
    out, cur, text = {}, None, []
    cmd = re.compile(r"nvcc .* -c (\S+\.cu) ")

    def flush():
        if cur is not None:
            rows = [r for r in parse("\n".join(text)) if r["arch"] == arch]
            if rows:
                out[os.path.abspath(cur)] = rows
    for line in open(path, errors="replace"):
        m = cmd.search(line)
        if m:
            flush()
            cur, text = m.group(1), []
        elif cur is not None:
            text.append(line)
    flush()
    return out


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def short(name, width=110):
    name = re.sub(r"pyperf::\(anonymous namespace\)::|pyperf::|c10::|\(anonymous namespace\)::", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--log", help="a build log with ptxas -v output (PYPERF_PTXAS_VERBOSE=1)")
    ap.add_argument("--executed", help="the kernels the SIMT emulation ran (PYPERF_EMU_COVERAGE's file): fail if a "
                    "compiled kernel never ran there")
    ap.add_argument("files", nargs="*", help="only these .cu files (default: all of csrc/cuda)")
    args = ap.parse_args(argv)
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as setup.py: torch would guess /usr/local from a symlink
    from torch.utils import cpp_extension
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        print("cuda_resources: no nvcc at %s: skipped (set CUDA_HOME)" % nvcc)
        return 0
    incs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "build", "generated")]
    incs += cpp_extension.include_paths(device_type="cuda") if "device_type" in \
        cpp_extension.include_paths.__code__.co_varnames else cpp_extension.include_paths(cuda=True)
    rows = []
    logged = from_log(args.log, args.arch) if args.log else {}
    for cu in [os.path.abspath(f) for f in args.files] or sources.cuda_sources():
        if cu in logged:
            got = logged[cu]
            for r in got:
                r["file"] = os.path.basename(cu)
            rows += got
            print("cuda_resources: %s: %d kernels (from %s)" % (os.path.relpath(cu, ROOT), len(got), args.log))
            continue
        t0 = time.time()
        cmd = [nvcc, "-cubin", "-o", os.devnull, "-arch=" + args.arch, "-O3", "-std=c++20",
               "--expt-relaxed-constexpr", "-DPYPERF_WITH_CUDA=1", "-Xptxas", "-v", cu] + ["-I" + i for i in incs]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout + p.stderr)
            print("cuda_resources: nvcc failed on %s" % cu)
            return 1
        got = parse(p.stdout + p.stderr)
        for r in got:
            r["file"] = os.path.basename(cu)
        rows += got
        print("cuda_resources: %s: %d kernels (%.0f s)" % (os.path.relpath(cu, ROOT), len(got), time.time() - t0),
              flush=True)
    names = demangle([r["name"] for r in rows])
    lines = ["%-14s %4s %6s %6s %6s %6s  %s" % ("file", "regs", "smem", "frame", "spillS", "spillL", "kernel")]
    bad = []
    for r, n in sorted(zip(rows, names), key=lambda rn: (rn[0]["file"], rn[1])):
        lines.append("%-14s %4d %6d %6d %6d %6d  %s" % (r["file"], r["regs"], r["smem"], r["frame"], r["st"], r["ld"],
                                                       short(n)))
        if r["frame"] or r["st"] or r["ld"]:
            bad.append(short(n))
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if not rows:
        print("cuda_resources: ptxas reported no kernels (did -Xptxas -v change its output?)")
        return 1
    if bad:
        print("cuda_resources: %d kernel(s) spill or have a stack frame:\n  %s" % (len(bad), "\n  ".join(bad)))
        return 1
    print("cuda_resources: %d kernels, none spills or has a stack frame (%s)" % (len(rows), args.arch))
    if args.executed:
        compiled = {_key_demangled(n): short(n) for n in names}
        ran = {_key_pretty(line.strip()) for line in open(args.executed) if line.strip()}
        missing = sorted(v for k, v in compiled.items() if k not in ran)
        print("cuda_resources: %d of the %d compiled kernels ran under the SIMT emulation (%s)"
              % (len(compiled) - len(missing), len(compiled), args.executed))
        if missing:
            print("cuda_resources: never run by the tests under the emulation:\n  %s" % "\n  ".join(missing))
            return 1
    return 0


def _norm_arg(a):
    a = re.sub(r"pyperf::|\{anonymous\}::|\(anonymous namespace\)::|c10::|at::|mta::|quant::", "", a)
    return a.replace(" ", "").replace("true", "1").replace("false", "0")


def _split_args(a):
    out, depth, cur = [], 0, ""
    for ch in a:
        depth += ch in "<(" and 1 or (-1 if ch in ">)" else 0)
        if ch == "," and depth == 0:
            out.append(_norm_arg(cur))
            cur = ""
        else:
            cur += ch
    return out + [_norm_arg(cur)] if a else []


def _key_demangled(name):
    """(kernel, template args) of a c++filt name: void quantize_kernel<0, 1, XSrc<float, 4> >(...)."""
    m = re.match(r"(?:void )?(?:\w+::|\(anonymous namespace\)::)*(\w+)(?:<(.*)>)?\(", name)
    return (m.group(1), tuple(_split_args(m.group(2) or ""))) if m else (name, ())


def _key_pretty(name):
    """The same from GCC's __PRETTY_FUNCTION__ (the emulation's names): void ns::kernel(...) [with int F = 0; ...];
    the typedefs GCC appends (int64_t = long int, ...) are not template arguments."""
    m = re.match(r"(?:void )?(?:[\w:{} ]*::)?(\w+)\(.*?\)(?: \[with (.*)\])?$", name)
    if not m:
        return (name, ())
    args = []
    for part in (m.group(2) or "").split("; ") if m.group(2) else []:
        k, v = part.split(" = ", 1)
        if not re.search(r"_t$|::|<", k.split()[-1]):
            args.append(_norm_arg(v))
    return (m.group(1), tuple(args))


if __name__ == "__main__":
    sys.exit(main())
