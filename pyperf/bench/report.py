"""What a run produces: the table on screen, JSON and CSV files, the comparison against a saved run, the PNG."""
import csv
import json
import math

ENV_KEYS = ["device", "device_name", "torch", "cuda", "pyperf", "git_sha", "threads", "python", "date"]
CSV_KEYS = ["group", "case", "impl", "status", "reason", "median_s", "p10_s", "p90_s", "iqr_s", "n_runs", "bytes",
            "gbps", "pct_of_limit", "speedup", "baseline", "rotation_sets", "limit_gbps"] + ENV_KEYS


def fmt_time(s):
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return "%.1f us" % (s * 1e6)
    if s < 1:
        return "%.3f ms" % (s * 1e3)
    return "%.3f s" % s


def _f(x, pat):
    return "-" if x is None else pat % x


def table(records, limit_gbps=None):
    """Plain-text table, one block per case, impls in the case's order."""
    cols = ["case", "impl", "median", "p10-p90", "GB/s", "% limit", "speedup"]
    rows = []
    extra_keys = []
    for r in records:
        for k in r.get("metrics") or {}:
            if k not in extra_keys:
                extra_keys.append(k)
    cols += extra_keys
    last_case = None
    for r in records:
        case = "%s/%s" % (r["group"], r["case"])
        shown = case if case != last_case else ""
        last_case = case
        if r["status"] != "ok":
            rows.append([shown, r["impl"], "skipped: " + r.get("reason", "")[:70]] + [""] * (len(cols) - 3))
            continue
        spread = "%s-%s" % (fmt_time(r.get("p10_s")), fmt_time(r.get("p90_s")))
        sp = r.get("speedup")
        row = [shown, r["impl"], fmt_time(r["median_s"]), spread, _f(r.get("gbps"), "%.1f"),
               _f(r.get("pct_of_limit"), "%.0f%%"),
               "baseline" if r["impl"] == r.get("baseline") else _f(sp, "%.2fx")]
        row += [_fmt_metric((r.get("metrics") or {}).get(k)) for k in extra_keys]
        rows.append(row)
    widths = [max(len(c), *(len(str(row[i])) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    # a skipped row's reason may be long: do not let it widen the median column
    widths[2] = max(len("median"), *(len(row[2]) for row in rows if not row[2].startswith("skipped"))) \
        if any(not row[2].startswith("skipped") for row in rows) else widths[2]
    out = []
    head = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out.append(head)
    out.append("-" * len(head))
    for row in rows:
        if row[0] and len(out) > 2:
            out.append("")
        if str(row[2]).startswith("skipped"):
            out.append("  ".join([str(row[0]).ljust(widths[0]), str(row[1]).ljust(widths[1]), row[2]]))
        else:
            out.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    if limit_gbps:
        out.append("")
        out.append("%% limit = GB/s of the case / %.1f GB/s, the copy bandwidth measured at the start of this run"
                   % limit_gbps)
    return "\n".join(out)


def _fmt_metric(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.4g" % v
    return str(v)


def full_records(records, env, limit_gbps):
    """Each record carries the environment (device, versions, git sha, threads, date) and the measured limit."""
    return [dict(r, limit_gbps=limit_gbps, **{k: env.get(k) for k in ENV_KEYS}) for r in records]


def write_json(path, records, env, limit, problems):
    doc = {"env": env, "limit": limit, "problems": [{"group": g, "module": m, "reason": r} for g, m, r in problems],
           "records": full_records(records, env, limit.get("copy_gbps"))}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def write_csv(path, records, env, limit):
    rows = full_records(records, env, limit.get("copy_gbps"))
    for r in rows:
        for k, v in (r.pop("metrics", None) or {}).items():
            r["metric_" + k] = v
    extra = sorted({k for r in rows for k in r if k not in CSV_KEYS and k != "extra"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS + extra + ["extra"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            r["extra"] = json.dumps(r.get("extra", {}), default=str)
            w.writerow(r)


def compare(records, old_path, threshold=0.10):
    """Ratio new/old median time per (group, case, impl) against a saved JSON run. Returns (text, n_regressions)."""
    with open(old_path) as f:
        old = json.load(f)
    old_env = old.get("env", {})
    prev = {(r["group"], r["case"], r["impl"]): r for r in old.get("records", []) if r.get("status") == "ok"}
    lines = ["compared with %s (%s, %s, git %s)" % (old_path, old_env.get("device_name", "?"),
                                                     old_env.get("date", "?"), old_env.get("git_sha", "?")),
             "%-50s %-26s %12s %12s %8s" % ("case", "impl", "old", "new", "new/old")]
    n_reg = 0
    matched = 0
    for r in records:
        if r["status"] != "ok":
            continue
        o = prev.get((r["group"], r["case"], r["impl"]))
        if o is None:
            continue
        matched += 1
        ratio = r["median_s"] / o["median_s"] if o["median_s"] else float("nan")
        flag = ""
        if ratio > 1 + threshold:
            flag = "  REGRESSION (>%d%% slower)" % round(threshold * 100)
            n_reg += 1
        elif ratio < 1 - threshold:
            flag = "  faster"
        lines.append("%-50s %-26s %12s %12s %7.2fx%s" % (("%s/%s" % (r["group"], r["case"]))[:50], r["impl"][:26],
                                                          fmt_time(o["median_s"]), fmt_time(r["median_s"]), ratio,
                                                          flag))
    if matched == 0:
        lines.append("(no case/impl in common with the saved run)")
    lines.append("%d regression(s) beyond %d%%" % (n_reg, round(threshold * 100)))
    return "\n".join(lines), n_reg


def plot(path, records, env, limit_gbps):
    """Two panels, one row per (case, impl): speedup vs the case's baseline, and % of the measured copy limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    labels = ["%s | %s" % (r["case"][:40], r["impl"][:24]) for r in ok]
    n = max(len(ok), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 1.5 + 0.28 * n), sharey=True,
                                   gridspec_kw={"width_ratios": [1, 1]})
    ys = list(range(len(ok)))[::-1]
    groups = sorted({r["group"] for r in ok})
    cmap = plt.get_cmap("tab10")
    colors = [cmap(groups.index(r["group"]) % 10) for r in ok]
    speed = [r.get("speedup") or 0.0 for r in ok]
    # bars grow from 1x: right = faster than the baseline, left = slower
    bars = ax1.barh(ys, [v - 1.0 if v > 0 else float("nan") for v in speed], left=1.0, color=[c if r["impl"].startswith("pyperf") else (0.7, 0.7, 0.7)
                                      for c, r in zip(colors, ok)])
    ax1.axvline(1.0, color="k", lw=0.8, ls="--")
    pos = [v for v in speed if v > 0]
    if pos:  # log scale: 0.1x and 10x are equally far from 1x
        ax1.set_xscale("log")
        ax1.set_xlim(min(0.5, min(pos) / 1.5), max(2.0, max(pos) * 2.5))
    ax1.set_xlabel("speedup vs the case's baseline (x, log scale, higher is better; grey = baselines)")
    ax1.set_yticks(ys)
    ax1.set_yticklabels(labels, fontsize=7)
    for y, v in zip(ys, speed):
        if v:
            ax1.text(max(v, 1.0), y, " %.2fx" % v, va="center", fontsize=6)
    pct = [r.get("pct_of_limit") or 0.0 for r in ok]
    bars2 = ax2.barh(ys, pct, color=colors)
    ax2.axvline(100.0, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("%% of measured copy bandwidth (%s GB/s)" % ("%.0f" % limit_gbps if limit_gbps else "?"))
    for b, v in zip(bars2, pct):
        if v:
            ax2.text(b.get_width(), b.get_y() + b.get_height() / 2, " %.0f%%" % v, va="center", fontsize=6)
    fig.suptitle("pyperf-bench on %s | torch %s | pyperf %s | git %s | %s" % (
        env.get("device_name"), env.get("torch"), env.get("pyperf"), env.get("git_sha") or "?", env.get("date")),
        fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
