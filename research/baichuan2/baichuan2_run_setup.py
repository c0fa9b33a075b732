"""Config overrides, up-front checks and Trainer dispatch for ``run_baichuan2.py``.

Every check here runs before MindSpore compiles anything, so a wrong path, a dataset made for
another ``seq_length``, a checkpoint of another model or an impossible parallel layout costs a
second, not a compile, and is reported as one line naming the file, the field and the fix.

The checks on data and checkpoints run on the plain YAML (``read_yaml_config``) before MindFormers
is even imported, so such a mistake is reported in a few seconds.

``--resume``: training continues from the last checkpoint of ``output_dir/checkpoint`` (or of
``--load_checkpoint``): MindFormers restores the weights, the optimizer moments, ``global_step``
(hence the learning-rate schedule), the loss scale, and skips the data already seen.
"""
import glob
import json
import logging
import os
import re

import numpy as np

from baichuan2_ckpt_index import CheckpointIndexError, checkpoint_shapes

logger = logging.getLogger("baichuan2")

# Checkpoint entries that are not network weights: optimizer state, step counters, loss scale.
_TRAIN_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "global_step",
                         "scale_sense", "epoch_num", "step_num", "loss_scale", "learning_rate",
                         "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power",
                         "global_batch_size")
_RUNTIME_SUFFIXES = ("key_past", "value_past", "inv_norm")
_LORA_MARKERS = ("mindpet_delta", "tk_delta")
# Entries every checkpoint saved by MindFormers' CheckpointMonitor during training has.
_RESUME_KEYS = ("step_num", "global_step")
# Cells of the Baichuan2 network that are MindFormers ``Linear`` layers, i.e. what LoRA can wrap.
_LINEAR_CELLS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_DEFAULT_LORA_TARGETS = r".*dense*|.*linear*"        # mindformers LoraAdapter default


class RunSetupError(ValueError):
    """A problem with the command line, the YAML, the data or the checkpoint, found before compiling."""


class YamlConfig(dict):
    """Plain-YAML stand-in for ``MindFormerConfig`` used by the up-front checks.

    Attribute access as in ``MindFormerConfig`` (a missing key reads as None); nested mappings are
    ``YamlConfig`` too, so the same ``apply_overrides`` works on both.
    """

    def __init__(self, mapping=None):
        super().__init__()
        for key, value in (mapping or {}).items():
            self[key] = _wrap(value)

    def __getattr__(self, key):
        return self.get(key)

    def __setattr__(self, key, value):
        self[key] = value


