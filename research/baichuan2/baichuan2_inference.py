"""Inference set-up: YAML + flags -> MindSpore context, tokenizer, network with its weights.

One way for ``run_baichuan2_chat.py``, ``run_baichuan2_generate.py``, ``run_baichuan2_pipeline.py``
(and a server) to load exactly what ``run_baichuan2.py --run_mode predict`` loads:

* ``load_checkpoint`` a ``.ckpt``/``.safetensors`` file, a folder of them (a complete checkpoint,
  or a base checkpoint + a LoRA checkpoint side by side; complete ``.ckpt`` files are streamed into
  the network tensor by tensor, ``baichuan2_ckpt_reader``), or a folder of ``rank_x/`` folders (the
  output of a distributed run; rank 0's latest checkpoint is read on a single card, a split made by
  ``baichuan2_ckpt_layout`` is merged back), optionally through MindFormers' automatic transform
  (``auto_trans_ckpt`` + ``src_strategy``);
* a YAML with ``model_config.pet_config`` (the ``*_lora`` YAMLs) gets LoRA layers first. They are
  injected into the Baichuan2 network itself (parameter names unchanged), so generation stays on
  the portable Baichuan2 ``generate()``.

Checkpoint names and shapes are checked against the YAML before anything compiles (the same check
as the predict CLI), and every problem is one line (``UserInputError`` / ``FileNotFoundError``).
``setup_context`` is the one context set-up of every entry point, ``run_baichuan2.py`` included.
"""
import logging
import os

# Only light imports at module level: the chat script sets up its Ctrl-C handling before MindSpore loads.
from baichuan2_checkpoints import checkpoint_files, checkpoint_format, is_split_layout, rank_dirs
from baichuan2_cli import UserInputError, read_inputs
from baichuan2_config import apply_model_overrides, load_config
from baichuan2_ckpt_loader import check_all_loaded, load_ckpt_files, streams_checkpoint
from baichuan2_names import canonical_lora_name
from baichuan2_preflight import check_checkpoint, check_memory

logger = logging.getLogger("baichuan2")


def setup_context(config):
    """The MindSpore context of ``config`` for every entry point, with the device adaptations.

    ``adapt_parallel_for_device`` (use_parallel as data parallel where operator parallel cannot
    compile), MindFormers' ``build_context`` (the Trainer does not apply ``config.context``
    itself), the CPU patches of ``prepare_cpu_training``, and the Baichuan2 classes registered.
    """
    from mindformers import build_context  # pylint: disable=import-outside-toplevel
    import baichuan2_7b  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import baichuan2_13b  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import baichuan2_tokenizer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from baichuan2_trainer_setup import prepare_cpu_training, adapt_parallel_for_device  # pylint: disable=C0415
    adapt_parallel_for_device(config)
    build_context(config)
    prepare_cpu_training()


def prepare_config(args, run_mode="predict", batch_size=1, use_past=None):
    """YAML + overrides, checked, with the MindSpore context set up; returns the ``MindFormerConfig``.

    ``batch_size`` / ``use_past``: the network the script will build, for the memory pre-flight
    (``check_memory``; ``args.skip_memory_check`` skips its refusal).

    Raises ``UserInputError``/``FileNotFoundError`` with one line naming the field and the fix.
    """
    from baichuan2_device import check_device_available, parallel_inference_supported  # pylint: disable=C0415
    config = apply_model_overrides(load_config(args.config), args)
    config.run_mode = run_mode
    vocab = config.processor.tokenizer.vocab_file if config.processor and config.processor.tokenizer else None
    if not vocab or not os.path.isfile(vocab):
        raise FileNotFoundError(f"tokenizer file not found: {vocab!r} (pass --vocab_file path/to/tokenizer.model "
                                "or set processor.tokenizer.vocab_file in the yaml)")

    check_device_available(config.context.device_target)
    if config.use_parallel and not parallel_inference_supported(config.context.device_target):
        raise UserInputError("use_parallel: True needs Ascend (multi-card inference shards the model); "
                             "on CPU pass --use_parallel False")
    model_config = config.model.model_config
    if config.load_checkpoint:
        if not os.path.exists(config.load_checkpoint):
            raise FileNotFoundError(f"load_checkpoint not found: {config.load_checkpoint} "
                                    "(a .ckpt file or a folder of .ckpt files or rank_x/ folders)")
        check_checkpoint(config.load_checkpoint, model_config, bool(model_config.pet_config), run_mode=run_mode)
    from baichuan2_memory import CHECKPOINT_STREAM  # pylint: disable=import-outside-toplevel
    # load_weights streams complete .ckpt files: the plan counts one tensor in flight, not a second copy
    streamed = streams_checkpoint(config.load_checkpoint, config.auto_trans_ckpt)
    loading = {"load_checkpoint": CHECKPOINT_STREAM} if streamed else {}
    check_memory(config, run_mode, skip=getattr(args, "skip_memory_check", False), batch_size=batch_size,
                 use_past=use_past, **loading)
    setup_context(config)
    return config


