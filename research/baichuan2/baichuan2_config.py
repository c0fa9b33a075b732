"""YAML configs -> model configs and networks, the way the original scripts and docs build them.

Relative paths inside a YAML (``processor.tokenizer.vocab_file``) are tried from the current
directory first, then from the YAML's own folder, so a bundled config works from the repository
root, from ``research/`` and from ``research/baichuan2/`` alike.
"""
import os

from mindformers import MindFormerConfig
from mindformers.models import LlamaConfig

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


def load_config(yaml_path):
    """Read a Baichuan2 YAML into a ``MindFormerConfig`` with its relative asset paths resolved."""
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"config file not found: {yaml_path} (pass --config path/to/run_baichuan2_*.yaml)")
    if not yaml_path.endswith((".yaml", ".yml")):
        raise ValueError(f"--config must be a .yaml/.yml file, got {yaml_path}")
    config = MindFormerConfig(os.path.abspath(yaml_path))
    tokenizer = config.processor.tokenizer if config.processor else None
    if tokenizer and tokenizer.vocab_file:
        tokenizer.vocab_file = resolve_path(tokenizer.vocab_file, yaml_path)
    return config


def model_class_for(config):
    """The network class named by ``model.arch.type`` (or, failing that, ``trainer.model_name``)."""
    import baichuan2_7b  # pylint: disable=import-outside-toplevel
    import baichuan2_13b  # pylint: disable=import-outside-toplevel
    classes = {cls.__name__: cls for cls in (baichuan2_7b.Baichuan7BV2ForCausalLM,
                                              baichuan2_13b.Baichuan13BV2ForCausalLM)}
    arch = config.model.arch.type if config.model and config.model.arch else None
    name = arch or MODEL_NAMES.get(config.trainer.model_name if config.trainer else None)
    if name not in classes:
        raise ValueError(f"model.arch.type must be one of {sorted(classes)}, got {name!r}")
    return classes[name]


def build_model_config(config, **overrides):
    """``LlamaConfig`` from ``config.model.model_config`` with keyword overrides (None values ignored)."""
    model_config = dict(config.model.model_config)
    model_config.pop("type", None)
    model_config.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**model_config)


def build_network(config, **overrides):
    """Instantiate the Baichuan2 network of a YAML config (weights from ``checkpoint_name_or_path`` if set)."""
    return model_class_for(config)(config=build_model_config(config, **overrides))
