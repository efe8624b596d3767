"""``megatron-cegppo train`` (run by torchrun) whose checkpoint writers, from the second save on,
announce themselves in ``<run_dir>/writing.<pid>`` and then take 3 s: a window in which a test
stops the job while a save is being written."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path


def _slow_writers(run_dir: Path) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    upstream = writer.write_preloaded_data
    saves = [0]
    upstream_multiproc = writer.write_preloaded_data_multiproc

    @functools.wraps(upstream)
    def write(*args, **kwargs):  # runs in a forked writer process
        if saves[0] >= 2:
            (run_dir / f"writing.{os.getpid()}").touch()
            time.sleep(3.0)
        return upstream(*args, **kwargs)

    @functools.wraps(upstream_multiproc)
    def multiproc(*args, **kwargs):  # runs in the rank, once per save
        saves[0] += 1
        return upstream_multiproc(*args, **kwargs)

    writer.write_preloaded_data = staticmethod(write)
    writer.write_preloaded_data_multiproc = staticmethod(multiproc)


if __name__ == "__main__":
    from megatron_cegppo.cli import main

    run_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("trainer.run_dir="))
    _slow_writers(Path(run_dir))
    sys.exit(main(["train", *sys.argv[1:]]))
