"""Config overrides, up-front checks and Trainer dispatch for ``run_baichuan2.py``.

Every check here runs before MindSpore compiles anything, so a wrong path, a dataset made for
another ``seq_length``, a checkpoint of another model or an impossible parallel layout costs a
second, not a compile, and is reported as one line naming the file, the field and the fix.
"""
import glob
import logging
import os

import numpy as np

from baichuan2_config import load_config, resolve_path

logger = logging.getLogger("baichuan2")

# Checkpoint entries that are not network weights: optimizer state, step counters, loss scale.
_TRAIN_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.", "global_step",
                         "scale_sense", "epoch_num", "step_num", "loss_scale", "learning_rate",
                         "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power")
_RUNTIME_SUFFIXES = ("key_past", "value_past", "inv_norm")
_LORA_MARKERS = ("mindpet_delta", "tk_delta")


class RunSetupError(ValueError):
    """A problem with the command line, the YAML, the data or the checkpoint, found before compiling."""


def apply_overrides(config, args):
    """Apply the command-line overrides to the YAML config, as the original script does."""
    model_config = config.model.model_config
    if args.seq_length is not None:
        model_config.seq_length = args.seq_length
    if args.use_parallel is not None:
        config.use_parallel = args.use_parallel
    if args.device_id is not None:
        config.context.device_id = args.device_id
    if args.device_target is not None:
        config.context.device_target = args.device_target
    if args.mode is not None:
        config.context.mode = args.mode
        if args.mode != 0 and config.recompute_config:
            config.recompute_config.recompute = False
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.src_strategy is not None and os.path.exists(args.src_strategy):
        config.src_strategy_path_or_dir = args.src_strategy
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.resume is not None:
        config.resume_training = args.resume
    if args.vocab_file is not None:
        config.processor.tokenizer.vocab_file = args.vocab_file
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


def check_checkpoint(path, model_config, lora):
    """Names and shapes in the checkpoint(s) must fit the network the yaml builds."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    files = checkpoint_files(path)
    if not files:
        logger.info("load_checkpoint %s is a distributed (rank_x) layout; names are checked at load time", path)
        return
    found = {}
    for file in files:
        fmt = "safetensors" if file.endswith(".safetensors") else "ckpt"
        try:
            params = ms.load_checkpoint(file, format=fmt)
        except Exception as error:  # pylint: disable=broad-except
            raise RunSetupError(f"cannot read checkpoint {file}: {str(error).splitlines()[0]}") from None
        found.update({name: tuple(value.shape) for name, value in params.items()})
        del params
    expected = expected_weight_shapes(model_config)
    weights = {n: s for n, s in found.items()
               if not n.startswith(_TRAIN_STATE_PREFIXES) and not n.endswith(_RUNTIME_SUFFIXES)}
    lora_names = [n for n in weights if any(m in n for m in _LORA_MARKERS)]
    if lora_names and not lora:
        raise RunSetupError(f"checkpoint {path} holds LoRA weights ({lora_names[0]}, ...) but the yaml has no "
                            "model.model_config.pet_config; use a *_lora yaml or merge them with merge_lora.py")
    unexpected = sorted(n for n in weights if n not in expected and n not in lora_names)
    missing = sorted(n for n in expected if n not in weights)
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


def prepare_run(args):
    """Load the YAML, apply overrides, check everything, set up the MindSpore context; returns the config."""
    config = load_config(args.config)
    if args.run_mode == "export":
        raise RunSetupError("--run_mode export (MindSpore Lite MindIR for Ascend inference) is not supported by "
                            "this plugin; use train/finetune/eval/predict")
    apply_overrides(config, args)
    check_device(config)
    model_config = config.model.model_config
    if config.processor and config.processor.tokenizer and config.processor.tokenizer.vocab_file:
        vocab = resolve_path(config.processor.tokenizer.vocab_file, args.config)
        config.processor.tokenizer.vocab_file = vocab
        if args.run_mode in ("predict", "eval") and not os.path.isfile(vocab):
            raise RunSetupError(f"tokenizer file not found: {vocab} (pass --vocab_file path/to/tokenizer.model)")
    if args.run_mode in ("train", "finetune"):
        check_dataset(config.train_dataset.data_loader.dataset_dir, "train_dataset", model_config.seq_length,
                      list(config.train_dataset.input_columns))
    if args.run_mode == "eval":
        check_dataset(config.eval_dataset.data_loader.dataset_dir, "eval_dataset", model_config.seq_length,
                      list(config.eval_dataset.input_columns))
    if args.run_mode == "predict" and not args.predict_data:
        raise RunSetupError("--predict_data is required for --run_mode predict (prompts or a text file)")
    if config.load_checkpoint and not (config.resume_training and os.path.isdir(config.load_checkpoint)):
        check_checkpoint(config.load_checkpoint, model_config, bool(model_config.pet_config))
    rank_size = int(os.getenv("RANK_SIZE", "1"))
    if config.use_parallel:
        from baichuan2_parallel import validate_parallel_config  # pylint: disable=import-outside-toplevel
        validate_parallel_config(config.parallel_config, model_config, rank_size,
                                 config.context.device_target, config.runner_config.batch_size)
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


def run_trainer(config, args):
    """Dispatch ``--run_mode`` to ``mindformers.Trainer`` as the original script does."""
    from mindformers import Trainer  # pylint: disable=import-outside-toplevel
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
        from run_baichuan2 import read_predict_data  # pylint: disable=import-outside-toplevel
        trainer = Trainer(args=config, task=args.task)
        kwargs = {"max_length": int(args.max_length)}
        if args.max_new_tokens is not None:
            kwargs["max_new_tokens"] = int(args.max_new_tokens)
        result = trainer.predict(input_data=read_predict_data(args.predict_data), predict_checkpoint=ckpt,
                                 auto_trans_ckpt=config.auto_trans_ckpt, **kwargs)
        logger.info(result)
        print(result, flush=True)
