"""Inference set-up shared by the chat, generate and pipeline scripts.

One way to go from a YAML (+ command-line overrides) to a tokenizer and a network with its weights,
so that ``run_baichuan2_chat.py``, ``run_baichuan2_generate.py`` and ``run_baichuan2_pipeline.py``
load exactly what ``run_baichuan2.py --run_mode predict`` loads:

* ``load_checkpoint`` a ``.ckpt`` file, a folder of ``.ckpt`` files (a complete checkpoint, or a
  base checkpoint + a LoRA checkpoint side by side), or a folder of ``rank_x/`` folders (the output
  of a distributed run; rank 0's latest checkpoint is read on a single card), optionally through
  MindFormers' automatic transform (``auto_trans_ckpt`` + ``src_strategy``);
* a YAML with ``model_config.pet_config`` (the ``*_lora`` YAMLs) gets LoRA layers first. They are
  injected into the Baichuan2 network itself (parameter names unchanged), so generation stays on
  the portable Baichuan2 ``generate()``.

Checkpoint names and shapes are checked against the YAML before anything compiles (the same check
as the predict CLI), and every problem is one line: ``ValueError``/``FileNotFoundError``.
"""
import argparse
import os

# Only light imports at module level: the chat script sets up its Ctrl-C handling before MindSpore loads.


def str2bool(value):
    """argparse type for True/False flags, as in the original scripts."""
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def read_prompts(values, flag):
    """Prompts from a command line: the values themselves, or the non-empty lines of the one existing
    text file they name. ``flag`` names the option in the error for a file without a prompt."""
    if len(values) == 1 and os.path.isfile(values[0]):
        with open(values[0], encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
        if not prompts:
            raise ValueError(f"{flag} file {values[0]} has no prompt (one prompt per line).")
        return prompts
    return list(values)


def add_model_arguments(parser, default_config):
    """The model/checkpoint flags of the original chat script, plus ``--device_target`` and ``--mode``."""
    parser.add_argument("--config", default=default_config, type=str, help="YAML config (run_baichuan2_*.yaml).")
    parser.add_argument("--use_parallel", default=None, type=str2bool, help="Overrides use_parallel (False here).")
    parser.add_argument("--device_id", default=None, type=int, help="Overrides context.device_id.")
    parser.add_argument("--device_target", default=None, choices=("CPU", "Ascend", "GPU"),
                        help="Overrides context.device_target (CPU on machines without Ascend).")
    parser.add_argument("--mode", default=None, type=int, help="context.mode: 0 graph (default), 1 PyNative.")
    parser.add_argument("--load_checkpoint", default=None, type=str,
                        help="Checkpoint file, or folder (complete ckpt, base + lora ckpts, or rank_x/ folders).")
    parser.add_argument("--src_strategy", default=None, type=str, help="Strategy of a distributed checkpoint.")
    parser.add_argument("--auto_trans_ckpt", default=None, type=str2bool, help="Transform checkpoints to the layout.")
    parser.add_argument("--vocab_file", default=None, type=str, help="Overrides processor.tokenizer.vocab_file.")
    return parser


def prepare_config(args, run_mode="predict"):
    """YAML + overrides, checked, with the MindSpore context set up; returns the ``MindFormerConfig``.

    Raises ``ValueError``/``FileNotFoundError`` with one line naming the field and the fix.
    """
    from baichuan2_config import load_config, resolve_path  # pylint: disable=import-outside-toplevel
    from baichuan2_run_setup import (  # pylint: disable=import-outside-toplevel
        apply_model_overrides, check_device, check_checkpoint)
    config = apply_model_overrides(load_config(args.config), args)
    config.run_mode = run_mode
    vocab = config.processor.tokenizer.vocab_file if config.processor and config.processor.tokenizer else None
    vocab = resolve_path(vocab, args.config) if vocab else vocab
    if not vocab or not os.path.isfile(vocab):
        raise FileNotFoundError(f"tokenizer file not found: {vocab!r} (pass --vocab_file path/to/tokenizer.model "
                                "or set processor.tokenizer.vocab_file in the yaml)")
    config.processor.tokenizer.vocab_file = vocab

    check_device(config)
    if config.use_parallel and config.context.device_target == "CPU":
        raise ValueError("use_parallel: True needs Ascend (multi-card inference shards the model); "
                         "on CPU pass --use_parallel False")
    model_config = config.model.model_config
    if config.load_checkpoint:
        if not os.path.exists(config.load_checkpoint):
            raise FileNotFoundError(f"load_checkpoint not found: {config.load_checkpoint} "
                                    "(a .ckpt file or a folder of .ckpt files or rank_x/ folders)")
        check_checkpoint(config.load_checkpoint, model_config, bool(model_config.pet_config), run_mode=run_mode)
    _setup_context(config)
    return config


def _setup_context(config):
    from mindformers import build_context  # pylint: disable=import-outside-toplevel
    import baichuan2_tokenizer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    build_context(config)


def build_tokenizer(config):
    """The YAML's ``Baichuan2Tokenizer`` (role ids from ``model_config.user/assistant_token_id`` if set)."""
    from baichuan2_tokenizer import Baichuan2Tokenizer  # pylint: disable=import-outside-toplevel
    tok_cfg = config.processor.tokenizer
    model_config = config.model.model_config
    kwargs = {}
    for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
        if tok_cfg.get(key) is not None:
            kwargs[key] = tok_cfg.get(key)
    for key in ("user_token_id", "assistant_token_id"):
        value = tok_cfg.get(key) if tok_cfg.get(key) is not None else model_config.get(key)
        if value is not None:
            kwargs[key] = int(value)
    return Baichuan2Tokenizer(vocab_file=tok_cfg.vocab_file, **kwargs)


def apply_lora(network, pet_config):
    """Inject MindFormers LoRA layers (``pet_config`` of a ``*_lora`` YAML) into ``network`` in place.

    Parameter names stay those of the checkpoints (``...attention.wq.mindpet_delta_lora_a``); the
    returned network is ``network`` itself, so its own ``generate()`` is used.
    """
    from mindformers.pet import get_pet_model  # pylint: disable=import-outside-toplevel
    pet = dict(pet_config)
    pet.setdefault("pet_type", "lora")
    if pet["pet_type"] != "lora":
        raise ValueError(f"model_config.pet_config.pet_type {pet['pet_type']!r} is not supported; use lora")
    get_pet_model(network, pet)             # as MindFormers' build_network; LoRA dtypes follow the layers
    return network


_RUNTIME_BUFFERS = ("key_past", "value_past", "inv_norm")


def _is_split_layout(path):
    """A ``rank_x/`` folder written by ``baichuan2_ckpt_layout`` (it carries a ``layout.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "layout.json"))


def load_weights(config, network):
    """Load ``config.load_checkpoint`` into ``network``.

    A ``rank_x/`` folder split for a dp/mp/pp layout by ``baichuan2_ckpt_layout`` (with its
    ``layout.json``) is merged back into the complete weights; everything else goes through
    MindFormers' ``transform_and_load_checkpoint``, as in the Trainer (a file, a folder of ``.ckpt``
    files, rank 0 of a ``rank_x/`` folder, or ``auto_trans_ckpt`` with a strategy).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    path = config.load_checkpoint
    if _is_split_layout(path) and not config.auto_trans_ckpt:
        import baichuan2_ckpt_layout  # pylint: disable=import-outside-toplevel
        params = baichuan2_ckpt_layout.load_complete(path)
        tensors = {name.replace("tk_delta", "mindpet_delta"): ms.Parameter(ms.Tensor(value), name=name)
                   for name, value in params.items()}
        not_loaded, _ = ms.load_param_into_net(network, tensors)
        missing = [name for name in not_loaded if not name.endswith(_RUNTIME_BUFFERS)]
        if missing:
            raise ValueError(f"checkpoint {path} (merged from its rank_x folders) lacks {missing[:3]}; "
                             "check --config (7B vs 13B, LoRA) or the checkpoint")
        return
    from mindformers.trainer.utils import transform_and_load_checkpoint  # pylint: disable=C0415
    transform_and_load_checkpoint(config, ms.Model(network), network, None, do_predict=True)