def _wrap(value):
    if isinstance(value, dict):
        return YamlConfig(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def read_yaml_config(path):
    """The YAML as a ``YamlConfig`` without importing MindFormers; None if it inherits a ``base_config``."""
    import yaml  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (pass --config path/to/run_baichuan2_*.yaml)")
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"--config must be a .yaml/.yml file, got {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise RunSetupError(f"cannot parse {path}: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise RunSetupError(f"{path} is not a YAML mapping of config sections")
    if "base_config" in raw:
        return None
    return YamlConfig(raw)


def apply_model_overrides(config, args):
    """The overrides every script shares (``run_baichuan2.py`` and the chat/generate/pipeline scripts):
    device, mode, checkpoint (+ its strategy and transform) and tokenizer file.

    A ``--src_strategy`` that does not exist is an error (the original ignored it silently).
    """
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.device_id is not None:
        config.context.device_id = args.device_id
    if args.device_target is not None:
        config.context.device_target = args.device_target
    if args.mode is not None:
        config.context.mode = args.mode
        if args.mode != 0 and config.recompute_config:
            config.recompute_config.recompute = False      # recomputation exists in graph mode only
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.src_strategy is not None:
        if not os.path.exists(args.src_strategy):
            raise RunSetupError(f"--src_strategy {args.src_strategy} does not exist (pass the strategy file, or the "
                                "folder of strategy files, saved with the distributed checkpoint)")
        config.src_strategy_path_or_dir = args.src_strategy
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.vocab_file is not None:
        config.processor.tokenizer.vocab_file = args.vocab_file
    return config


def apply_overrides(config, args):
    """Apply ``run_baichuan2.py``'s command-line overrides to the YAML config, as the original script does."""
    apply_model_overrides(config, args)
    model_config = config.model.model_config
    if args.seq_length is not None:
        model_config.seq_length = args.seq_length
    if args.resume is not None:
        config.resume_training = args.resume
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    for flag, key in (("dp", "data_parallel"), ("mp", "model_parallel"), ("pp", "pipeline_stage"),
                      ("micro_batch_num", "micro_batch_num")):
        value = getattr(args, flag)
        if value is not None:
            config.parallel_config[key] = value
    if args.train_dataset:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset
    if args.eval_dataset:
        config.eval_dataset.data_loader.dataset_dir = args.eval_dataset
    config.run_mode = args.run_mode
    if args.run_mode in ("train", "finetune", "eval"):
        model_config.use_past = False        # the cache is for generation only, as in the original
    return config


def check_device(config):
    """The requested device must exist in this MindSpore build (CPU boxes have no Ascend)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    target = config.context.device_target or "CPU"
    if target != "CPU" and not ms.hal.is_available(target):
        raise RunSetupError(f"context.device_target is {target}, which this machine/MindSpore build does not have; "
                            "pass --device_target CPU (or run on an Ascend host).")


def mindrecord_files(path, field):
    """The MindRecord files of a dataset folder or file; raises if there are none."""
    if not path:
        raise RunSetupError(f"no dataset given: pass --{field} DIR or set {field}.data_loader.dataset_dir "
                            "in the yaml (a folder made by belle_preprocess.py).")
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise RunSetupError(f"{field} not found: {path} (pass the folder that holds the .mindrecord files)")
    files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                   if not f.endswith(".db") and os.path.isfile(f + ".db"))
    if not files:
        raise RunSetupError(f"{field} {path} holds no MindRecord file (run belle_preprocess.py to make one)")
    return files


def check_dataset(path, field, seq_length, columns):
    """Rows must hold ``columns`` of length ``seq_length + 1`` (belle_preprocess --seq_length)."""
    from mindspore.mindrecord import FileReader  # pylint: disable=import-outside-toplevel
    files = mindrecord_files(path, field)
    reader = FileReader(files[0], num_consumer=1)
    try:
        row = next(reader.get_next(), None)
    finally:
        reader.close()
    if row is None:
        raise RunSetupError(f"{field} {files[0]} has no records")
    missing = [c for c in columns if c not in row]
    if missing:
        raise RunSetupError(f"{field} {files[0]}: column(s) {missing} missing (has {sorted(row)}); fix "
                            f"{field}.input_columns in the yaml or remake the dataset")
    length = len(np.asarray(row[columns[0]]).reshape(-1))
    if length != seq_length + 1:
        raise RunSetupError(f"{field} {files[0]}: records have {length} tokens but model.model_config.seq_length "
                            f"is {seq_length}, which needs {seq_length + 1}; rerun belle_preprocess.py with "
                            f"--seq_length {length - 1 if length > 1 else seq_length} matching the yaml, "
                            f"or pass --seq_length {length - 1}")
    return files


def _intermediate_size(model_config):
    """FFN width as MindFormers' LlamaFeedForward derives it (facts sheet §1.1)."""
    if model_config.intermediate_size:
        return int(model_config.intermediate_size)
    hidden = int(2 * 4 * model_config.hidden_size / 3)
    if model_config.ffn_dim_multiplier:
        hidden = int((model_config.ffn_dim_multiplier + 0.01) * 4 * model_config.hidden_size)
        hidden = int(2 * hidden / 3)
    multiple = model_config.multiple_of or 256
    return multiple * ((hidden + multiple - 1) // multiple)


def expected_weight_shapes(model_config):
    """``{MindSpore name: shape}`` of the network a model_config builds."""
    from baichuan2_weights import expected_ms_shapes  # pylint: disable=import-outside-toplevel
    return expected_ms_shapes({"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
                               "intermediate_size": _intermediate_size(model_config),
                               "num_hidden_layers": model_config.num_layers,
                               "num_attention_heads": model_config.num_heads})


def checkpoint_files(path):
    """The .ckpt/.safetensors files a ``load_checkpoint`` value names (file or folder), or [] for rank_x layouts."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise RunSetupError(f"load_checkpoint not found: {path} (a .ckpt file or a folder of .ckpt files)")
    if glob.glob(os.path.join(path, "rank_*")):
        return []
    files = sorted(glob.glob(os.path.join(path, "*.ckpt")) + glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise RunSetupError(f"load_checkpoint folder {path} holds no .ckpt file")
    return files


def _lora_target(name, target_modules, exclude_layers):
    """Whether mindformers' LoraAdapter wraps the Linear of weight ``name`` (``...<cell>.weight``).

    The adapter walks the cell tree from the network: at each level a child whose name matches
    ``exclude_layers`` is skipped, a child whose name matches ``target_modules`` (``re.match``) is
    replaced if it is a Linear and left alone (not entered) otherwise; other children are entered.
    """
    cells = name.split(".")[:-1]
    if not cells or cells[-1] not in _LINEAR_CELLS:
        return False
    excludes = [exclude_layers] if isinstance(exclude_layers, str) else list(exclude_layers or [])
    for depth, cell in enumerate(cells):
        if any(re.match(pattern, cell) for pattern in excludes):
            return False
        if re.match(target_modules, cell):
            return depth == len(cells) - 1
    return False


def expected_lora_shapes(weight_shapes, pet_config):
    """``{LoRA parameter name: shape}`` that ``pet_config`` (pet_type lora) adds to a network with ``weight_shapes``."""
    if not pet_config or (pet_config.get("pet_type") or "lora") != "lora":
        return {}
    rank = int(pet_config.get("lora_rank") or 8)
    targets = pet_config.get("target_modules") or _DEFAULT_LORA_TARGETS
    shapes = {}
    for name, shape in weight_shapes.items():
        if name.endswith(".weight") and len(shape) == 2 and \
                _lora_target(name, targets, pet_config.get("exclude_layers")):
            prefix = name[: -len("weight")]
            shapes[prefix + "mindpet_delta_lora_a"] = (rank, shape[1])
            shapes[prefix + "mindpet_delta_lora_b"] = (shape[0], rank)
    return shapes


def read_checkpoint_shapes(files):
    """``{name: shape}`` over the checkpoint ``files`` (names of later files win); LoRA names normalised.

    Reads only names and shapes (``baichuan2_ckpt_index``), not the tensors.
    """
    found = {}
    for file in files:
        try:
            shapes = checkpoint_shapes(file)
        except (OSError, CheckpointIndexError) as error:
            raise RunSetupError(f"cannot read checkpoint {file}: {error}; pass a checkpoint written by "
                                "convert_weight.py or by training") from None
        found.update({name.replace("tk_delta", "mindpet_delta"): shape for name, shape in shapes.items()})
    return found


def check_checkpoint(path, model_config, lora, run_mode=None):
    """Names and shapes in the checkpoint(s) must fit the network the yaml builds.

    ``path`` is a file or a folder whose ``.ckpt`` files are taken together (a base checkpoint and
    a LoRA checkpoint side by side). With ``lora`` the LoRA parameters must be those
    ``model_config.pet_config`` creates (targets and rank). Returns ``{name: shape}`` of what was
    read ({} for a rank_x layout, which is checked at load time).
    """
    files = checkpoint_files(path)
    if not files:
        logger.info("load_checkpoint %s is a distributed (rank_x) layout; names are checked at load time", path)
        return {}
    found = read_checkpoint_shapes(files)
    expected = expected_weight_shapes(model_config)
    expected_lora = expected_lora_shapes(expected, model_config.pet_config) if lora else {}
    weights = {n: s for n, s in found.items()
               if not n.startswith(_TRAIN_STATE_PREFIXES) and not n.endswith(_RUNTIME_SUFFIXES)}
    lora_names = [n for n in weights if any(m in n for m in _LORA_MARKERS)]
    if lora_names and not lora:
        raise RunSetupError(f"checkpoint {path} holds LoRA weights ({lora_names[0]}, ...) but the yaml has no "
                            "model.model_config.pet_config; use a *_lora yaml or merge them with merge_lora.py")
    _check_weights_fit(path, weights, expected, lora_names)
    if lora and expected_lora:
        unexpected = sorted(n for n in lora_names if n not in expected_lora)
        wrong = sorted(f"{n} {weights[n]} vs {expected_lora[n]}" for n in lora_names
                       if n in expected_lora and tuple(weights[n]) != tuple(expected_lora[n]))
        if unexpected or wrong:
            detail = (f"shape mismatch (checkpoint vs pet_config lora_rank {model_config.pet_config.lora_rank}): "
                      f"{', '.join(wrong[:2])}" if wrong else
                      f"LoRA weights for layers that pet_config.target_modules "
                      f"{model_config.pet_config.target_modules!r} does not adapt: {', '.join(unexpected[:2])}")
            raise RunSetupError(f"checkpoint {path} does not fit the LoRA network of the yaml ({detail}); check "
                                "model.model_config.pet_config (lora_rank, target_modules) or the checkpoint")
        if not lora_names and run_mode in ("eval", "predict"):
            logger.warning("checkpoint %s has no LoRA weights: the LoRA layers keep their initial values "
                           "(B = 0, i.e. the base model)", path)
    return found


def _check_weights_fit(path, weights, expected, lora_names):
    """Raise if base weights are missing, unexpected or of another shape."""
    unexpected = sorted(n for n in weights if n not in expected and n not in lora_names)
    missing = sorted(n for n in expected if n not in weights)
    if lora_names and len(missing) == len(expected):
        raise RunSetupError(f"checkpoint {path} holds LoRA weights only; put the base checkpoint and the LoRA "
                            "checkpoint in one folder and pass that folder as --load_checkpoint")
    wrong = sorted(f"{n} {weights[n]} vs {expected[n]}" for n in expected
                   if n in weights and tuple(weights[n]) != tuple(expected[n]))
    if unexpected or wrong or missing:
        parts = []
        if wrong:
            parts.append(f"shape mismatch (checkpoint vs yaml): {', '.join(wrong[:3])}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise RunSetupError(f"checkpoint {path} does not fit the network of the yaml ({'; '.join(parts)}); "
                            "check --config (7B vs 13B, seq/vocab/hidden sizes) or the checkpoint")


def _last_checkpoint(folder):
    """The checkpoint ``meta.json`` of MindFormers' CheckpointMonitor names, else the newest ``.ckpt``; or None."""
    meta = os.path.join(folder, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as handle:
                name = json.load(handle).get("last_ckpt_file")
        except (OSError, ValueError):
            name = None
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    files = glob.glob(os.path.join(folder, "*.ckpt"))
    return max(files, key=os.path.getmtime) if files else None


def resolve_resume(config, run_mode):
    """For ``--resume``: the checkpoint file training continues from, or None without ``--resume``.

    ``load_checkpoint`` defaults to ``<output_dir>/checkpoint`` (where the previous run saved). A
    folder with ``rank_x/`` sub-folders is kept as is (MindFormers picks each rank's checkpoint from
    its ``meta.json``); a folder of ``.ckpt`` files is replaced by its newest file.
    """
    resume = config.resume_training
    if not resume:
        return None
    if run_mode not in ("train", "finetune"):
        raise RunSetupError(f"--resume applies to --run_mode train/finetune, not {run_mode}")
    if not config.load_checkpoint:
        config.load_checkpoint = os.path.join(config.output_dir or "./output", "checkpoint")
    path = config.load_checkpoint
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise RunSetupError(f"--resume: no checkpoint to resume from, {path} does not exist; resume needs the "
                            "checkpoint folder of an earlier run (same --output_dir, or --load_checkpoint "
                            "OUTPUT/checkpoint or a .ckpt file)")
    rank_dir = os.path.join(path, f"rank_{int(os.getenv('RANK_ID', '0'))}")
    if os.path.isdir(rank_dir):
        if isinstance(resume, str):
            name = resume if resume.endswith(".ckpt") else resume + ".ckpt"
            ckpt = os.path.join(rank_dir, name)
            if not os.path.isfile(ckpt):
                raise RunSetupError(f"resume_training names {name}, which is not in {rank_dir}")
            return ckpt
        ckpt = _last_checkpoint(rank_dir)
        if ckpt is None:
            raise RunSetupError(f"--resume: no checkpoint to resume from in {rank_dir} yet; train without --resume first")
        return ckpt
    ckpt = _last_checkpoint(path)
    if ckpt is None:
        raise RunSetupError(f"--resume: no checkpoint to resume from in {path} (nor a rank_0/ folder); train without --resume "
                            "first, or pass --load_checkpoint")
    config.load_checkpoint = ckpt
    return ckpt


def check_inputs(config, args):
    """Device, data, prompts and checkpoint: everything that can be checked before building anything."""
    check_device(config)
    model_config = config.model.model_config
    lora = bool(model_config.pet_config)
    resume_ckpt = resolve_resume(config, args.run_mode)
    if args.run_mode in ("train", "finetune"):
        check_dataset(config.train_dataset.data_loader.dataset_dir, "train_dataset", model_config.seq_length,
                      list(config.train_dataset.input_columns))
    if args.run_mode == "eval":
        check_dataset(config.eval_dataset.data_loader.dataset_dir, "eval_dataset", model_config.seq_length,
                      list(config.eval_dataset.input_columns))
    if args.run_mode == "predict":
        if not args.predict_data:
            raise RunSetupError("--predict_data is required for --run_mode predict (prompts or a text file)")
        from baichuan2_inference import read_prompts  # pylint: disable=import-outside-toplevel
        args.predict_data = read_prompts(args.predict_data, "--predict_data")   # a prompt file: read here, once
    if resume_ckpt:
        found = check_checkpoint(resume_ckpt, model_config, lora, args.run_mode)
        if not any(key in found for key in _RESUME_KEYS):
            raise RunSetupError(f"--resume: {resume_ckpt} holds weights only (no step/optimizer state, e.g. a "
                                "converted model); start from it with --load_checkpoint and without --resume")
        logger.info("resuming from %s", resume_ckpt)
    elif config.load_checkpoint:
        check_checkpoint(config.load_checkpoint, model_config, lora, args.run_mode)


def use_checkpoint_monitor_name(config):
    """Spell the original YAMLs' ``CheckpointMointor`` callback as ``CheckpointMonitor``.

    MindFormers' trainer passes the resume bookkeeping (epoch/step counters in ``append_info``,
    ``global_batch_size``) to the checkpoint callback, and restores the loss scale on resume, only
    for a callback of that exact type name; under the alias, the checkpoint of a resumed run would
    record the steps of that run alone and a second resume would restart the schedule.
    """
    for callback in config.callbacks or []:
        if callback.get("type") == "CheckpointMointor":
            callback["type"] = "CheckpointMonitor"


def prepare_run(args):
    """Load the YAML, apply overrides, check everything, set up the MindSpore context; returns the config.

    Data and checkpoints are checked on the plain YAML first, before MindFormers is imported (a few
    seconds); then the ``MindFormerConfig`` is built and the context set up.
    """
    if args.run_mode == "export":
        raise RunSetupError("--run_mode export (MindSpore Lite MindIR for Ascend inference) is not supported by "
                            "this plugin; use train/finetune/eval/predict")
    early = read_yaml_config(args.config)
    if early is not None:
        apply_overrides(early, args)
        check_inputs(early, args)
    from baichuan2_config import load_config, resolve_path  # pylint: disable=import-outside-toplevel
    config = load_config(args.config)
    apply_overrides(config, args)
    if early is None:                       # a yaml with base_config: checked on the full config
        check_inputs(config, args)
    else:
        config.load_checkpoint = early.load_checkpoint
    model_config = config.model.model_config
    if config.processor and config.processor.tokenizer and config.processor.tokenizer.vocab_file:
        vocab = resolve_path(config.processor.tokenizer.vocab_file, args.config)
        config.processor.tokenizer.vocab_file = vocab
        if args.run_mode in ("predict", "eval") and not os.path.isfile(vocab):
            raise RunSetupError(f"tokenizer file not found: {vocab} (pass --vocab_file path/to/tokenizer.model)")
    use_checkpoint_monitor_name(config)
    rank_size = int(os.getenv("RANK_SIZE", "1"))
    if config.use_parallel:
        from baichuan2_parallel import validate_parallel_config  # pylint: disable=import-outside-toplevel
        validate_parallel_config(config.parallel_config, model_config, rank_size,
                                 config.context.device_target, config.runner_config.batch_size,
                                 run_mode=args.run_mode)
    setup_context(config)
    return config


def setup_context(config):
    """``build_context`` (the Trainer does not apply ``config.context`` itself) plus the CPU adaptations."""
    from mindformers import build_context  # pylint: disable=import-outside-toplevel
    import baichuan2_7b  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import baichuan2_13b  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import baichuan2_tokenizer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from baichuan2_trainer_setup import prepare_cpu_training, adapt_parallel_for_device  # pylint: disable=C0415
    adapt_parallel_for_device(config)
    build_context(config)
    prepare_cpu_training()
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    mode = "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "PyNative"
    print(f"MindSpore context: {mode} mode on {ms.get_context('device_target')}", flush=True)


def apply_portable_checkpoint_transform(config):
    """``auto_trans_ckpt`` on a device without operator parallel (CPU).

    MindFormers' automatic transform needs the strategy files that a semi-auto parallel compile
    writes, which cannot exist here. Instead this rank's checkpoint is cut from a complete checkpoint
    (or re-laid from a ``rank_x/`` folder) by the strategy-free layout transform of
    ``baichuan2_ckpt_layout`` into ``output_dir/transformed_checkpoint/``, and loaded as is.
    A folder of several complete checkpoints (base + LoRA) needs no transform and is left alone.
    """
    from baichuan2_device import device_capabilities  # pylint: disable=import-outside-toplevel
    path = config.load_checkpoint
    if not (config.auto_trans_ckpt and path) or device_capabilities(config.context.device_target).operator_parallel:
        return
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "rank_*")) \
            and len(glob.glob(os.path.join(path, "*.ckpt"))) != 1:
        config.auto_trans_ckpt = False
        return
    from baichuan2_ckpt_layout import checkpoint_for_rank  # pylint: disable=import-outside-toplevel
    parallel = config.parallel_config if config.use_parallel else {}
    rank_id = int(os.getenv("RANK_ID", "0")) if config.use_parallel else 0
    config.load_checkpoint = checkpoint_for_rank(
        path, config.output_dir or "./output", parallel.get("data_parallel") or 1,
        parallel.get("model_parallel") or 1, parallel.get("pipeline_stage") or 1, rank_id,
        src_strategy=config.src_strategy_path_or_dir or None)
    config.auto_trans_ckpt = False
    logger.info("auto_trans_ckpt: rank %d loads %s", rank_id, config.load_checkpoint)


def run_trainer(config, args):
    """Dispatch ``--run_mode`` to ``mindformers.Trainer`` as the original script does."""
    from mindformers import Trainer  # pylint: disable=import-outside-toplevel
    apply_portable_checkpoint_transform(config)
    ckpt = config.load_checkpoint or None
    if args.run_mode in ("train", "finetune"):
        trainer = Trainer(args=config, task=args.task, train_dataset=config.train_dataset.data_loader.dataset_dir)
        run = trainer.train if args.run_mode == "train" else trainer.finetune
        kwargs = {"train_checkpoint" if args.run_mode == "train" else "finetune_checkpoint": ckpt or False}
        run(auto_trans_ckpt=config.auto_trans_ckpt, resume_training=config.resume_training, **kwargs)
    elif args.run_mode == "eval":
        trainer = Trainer(args=config, task=args.task, eval_dataset=config.eval_dataset.data_loader.dataset_dir)
        trainer.evaluate(eval_checkpoint=ckpt or False, auto_trans_ckpt=config.auto_trans_ckpt)
    elif args.run_mode == "predict":
        from baichuan2_inference import predict_network  # pylint: disable=import-outside-toplevel
        # LoRA yamls: hand over the network with LoRA layers injected (None otherwise: the Trainer builds it),
        # so that generation runs Baichuan2's generate() rather than MindFormers' PetModel one (Ascend-only).
        trainer = Trainer(args=config, task=args.task, model=predict_network(config))
        kwargs = {"max_length": int(args.max_length)}
        if args.max_new_tokens is not None:
            kwargs["max_new_tokens"] = int(args.max_new_tokens)
        result = trainer.predict(input_data=args.predict_data, predict_checkpoint=ckpt,
                                 auto_trans_ckpt=config.auto_trans_ckpt, **kwargs)
        logger.info(result)
        print(result, flush=True)
