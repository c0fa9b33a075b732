"""Distributed fault script for the launcher tests: init the CPU cluster, then misbehave.

Usage: python rank_fault.py MODE OUT_DIR
  exit: rank 1 calls ``os._exit(3)`` right after init; the other ranks wait (as if in a collective).
  hold: every rank writes ``OUT_DIR/pid_<rank>`` and waits, so a test can kill one of them.
Ranks that wait give up after 300 s, long after any test has stopped them.
"""
import os
import sys
import time

import mindspore as ms
from mindspore.communication import get_rank, init


def main():
    mode, out_dir = sys.argv[1], sys.argv[2]
    ms.set_context(device_target="CPU")
    init()
    rank = get_rank()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"pid_{rank}"), "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    print(f"rank {rank} initialised, mode {mode}", flush=True)
    if mode == "exit" and rank == 1:
        os._exit(3)  # pylint: disable=protected-access
    time.sleep(300)


if __name__ == "__main__":
    main()
