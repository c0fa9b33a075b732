"""Distributed smoke test: init the cluster on CPU, AllReduce the rank id, write a result file.

Run by the launchers' tests with 2 ranks. Writes ``<out_dir>/rank_<rank>.json`` with the rank, the
world size, the launcher's RANK_ID/DEVICE_ID/RANK_SIZE/RANK_TABLE_FILE and the AllReduce sum.
Usage: python allreduce_check.py OUT_DIR
"""
import json
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.communication import get_group_size, get_rank, init


def main():
    out_dir = sys.argv[1]
    ms.set_context(device_target="CPU")
    init()
    rank = get_rank()
    world = get_group_size()
    total = ops.AllReduce()(ms.Tensor(np.array([float(rank)], np.float32))).asnumpy()
    os.makedirs(out_dir, exist_ok=True)
    record = {"rank": rank, "world": world, "sum": float(total[0]),
              "env": {key: os.getenv(key) for key in ("RANK_ID", "DEVICE_ID", "RANK_SIZE", "RANK_TABLE_FILE")},
              "cwd": os.getcwd()}
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    print(f"rank {rank}/{world}: allreduce sum {float(total[0])}", flush=True)


if __name__ == "__main__":
    main()
