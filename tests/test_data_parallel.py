"""Data-parallel finetune on CPU through the launchers equals single-process training.

Two ranks with batch b each must follow the same loss curve and end with the same weights as one
process with batch 2b on the same data. Two facts make the runs comparable exactly:

* MindRecord sharding with ``shuffle: False`` is interleaved (rank r reads rows r, r+2, ...), so
  global step t of the 2-rank run sees the same 2b rows as step t of the 1-process run;
* every row is fully labelled (no padding, no ignored label), so both ranks count the same number of
  tokens and the mean of their gradients is the gradient of the 1-process mean loss.

All runs start from the same converted checkpoint (``ms.set_seed`` alone does not give identical
initial weights across ranks).
"""
import os
import signal
import socket
import subprocess

import numpy as np
import pytest
from mindspore.mindrecord import FileWriter

from model_fixtures import tiny_pair
from run_helpers import (ROOT, RUN_SCRIPT, PYTHON, write_config, run_baichuan2, parse_losses, last_checkpoint,
                         load_params)

SEQ = 32
LAUNCHERS = os.path.join(ROOT, "research")


def _synthetic_dataset(folder, rows=16, vocab=4000):
    """Fully labelled records: labels == input_ids, no pad token anywhere."""
    os.makedirs(folder)
    rng = np.random.RandomState(0)
    writer = FileWriter(os.path.join(folder, "dp.mindrecord"), shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}},
                      "dp")
    records = []
    for _ in range(rows):
        ids = rng.randint(3, vocab, size=SEQ + 1).astype(np.int32)
        records.append({"input_ids": ids, "labels": ids.copy()})
    writer.write_raw_data(records)
    writer.commit()
    return folder


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script, cwd, command, table, rank_range, env):
    # The launcher's scheduler runs `python` from PATH: the environment that has MindSpore goes first.
    env = dict(env, PATH=os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", ""))
    return subprocess.Popen(["bash", os.path.join(LAUNCHERS, script), command, table, rank_range, "2"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(procs, timeout=900):
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return outputs


def _rank_losses(cwd, rank):
    with open(os.path.join(cwd, "output", "log", f"rank_{rank}", "mindformer.log"), encoding="utf-8") as f:
        return parse_losses(f.read())


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    _, _, init_ckpt = tiny_pair("7b", str(tmp / "init"))
    data = _synthetic_dataset(str(tmp / "data"))
    edit = lambda cfg: cfg["train_dataset"]["data_loader"].update(shuffle=False)  # noqa: E731
    single_cfg = write_config(tmp / "single.yaml", "7b", seq_length=SEQ, epochs=2, batch_size=4, edit=edit)
    dp_cfg = write_config(tmp / "dp.yaml", "7b", seq_length=SEQ, epochs=2, batch_size=2, edit=edit)
    res = run_baichuan2(["--config", single_cfg, "--run_mode", "finetune", "--train_data", data,
                         "--load_checkpoint", init_ckpt, "--output_dir", tmp / "single"], cwd=tmp)
    assert res.returncode == 0, res.tail()
    losses = parse_losses(res.output)
    assert len(losses) == 8                                   # 16 rows / batch 4 x 2 epochs
    table = tmp / "rank_table.json"
    table.write_text("{}")                                    # must exist; the CPU cluster does not read it
    return {"tmp": tmp, "data": data, "init": init_ckpt, "dp_cfg": dp_cfg, "table": str(table),
            "losses": losses, "weights": load_params(last_checkpoint(tmp / "single"))}


def _dp_command(run, output_dir):
    return (f"{PYTHON} {RUN_SCRIPT} --config {run['dp_cfg']} --run_mode finetune --use_parallel True --dp 2 "
            f"--train_data {run['data']} --load_checkpoint {run['init']} --output_dir {output_dir} "
            "--device_target CPU")


def _check_same_as_single(run, cwd, output_dir, outputs):
    rank_losses = [_rank_losses(cwd, r) for r in (0, 1)]
    assert all(len(l) == len(run["losses"]) for l in rank_losses), (rank_losses, outputs)
    np.testing.assert_allclose(np.mean(rank_losses, axis=0), run["losses"], rtol=1e-4)
    for rank in (0, 1):
        weights = load_params(last_checkpoint(output_dir, rank=rank))
        for name, value in run["weights"].items():
            if name.startswith("model.") or name.startswith("lm_head."):
                np.testing.assert_allclose(weights[name], value, atol=2e-5, rtol=1e-4, err_msg=name)


def test_two_ranks_single_node_equal_one_process_with_double_batch(single_process_run):
    run = single_process_run
    cwd = run["tmp"] / "singlenode"
    cwd.mkdir()
    env = dict(os.environ, MF_LAUNCH_BACKEND="msrun", MS_SCHED_PORT=str(_free_port()), GLOG_v="3")
    proc = _launch("run_singlenode.sh", cwd, _dp_command(run, cwd / "out"), run["table"], "[0,2]", env)
    outputs = _wait([proc])
    assert proc.returncode == 0, outputs[0][-3000:]
    _check_same_as_single(run, cwd, cwd / "out", outputs)


def test_two_nodes_on_loopback_equal_one_process_with_double_batch(single_process_run):
    run = single_process_run
    cwd = run["tmp"] / "multinode"
    cwd.mkdir()
    env = dict(os.environ, MF_LAUNCH_BACKEND="msrun", MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=str(_free_port()),
               GLOG_v="3")
    command = _dp_command(run, cwd / "out")
    procs = [_launch("run_multinode.sh", cwd, command, run["table"], "[0,1]", env),
             _launch("run_multinode.sh", cwd, command, run["table"], "[1,2]", env)]
    outputs = _wait(procs)
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outputs]
    _check_same_as_single(run, cwd, cwd / "out", outputs)


def test_auto_trans_ckpt_on_cpu_cuts_each_rank_its_checkpoint(single_process_run):
    """auto_trans_ckpt without strategy files (CPU): each rank gets its layout cut from the complete ckpt."""
    run = single_process_run
    cwd = run["tmp"] / "autotrans"
    cwd.mkdir()
    env = dict(os.environ, MF_LAUNCH_BACKEND="msrun", MS_SCHED_PORT=str(_free_port()), GLOG_v="3")
    command = _dp_command(run, cwd / "out") + " --auto_trans_ckpt True"
    proc = _launch("run_singlenode.sh", cwd, command, run["table"], "[0,2]", env)
    outputs = _wait([proc])
    assert proc.returncode == 0, outputs[0][-3000:]
    for rank in (0, 1):
        cut = cwd / "out" / "transformed_checkpoint" / "ms_7b" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        assert cut.is_file(), sorted(str(p) for p in (cwd / "out").rglob("*.ckpt"))
    _check_same_as_single(run, cwd, cwd / "out", outputs)
