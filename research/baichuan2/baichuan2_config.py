"""YAML configs: reading, the command-line overrides, and model configs / networks built from them.

Two readers of one YAML: ``read_yaml_config`` (plain YAML, no MindFormers import, for the up-front
checks and the memory planner) and ``load_config`` (MindFormers' ``MindFormerConfig``, with its
run-mode templates, for the run itself). ``apply_overrides`` works on both.

Relative paths inside a YAML (``processor.tokenizer.vocab_file``) are tried from the current
directory first, then from the YAML's own folder, so a bundled config works from the repository
root, from ``research/`` and from ``research/baichuan2/`` alike.
"""
import os

from baichuan2_cli import UserInputError

# MindFormers is imported inside the functions that build MindFormers objects: reading a YAML and
# applying overrides must stay fast (the checks run before MindFormers loads).

# trainer.model_name -> network class name (the original scripts' model_dict).
MODEL_NAMES = {
    "baichuan2_7b": "Baichuan7BV2ForCausalLM",
    "baichuan2_7b_lora": "Baichuan7BV2ForCausalLM",
    "baichuan2_13b": "Baichuan13BV2ForCausalLM",
    "baichuan2_13b_lora": "Baichuan13BV2ForCausalLM",
}


def resolve_path(path, yaml_path):
    """``path`` as given if it exists (or is absolute/empty), else relative to the YAML's folder if that exists."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(os.path.abspath(yaml_path)), path)
    return candidate if os.path.exists(candidate) else path


class YamlConfig(dict):
    """Plain-YAML stand-in for ``MindFormerConfig``.

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


def _check_config_path(yaml_path):
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"config file not found: {yaml_path} (pass --config path/to/run_baichuan2_*.yaml)")
    if not yaml_path.endswith((".yaml", ".yml")):
        raise UserInputError(f"--config must be a .yaml/.yml file, got {yaml_path}")


def read_yaml_mapping(yaml_path):
    """The YAML file as a ``YamlConfig``, as written (a ``base_config`` key is not followed)."""
    import yaml  # pylint: disable=import-outside-toplevel
    _check_config_path(yaml_path)
    with open(yaml_path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise UserInputError(f"cannot parse {yaml_path}: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{yaml_path} is not a YAML mapping of config sections")
    return YamlConfig(raw)


def read_yaml_config(yaml_path):
    """The YAML as a ``YamlConfig`` without importing MindFormers; None if it inherits a ``base_config``."""
    config = read_yaml_mapping(yaml_path)
    return None if "base_config" in config else config


class _Flags:
    """``args`` where a flag the script does not define reads as None."""

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name, None)


def apply_model_overrides(config, args):
    """The overrides every script shares (``run_baichuan2.py`` and the chat/generate/pipeline scripts):
    device, mode, checkpoint (+ its strategy and transform) and tokenizer file.

    A ``--src_strategy`` that does not exist is an error (the original ignored it silently). Flags
    missing from ``args`` count as not given.
    """
    args = _Flags(args)
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
            raise UserInputError(f"--src_strategy {args.src_strategy} does not exist (pass the strategy file, or "
                                 "the folder of strategy files, saved with the distributed checkpoint)")
        config.src_strategy_path_or_dir = args.src_strategy
    if args.auto_trans_ckpt is not None:
        config.auto_trans_ckpt = args.auto_trans_ckpt
    if args.vocab_file is not None:         # relative: from the current directory, else from the YAML's folder
        config.processor.tokenizer.vocab_file = (resolve_path(args.vocab_file, args.config)
                                               if args.config else args.vocab_file)
    return config


def apply_overrides(config, args):
    """``run_baichuan2.py``'s command-line overrides (``YamlConfig`` or ``MindFormerConfig``), as the original.

    Reads from ``args`` only the flags it has, so other scripts (e.g. a memory planner with
    ``--seq_length``/``--dp``/``--mp``/``--pp``/``--use_past``) can use it with their own subset.
    """
    apply_model_overrides(config, args)
    flag = _Flags(args).__getattr__
    model_config = config.model.model_config
    if flag("seq_length") is not None:
        model_config.seq_length = flag("seq_length")
    if flag("batch_size") is not None:
        config.runner_config.batch_size = flag("batch_size")
    if flag("use_past") is not None:
        model_config.use_past = flag("use_past")
    if flag("resume") is not None:
        config.resume_training = flag("resume")
    if flag("output_dir") is not None:
        config.output_dir = flag("output_dir")
    for name, key in (("dp", "data_parallel"), ("mp", "model_parallel"), ("pp", "pipeline_stage"),
                      ("micro_batch_num", "micro_batch_num")):
        if flag(name) is not None:
            config.parallel_config[key] = flag(name)
    if flag("train_dataset"):
        config.train_dataset.data_loader.dataset_dir = flag("train_dataset")
    if flag("eval_dataset"):
        config.eval_dataset.data_loader.dataset_dir = flag("eval_dataset")
    run_mode = flag("run_mode")
    if run_mode is not None:
        config.run_mode = run_mode
        if run_mode in ("train", "finetune", "eval"):
            model_config.use_past = False        # the cache is for generation only, as in the original
    return config


def load_config(yaml_path):
    """Read a Baichuan2 YAML into a ``MindFormerConfig`` with its relative asset paths resolved."""
    from mindformers import MindFormerConfig  # pylint: disable=import-outside-toplevel
    _check_config_path(yaml_path)
    config = MindFormerConfig(os.path.abspath(yaml_path))
    tokenizer = config.processor.tokenizer if config.processor else None
    if tokenizer and tokenizer.vocab_file:
        tokenizer.vocab_file = resolve_path(tokenizer.vocab_file, yaml_path)
    return config


def architecture_name(config):
    """The network class name a config builds: ``model.arch.type``, or failing that ``trainer.model_name``
    through ``MODEL_NAMES``; None if neither says. ``config``: a dict, ``YamlConfig`` or ``MindFormerConfig``."""
    def get(node, key):
        if node is None:
            return None
        return node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return get(get(get(config, "model"), "arch"), "type") or MODEL_NAMES.get(get(get(config, "trainer"), "model_name"))


def uses_alibi(config):
    """Whether the config builds Baichuan2-13B (ALiBi positions) rather than 7B (RoPE)."""
    return architecture_name(config) == MODEL_NAMES["baichuan2_13b"]


def model_class_for(config):
    """The network class named by ``model.arch.type`` (or, failing that, ``trainer.model_name``)."""
    import baichuan2_7b  # pylint: disable=import-outside-toplevel
    import baichuan2_13b  # pylint: disable=import-outside-toplevel
    classes = {cls.__name__: cls for cls in (baichuan2_7b.Baichuan7BV2ForCausalLM,
                                              baichuan2_13b.Baichuan13BV2ForCausalLM)}
    name = architecture_name(config)
    if name not in classes:
        raise ValueError(f"model.arch.type must be one of {sorted(classes)}, got {name!r}")
    return classes[name]


def build_model_config(config, **overrides):
    """``LlamaConfig`` from ``config.model.model_config`` with keyword overrides (None values ignored)."""
    from mindformers.models import LlamaConfig  # pylint: disable=import-outside-toplevel
    model_config = dict(config.model.model_config)
    model_config.pop("type", None)
    model_config.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**model_config)


def build_network(config, **overrides):
    """Instantiate the Baichuan2 network of a YAML config (weights from ``checkpoint_name_or_path`` if set)."""
    return model_class_for(config)(config=build_model_config(config, **overrides))
