"""The images archive's zstd compressor keeps `bundle lock`/`bundle build` under the 150 MiB
peak-RSS bound whatever the machine (issue 19's scale run): zstd's default multithreaded jobs
held ~50 MiB per worker on incompressible layers, one worker per core."""

from __future__ import annotations

import subprocess
import sys

import zstandard

from bundler.build.resolve.images import (
    ZSTD_JOB,
    ZSTD_MAX_WORKERS,
    compression_params,
    compressor,
)

# Streams argv[2] MiB of incompressible bytes through the compressor; prints the growth of the
# process's peak RSS (KiB) over what it held before compressing.
_PROBE = """
import os, sys
from bundler.build.resolve.images import compressor
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = hwm()
with open(os.devnull, "wb") as out, compressor(int(sys.argv[1])).stream_writer(
        out, closefd=False) as zw:
    for _ in range(int(sys.argv[2])):
        zw.write(os.urandom(1 << 20))
print(hwm() - before)
"""


def test_the_compressor_bounds_its_workers_and_jobs() -> None:
    for cpus, workers in ((1, 1), (2, 2), (4, 4), (64, ZSTD_MAX_WORKERS)):
        params = compression_params(cpus)
        assert (params.threads, params.job_size) == (workers, ZSTD_JOB)
        assert params.compression_level == 3 and params.write_checksum == 1
    data = bytes(range(256)) * 4096
    assert zstandard.ZstdDecompressor().decompress(compressor(64).compress(data)) == data


def test_the_compressors_memory_stays_bounded_on_incompressible_data() -> None:
    """With as many workers as it may use, 96 MiB in: ~63 MiB more than before compressing
    (measured; zstd's default jobs at the same 4 workers: ~124 MiB more)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(ZSTD_MAX_WORKERS), "96"],
                          capture_output=True, text=True, check=True, timeout=120)
    grown_mib = int(done.stdout) / 1024
    assert grown_mib < 90, grown_mib
