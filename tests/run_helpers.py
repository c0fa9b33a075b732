"""Helpers for tests that drive the Baichuan2 command lines in subprocesses.

MindSpore's context is process-global, so every training/eval/predict run is a fresh process.
Typical use::

    data = make_dataset(tmp / "data", seq_length=32, num_records=40)       # 10 batches of 4
    cfg = write_config(tmp / "c.yaml", "7b", seq_length=32, epochs=3)
    res = run_baichuan2(["--config", cfg, "--run_mode", "finetune", "--train_data", data,
                         "--output_dir", tmp / "out"], cwd=tmp)
    assert res.returncode == 0, res.tail()
    losses = parse_losses(res.output)
    ckpt = last_checkpoint(tmp / "out")

Everything here is independent of pytest.
"""
import copy
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
ASSETS = os.path.join(PLUGIN, "assets")
TOKENIZER = os.path.join(ASSETS, "tokenizer.model")
BELLE_SAMPLE = os.path.join(ASSETS, "belle_sample.json")
PYTHON = sys.executable
RUN_SCRIPT = os.path.join(PLUGIN, "run_baichuan2.py")
MERGE_SCRIPT = os.path.join(PLUGIN, "merge_lora.py")
TINY_YAMLS = {"7b": os.path.join(PLUGIN, "run_baichuan2_7b_cpu_tiny.yaml"),
              "13b": os.path.join(PLUGIN, "run_baichuan2_13b_cpu_tiny.yaml")}

_LOSS_RE = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[\s*([-+0-9.eE]+|nan|inf)/")
_PPL_RE = re.compile(r"Perplexity: (\{.*\})")


# ----- data --------------------------------------------------------------------------------
def make_dataset(out_dir, seq_length=32, num_records=None, start=0, source=BELLE_SAMPLE):
    """MindRecord folder made by ``belle_preprocess.py`` (in this process) from the bundled sample.

    ``num_records`` conversations from index ``start`` (all by default); records are
    ``seq_length + 1`` tokens. Returns the folder (str).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(source, encoding="utf-8") as handle:
        conversations = json.load(handle)
    end = None if num_records is None else start + num_records
    subset = os.path.join(out_dir, f".conversations-{os.getpid()}.json")
    with open(subset, "w", encoding="utf-8") as handle:
        json.dump(conversations[start:end], handle, ensure_ascii=False)
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    import belle_preprocess  # pylint: disable=import-outside-toplevel
    try:
        belle_preprocess.main(["--input_glob", subset, "--model_file", TOKENIZER, "--seq_length", str(seq_length),
                               "--output_file", os.path.join(out_dir, f"belle_{seq_length}.mindrecord")])
    finally:
        os.remove(subset)
    return out_dir


def read_records(data_dir):
    """``(input_ids, labels)`` int arrays (N, seq_length + 1) of every record of a MindRecord folder, in order."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from mindspore.mindrecord import FileReader  # pylint: disable=import-outside-toplevel
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                   if not f.endswith(".db") and os.path.isfile(os.path.join(data_dir, f + ".db")))
    ids, labels = [], []
    for file in files:
        reader = FileReader(file, num_consumer=1)
        for row in reader.get_next():
            ids.append(np.asarray(row["input_ids"]).reshape(-1))
            labels.append(np.asarray(row["labels"]).reshape(-1))
        reader.close()
    return np.stack(ids), np.stack(labels)


# ----- configs -----------------------------------------------------------------------------
def load_yaml(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def write_config(path, kind="7b", seq_length=32, epochs=1, batch_size=None, shuffle=None, stop_step=None,
                 pet_config=None, save_trainable_params=None, save_checkpoint_steps=None, base=None, edit=None):
    """A copy of the tiny ``kind`` yaml (or of ``base``) with test-sized settings; returns the path (str).

    ``stop_step`` adds MindFormers' ``TrainCallBack`` (stops after that many steps of this run and
    saves a checkpoint); ``pet_config`` a dict such as ``{"pet_type": "lora", "lora_rank": 2, ...}``;
    ``save_trainable_params`` goes to the checkpoint callback; ``edit(cfg_dict)`` may change the rest.
    The tokenizer path is made absolute so that the yaml works from any folder.
    """
    cfg = copy.deepcopy(load_yaml(base or TINY_YAMLS[kind]))
    model_config = cfg["model"]["model_config"]
    model_config["seq_length"] = seq_length
    cfg["runner_config"]["epochs"] = epochs
    if batch_size is not None:
        cfg["runner_config"]["batch_size"] = batch_size
        cfg["train_dataset"]["batch_size"] = batch_size
        cfg["eval_dataset"]["batch_size"] = batch_size
    if shuffle is not None:
        cfg["train_dataset"]["data_loader"]["shuffle"] = shuffle
    if pet_config is not None:
        model_config["pet_config"] = dict(pet_config)
    for callback in cfg["callbacks"]:
        if callback["type"] in ("CheckpointMointor", "CheckpointMonitor"):
            if save_trainable_params is not None:
                callback["save_trainable_params"] = save_trainable_params
            if save_checkpoint_steps is not None:
                callback["save_checkpoint_steps"] = save_checkpoint_steps
    if stop_step is not None:
        cfg["callbacks"].append({"type": "TrainCallBack", "stop_step": int(stop_step)})
    cfg["processor"]["tokenizer"]["vocab_file"] = TOKENIZER
    for section in ("train_dataset_task", "eval_dataset_task"):      # keep the yaml anchors' meaning
        cfg[section]["dataset_config"] = cfg[section.replace("_task", "")]
    if edit is not None:
        edit(cfg)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False, allow_unicode=True)
    return os.fspath(path)


