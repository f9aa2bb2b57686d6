"""A progress bar on stderr: redrawn in place on a terminal, one plain line per item otherwise (logs, CI)."""
import sys
import time


class Progress:
    def __init__(self, total, label="", stream=None, width=28, enabled=True):
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, what="", n=1):
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            fill = int(frac * self.width)
            bar = "#" * fill + "." * (self.width - fill)
            line = "\r%s[%s] %d/%d %3.0f%% %5.1fs eta %5.1fs %s" % (
                self.label, bar, self.done, self.total, 100 * frac, elapsed, eta, what[:60])
            self.stream.write(line.ljust(120)[:120])
        else:
            self.stream.write("%s[%d/%d] %s\n" % (self.label, self.done, self.total, what))
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
