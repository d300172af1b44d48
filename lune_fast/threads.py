"""How many CPU threads to run: --threads, else LUNE_FAST_THREADS, else OMP_NUM_THREADS (torch's own reading),
else the cores no other process is using.

Measured on 2 cores (RESULTS.md section 5, "A small or busy machine"): `lune-fast demo` took 11.4-12.9 s idle
with 2 threads; with one core kept busy by another process, 156 s with 2 threads that sleep while they wait
(OMP_WAIT_POLICY PASSIVE), 36 s with 2 spinning ones (OpenMP's default) and 15 s with 1; beside a 2-thread torch
job, 40 s, 30 s and 18.5 s. Every parallel region waits for its slowest thread, and a thread that shares its
core with a busy process is slow. So the default counts the cores other processes kept busy while the command
started (torch loading: about a second) and leaves them out.
"""
from __future__ import annotations

import math
import os
import sys
import time

# a core counts as taken when other processes used more than this share of it
BUSY_SHARE = 0.25


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of every core together, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_ticks() -> int:
    """This process's user + system clock ticks (its own threads)."""
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class Sample:
    """Start at the beginning of the command; `spare()` after torch has loaded (at least `window` seconds
    later) says how many of the cores the others left free. `auto` is off where the count is not the command's
    to choose: OMP_NUM_THREADS is set (by the user, or by torchrun: one thread a rank), or torch was imported
    before the command started (main() called from a program or a test, whose threads are its own)."""

    def __init__(self, window: float = 0.1):
        self.window, self.t0 = window, time.monotonic()
        self.auto = "OMP_NUM_THREADS" not in os.environ and "torch" not in sys.modules
        self.cpu0, self.own0 = _cpu_ticks(), _own_ticks()

    def spare(self, cores: int) -> int:
        left = self.window - (time.monotonic() - self.t0)
        if left > 0:
            time.sleep(left)
        cpu1 = _cpu_ticks()
        if self.cpu0 is None or cpu1 is None or cpu1[1] <= self.cpu0[1]:
            return cores
        return spare_cores(cores, cpu1[0] - self.cpu0[0], cpu1[1] - self.cpu0[1], _own_ticks() - self.own0)


def spare_cores(cores: int, busy: int, total: int, own: int) -> int:
    """Cores minus those other processes kept busy: `busy` and `total` ticks of all cores over the window, `own`
    the ticks of this process in it. At least one."""
    others = max(0.0, (busy - own) / total * cores)
    return max(1, cores - math.ceil(others - BUSY_SHARE))


def configure(n: int | None, sample: Sample | None) -> int:
    """Set torch's thread count: n if given, else the spare cores (never more than torch's own default).
    Returns the count in force."""
    import torch

    if n is None and sample is not None and sample.auto:
        n = min(torch.get_num_threads(), sample.spare(os.cpu_count() or 1))
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