# ----- running -----------------------------------------------------------------------------
@dataclass
class CliResult:
    """Outcome of one command-line run."""
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self):
        return self.stdout + "\n" + self.stderr

    def error_lines(self):
        """Lines of stderr of the form ``prog: error: message`` (the one-line user errors of the CLIs)."""
        return [line for line in self.stderr.splitlines() if re.match(r"^[\w.-]+\.py: error: ", line)]

    def tail(self, lines=40):
        """The end of the combined output without MindSpore's [WARNING] lines, for assertion messages."""
        kept = [line for line in self.output.splitlines() if not line.startswith("[WARNING]")]
        return "\n".join(kept[-lines:])


def run_cli(args, cwd=None, script=RUN_SCRIPT, timeout=900, env=None):
    """Run ``python script args...`` and capture everything; ``args`` may hold paths."""
    command = [PYTHON, script] + [os.fspath(a) for a in args]
    full_env = dict(os.environ)
    full_env.setdefault("GLOG_v", "3")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.run(command, cwd=os.fspath(cwd) if cwd else None, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def run_baichuan2(args, cwd=None, device_target="CPU", **kwargs):
    """``run_baichuan2.py`` with ``--device_target CPU`` appended."""
    return run_cli(list(args) + ["--device_target", device_target], cwd=cwd, **kwargs)


# ----- parsing -----------------------------------------------------------------------------
def parse_steps(text):
    """``[(epoch, step_in_epoch, loss)]`` from MFLossMonitor lines (``Epoch:[e/E], step:[s/S], loss:[x/avg]``)."""
    return [(int(e), int(s), float(x)) for e, s, _, x in _LOSS_RE.findall(text)]


def parse_losses(text):
    """Per-step losses printed by MFLossMonitor, in order."""
    return [loss for _, _, loss in parse_steps(text)]


def parse_perplexity(text):
    """The ``Perplexity: {...}`` dict printed by ``--run_mode eval`` (last one), or None."""
    import ast  # pylint: disable=import-outside-toplevel
    found = _PPL_RE.findall(text)
    return ast.literal_eval(found[-1]) if found else None


def checkpoint_dir(output_dir, rank=0):
    return os.path.join(os.fspath(output_dir), "checkpoint", f"rank_{rank}")


def last_checkpoint(output_dir, rank=0, kind="checkpoint"):
    """The newest checkpoint a run wrote under ``output_dir/<kind>/rank_<rank>`` (``meta.json`` first).

    ``kind`` "checkpoint" (resumable, all weights + optimizer) or "checkpoint_trainable"
    (``save_trainable_params: True``: trainable parameters only, e.g. the LoRA weights).
    """
    folder = os.path.join(os.fspath(output_dir), kind, f"rank_{rank}")
    meta = os.path.join(folder, "meta.json")
    if kind == "checkpoint" and os.path.isfile(meta):
        with open(meta, encoding="utf-8") as handle:
            name = json.load(handle).get("last_ckpt_file")
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt")] \
        if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    return max(files, key=os.path.getmtime)


def load_params(path):
    """``{name: np.ndarray}`` of a MindSpore checkpoint file."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(os.fspath(path)).items()}


# ----- in-process networks -----------------------------------------------------------------
def network_logits(config_path, params, ids, lora=None):
    """Eval logits (B, S, V) of the network a yaml builds, weights ``params`` ({name: array}), in PyNative.

    ``lora``: a pet_config dict; LoRA layers are injected in place (mindformers ``LoraAdapter``,
    parameter names unchanged) before loading. The yaml's own pet_config is ignored. Asserts that
    every parameter except runtime buffers was loaded.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    from baichuan2_config import load_config, build_network  # pylint: disable=import-outside-toplevel
    from mindformers.pet import LoraConfig  # pylint: disable=import-outside-toplevel
    from mindformers.pet.tuners.lora_adapter import LoraAdapter  # pylint: disable=import-outside-toplevel
    config = load_config(os.fspath(config_path))
    config.model.model_config.pet_config = None
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        net = build_network(config, use_past=False, checkpoint_name_or_path="")
        if lora:
            LoraAdapter.get_pet_model(net, LoraConfig(**{k: v for k, v in lora.items() if k != "pet_type"}))
        tensors = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in params.items()}
        not_loaded, _ = ms.load_param_into_net(net, tensors)
        missing = [n for n in not_loaded if not n.endswith(("key_past", "value_past", "inv_norm"))]
        if missing:
            raise AssertionError(f"parameters not loaded: {missing}")
        net.set_train(False)
        return net(ms.Tensor(ids, ms.int32))[0].asnumpy()
    finally:
        ms.set_context(mode=previous)


def built_kernel(module):
    """The compiled library of a kernel module (``baichuan2_rows_matmul``, ``baichuan2_norm_head``,
    ``baichuan2_decode_attention``); fails the test, naming the source, if the host compiler could not build it."""
    path = module.build_library()
    assert path, f"the host C++ compiler could not build {os.path.basename(module.SOURCE)} (see the warning above)"
    return path
