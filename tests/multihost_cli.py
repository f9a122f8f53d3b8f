"""`bart-jax ARGS` as the multi-process CLI test runs it: the real command line, with the global ids of the
examples the data loader reads recorded, so the test can check which process read what.

    python multihost_cli.py OUT_JSON pretrain --config tiny ... distributed.process_id=1

At exit OUT_JSON holds {"<split size>/<shard count>": [example ids read]}.
"""

import atexit
import json
import sys
import threading

from bart_jax.cli import main
from bart_jax.data import loader

_reads: dict[str, set] = {}
_lock = threading.Lock()
_read = loader._ShardReader.__call__


def _recording(self, local_position):
    example_id, record = _read(self, local_position)
    if example_id >= 0:
        with _lock:
            _reads.setdefault(f"{len(self.source)}/{self.process_count}", set()).add(int(example_id))
    return example_id, record


def _write(path):
    with open(path, "w") as f:
        json.dump({k: sorted(v) for k, v in _reads.items()}, f)


if __name__ == "__main__":
    loader._ShardReader.__call__ = _recording
    atexit.register(_write, sys.argv[1])
    sys.exit(main(sys.argv[2:]))