def prepare_generation(args, batch_size=None):
    """``(prompts, config, tokenizer)`` of the generate/pipeline scripts (``--inputs`` and the model flags);
    ``batch_size``: rows the script generates at once (default: every prompt)."""
    prompts = read_inputs(args.inputs)
    config = prepare_config(args, batch_size=batch_size or len(prompts), use_past=args.use_past)
    return prompts, config, build_tokenizer(config)


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
        raise UserInputError(f"model_config.pet_config.pet_type {pet['pet_type']!r} is not supported; use lora")
    get_pet_model(network, pet)             # as MindFormers' build_network; LoRA dtypes follow the layers
    return network


def _load_params(network, params, source):
    """``params`` (``{name: Tensor/array}``, either LoRA spelling) into ``network``; every weight must be there."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    tensors = {canonical_lora_name(name): ms.Parameter(ms.Tensor(value) if not isinstance(value, ms.Tensor)
                                                       else value, name=canonical_lora_name(name))
               for name, value in params.items()}
    not_loaded, _ = ms.load_param_into_net(network, tensors)
    check_all_loaded(not_loaded, source)


def _transform_and_load(config, network):
    """MindFormers' ``transform_and_load_checkpoint``, as the Trainer calls it (rank_x layouts, auto_trans_ckpt).

    MindFormers >= 1.9 reads ``config.checkpoint.load_path``, which its Trainer fills from
    ``load_checkpoint`` (``convert_checkpoint_config``); outside the Trainer it is filled here.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindformers.trainer import utils  # pylint: disable=import-outside-toplevel
    convert_checkpoint_config = getattr(utils, "convert_checkpoint_config", None)     # None: mindformers 1.8
    if convert_checkpoint_config is not None and config.get("checkpoint") is None:
        convert_checkpoint_config(config)
    utils.transform_and_load_checkpoint(config, ms.Model(network), network, None, do_predict=True)


def load_weights(config, network):
    """Load ``config.load_checkpoint`` into ``network`` (LoRA layers already injected).

    * a ``.ckpt`` file, or a folder of complete ``.ckpt`` files (base + LoRA side by side), without
      ``auto_trans_ckpt``: streamed tensor by tensor (``baichuan2_ckpt_loader``: peak = network + the
      largest tensor), later files win, ``tk_delta`` -> ``mindpet_delta``; every weight must be found;
    * the same with ``.safetensors`` files among them: read with ``mindspore.load_checkpoint`` (later
      files win) and loaded with ``load_param_into_net``;
    * a ``rank_x/`` folder split by ``baichuan2_ckpt_layout`` (with its ``layout.json``): merged
      back into the complete weights;
    * anything else (other ``rank_x/`` folders, ``auto_trans_ckpt`` with a strategy): MindFormers'
      ``transform_and_load_checkpoint``, as in the Trainer.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    path = config.load_checkpoint
    if not config.auto_trans_ckpt:
        if is_split_layout(path):
            import baichuan2_ckpt_layout  # pylint: disable=import-outside-toplevel
            _load_params(network, baichuan2_ckpt_layout.load_complete(path), f"{path} (merged from its rank_x folders)")
            return
        if streams_checkpoint(path):
            load_ckpt_files(network, checkpoint_files(path), path)
            return
        if not rank_dirs(path):
            params = {}
            for file in checkpoint_files(path):
                params.update(ms.load_checkpoint(file, format=checkpoint_format(file)))
            _load_params(network, params, path)
            return
    _transform_and_load(config, network)


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
