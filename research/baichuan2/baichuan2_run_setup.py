"""``run_baichuan2.py``'s run: config, pre-flight checks, device adaptation, Trainer dispatch.

The configuration flows one way: the YAML is read, the command-line overrides are applied, the
checks (``baichuan2_preflight``) report what they found without changing it, the config is adapted
to the device (the one documented rewrite, ``adapt_to_device``), and the Trainer runs.

The checks run on the plain YAML (``read_yaml_config``) before MindFormers is even imported, so a
wrong path or dataset is reported in a few seconds; the run itself uses MindFormers' own
``MindFormerConfig`` of the same file (its run-mode templates fill the defaults), with the same
overrides (``apply_overrides``).
"""
import logging
import os

from baichuan2_checkpoints import needs_layout_transform
from baichuan2_config import apply_overrides, load_config, read_yaml_config
from baichuan2_packing import apply_dataset_columns
from baichuan2_preflight import PreflightError, check_memory, check_run_inputs, check_tokenizer_file

logger = logging.getLogger("baichuan2")


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
    """``(config, inputs)``: the overridden ``MindFormerConfig`` with the context set up, and the
    ``RunInputs`` the checks found (checkpoint to load, resume file, prompts)."""
    from baichuan2_inference import setup_context  # pylint: disable=import-outside-toplevel
    if args.run_mode == "export":
        raise PreflightError("--run_mode export (MindSpore Lite MindIR for Ascend inference) is not supported by "
                             "this plugin; use train/finetune/eval/predict")
    early = read_yaml_config(args.config)
    inputs = None
    if early is not None:                   # data and checkpoints checked before MindFormers loads
        inputs = check_run_inputs(apply_overrides(early, args), args.run_mode, args.predict_data)
    config = apply_overrides(load_config(args.config), args)
    if inputs is None:                      # a yaml with base_config: checked on the full config
        inputs = check_run_inputs(config, args.run_mode, args.predict_data)
    check_memory(early if early is not None else config, args.run_mode, skip=args.skip_memory_check)
    tokenizer = config.processor.tokenizer if config.processor else None
    if tokenizer and tokenizer.vocab_file:
        check_tokenizer_file(tokenizer.vocab_file, required=args.run_mode in ("predict", "eval"))
    use_checkpoint_monitor_name(config)
    if config.use_parallel:
        from baichuan2_parallel import validate_parallel_config  # pylint: disable=import-outside-toplevel
        validate_parallel_config(config.parallel_config, config.model.model_config, int(os.getenv("RANK_SIZE", "1")),
                                 config.context.device_target, config.runner_config.batch_size,
                                 run_mode=args.run_mode)
    setup_context(config)
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    mode = "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "PyNative"
    print(f"MindSpore context: {mode} mode on {ms.get_context('device_target')}", flush=True)
    return config, inputs


def checkpoint_for_device(config, load_checkpoint):
    """``(checkpoint the Trainer loads, auto_trans_ckpt)`` on this device.

    ``auto_trans_ckpt`` on a device without operator parallel (CPU): MindFormers' automatic
    transform needs the strategy files that a semi-auto parallel compile writes, which cannot exist
    here. Instead this rank's checkpoint is cut from a complete checkpoint (or re-laid from a
    ``rank_x/`` folder) by the strategy-free layout transform of ``baichuan2_ckpt_layout`` into
    ``output_dir/transformed_checkpoint/``, and loaded as is. A folder of several complete
    checkpoints (base + LoRA) needs no transform.
    """
    from baichuan2_device import device_capabilities  # pylint: disable=import-outside-toplevel
    auto_trans = bool(config.auto_trans_ckpt)
    if not (auto_trans and load_checkpoint) or device_capabilities(config.context.device_target).operator_parallel:
        return load_checkpoint, auto_trans
    if not needs_layout_transform(load_checkpoint):
        return load_checkpoint, False
    from baichuan2_ckpt_layout import checkpoint_for_rank  # pylint: disable=import-outside-toplevel
    parallel = config.parallel_config if config.use_parallel else {}
    rank_id = int(os.getenv("RANK_ID", "0")) if config.use_parallel else 0
    path = checkpoint_for_rank(
        load_checkpoint, config.output_dir or "./output", parallel.get("data_parallel") or 1,
        parallel.get("model_parallel") or 1, parallel.get("pipeline_stage") or 1, rank_id,
        src_strategy=config.src_strategy_path_or_dir or None)
    logger.info("auto_trans_ckpt: rank %d loads %s", rank_id, path)
    return path, False


def adapt_checkpoint_to_device(config, inputs):
    """The checkpoint part of the device adaptation: ``config.load_checkpoint`` / ``auto_trans_ckpt``
    become what the Trainer loads here (``checkpoint_for_device``). The one rewrite after the checks."""
    config.load_checkpoint, config.auto_trans_ckpt = checkpoint_for_device(config, inputs.load_checkpoint)


def run_trainer(config, args, inputs):
    """Dispatch ``--run_mode`` to ``mindformers.Trainer`` as the original script does."""
    from mindformers import Trainer  # pylint: disable=import-outside-toplevel
    adapt_checkpoint_to_device(config, inputs)
    apply_dataset_columns(config, args.run_mode)     # packed MindRecords (position_ids) train as packed
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
        result = trainer.predict(input_data=inputs.prompts, predict_checkpoint=ckpt,
                                 auto_trans_ckpt=config.auto_trans_ckpt, **kwargs)
        logger.info(result)
        print(result, flush=True)
