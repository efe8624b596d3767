"""Benchmark: content digests for checkpoint manifests (``megatron_cegppo.checkpoint.store``).

For each stdlib hash it prints the throughput (MB/s, 1 MB = 1e6 bytes) and the seconds per GB
(1e9 bytes) on one core, median of ``--repeats``:

  * mem: ``update`` over an in-memory buffer in ``--chunk-mib`` chunks (the hash alone);
  * file: the streaming loop checkpoints use (``readinto`` a reused buffer, ``update`` on a
    memoryview) over a ``--file-mib`` file that was just written, so it is read from the page
    cache (the hash plus the copy out of the cache, no disk);
  * threads: ``--threads`` files hashed at once by a thread pool (hashlib releases the GIL on
    large updates), aggregate MB/s.

Run from the repository root::

    .venv/bin/python benchmarks/checkpoint_digest.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALGORITHMS = ("md5", "sha1", "sha256", "blake2b", "blake2s", "sha512")


def hash_memory(name: str, data: memoryview, chunk: int) -> float:
    h = hashlib.new(name)
    t0 = time.perf_counter()
    for start in range(0, len(data), chunk):
        h.update(data[start:start + chunk])
    h.hexdigest()
    return time.perf_counter() - t0


def hash_file(name: str, path: Path, chunk: int) -> str:
    from megatron_cegppo.checkpoint.store import digest_file

    return digest_file(path, algorithm=name, chunk=chunk)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mem-mib", type=int, default=256)
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()
    chunk = args.chunk_mib << 20
    names = [a for a in args.algorithms.split(",") if a]
    data = memoryview(os.urandom(args.mem_mib << 20))
    print(f"cpu count {os.cpu_count()}, buffer {args.mem_mib} MiB, file {args.file_mib} MiB, "
          f"chunk {args.chunk_mib} MiB, repeats {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(max(1, args.threads)):
            path = Path(tmp) / f"shard_{i}.bin"
            with open(path, "wb") as f:
                for _ in range(args.file_mib // 64 or 1):
                    f.write(os.urandom(min(args.file_mib, 64) << 20))
            files.append(path)
        file_bytes = files[0].stat().st_size
        for name in names:
            hash_memory(name, data[: 16 << 20], chunk)  # warm up
            mem_s = statistics.median(hash_memory(name, data, chunk) for _ in range(args.repeats))
            file_s = timed(lambda: hash_file(name, files[0], chunk), args.repeats)
            with ThreadPoolExecutor(len(files)) as pool:
                par_s = timed(lambda: list(pool.map(lambda p: hash_file(name, p, chunk), files)),
                              args.repeats)
            rows.append((name, len(data) / mem_s / 1e6, file_bytes / file_s / 1e6,
                         len(files) * file_bytes / par_s / 1e6))
    print(f"| hash | mem MB/s | mem s/GB | file MB/s | file s/GB | {args.threads} threads MB/s | {args.threads} threads s/GB |")
    print("|---|---|---|---|---|---|---|")
    for name, mem, file, par in sorted(rows, key=lambda r: -r[2]):
        print(f"| {name} | {mem:.0f} | {1e3 / mem:.2f} | {file:.0f} | {1e3 / file:.2f} | {par:.0f} | {1e3 / par:.2f} |")


if __name__ == "__main__":
    main()
