"""A soak run: mixed load with faults through a gateway on loopback, watching its footprint.

    python -m tlsgate.loadtest soak [--minutes 10] [--workers 2] [--clients 4]

It builds what ``loadtest loopback`` builds (nginx origin with a test CA, ``tlsgate run``,
all on 127.0.0.1, torn down on exit), then runs client processes doing a mix of new
connections, keep-alive requests and faults (clients that reset mid-stream, CONNECTs to a
name that cannot resolve), and samples the descriptors and RSS of the supervisor and of
every worker every ``--interval`` seconds.

Criterion (per process and per measure: descriptors, RSS): the first quarter of the run is
warm-up and is not judged. Over the rest, the least-squares slope, projected over that part,
must stay below the tolerance (RSS: ``max(2 MiB, 5 %)`` of the post-warm-up level;
descriptors: 4), and the final value must be within the same tolerance of the first
post-warm-up sample (the median of the first three, against noise). A worker that was
replaced (new PID) fails the run too: the soak has no fault that should kill one. The run
fails (exit 1, one line per breach) otherwise, or when the load itself failed (errors
beyond the injected faults).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WARMUP_SHARE = 0.25
RSS_TOLERANCE_BYTES = 2 * 1024 * 1024
RSS_TOLERANCE_SHARE = 0.05
FD_TOLERANCE = 4


@dataclass(frozen=True)
class ProcessSample:
    """One process's open descriptors and resident memory."""

    pid: int
    fds: int
    rss_bytes: int


def sample_process(pid: int) -> ProcessSample:
    """Read /proc/PID: descriptors in fd/, RSS from statm (pages)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcessSample(pid, fds, rss_pages * PAGE_SIZE)