def build_inference_network(config, batch_size=1, use_past=None):
    """Network of the YAML for ``batch_size`` prompts at a time, LoRA applied, weights loaded, in eval mode."""
    from baichuan2_config import build_network  # pylint: disable=import-outside-toplevel
    overrides = {"batch_size": batch_size, "use_past": use_past}
    if config.load_checkpoint:
        overrides["checkpoint_name_or_path"] = ""        # loaded below, after LoRA layers exist
    network = build_network(config, **overrides)
    pet_config = config.model.model_config.pet_config
    if pet_config:
        network = apply_lora(network, pet_config)
    if config.load_checkpoint:
        load_weights(config, network)
    network.set_train(False)
    return network


def predict_network(config):
    """The network ``run_baichuan2.py --run_mode predict`` should hand to the Trainer, or None.

    Only needed for LoRA YAMLs: MindFormers would wrap the network in its ``PetModel``, whose
    ``generate()`` is MindFormers' (Ascend-only kernels on the cache path) instead of Baichuan2's.
    The returned network has the LoRA layers injected in place; the Trainer loads the weights.
    """
    if not config.model.model_config.pet_config:
        return None
    from baichuan2_config import build_network  # pylint: disable=import-outside-toplevel
    network = build_network(config, checkpoint_name_or_path="")
    return apply_lora(network, config.model.model_config.pet_config)
