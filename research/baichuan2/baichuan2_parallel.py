"""Parallel layout checks and pipeline-stage assignment, done before anything compiles.

``validate_parallel_config`` turns the errors MindSpore would report deep in graph compilation (or
never, hanging instead) into one line naming the numbers: ``dp*mp*pp`` against ``RANK_SIZE``, heads,
vocabulary and FFN width against ``mp``, layers and micro batches against ``pp``. On a backend without
operator or pipeline parallel (MindSpore's CPU backend; ``baichuan2_device`` decides) it says so plainly.

``layer_to_stage`` is the original's rule for which pipeline stage runs which decoder layer
(``min((l + offset) // max(int((L + 1) / pp), 1), pp - 1)``; MindFormers r1.0 ``mindformers/models/llama/llama.py``): 7B with ``pp=2`` splits
at layer 16, 13B gives 10/10/10/10 with ``pp=4`` and 20/20 with ``pp=2``. The embedding lives on stage
0, the final norm and the lm_head on the last stage.
"""
from baichuan2_names import config_value, ffn_width


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run with this model, world size or device."""


def _positive_int(value, field):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelConfigError(f"parallel_config.{field} must be a positive integer, got {value!r}")
    return value


def layer_to_stage(layer_id, num_layers, pp, offset=0):
    """Pipeline stage (0-based) of decoder layer ``layer_id`` out of ``num_layers`` with ``pp`` stages."""
    offset = 0 if offset is None else offset
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise ParallelConfigError(f"model_config.offset must be an integer here, got {offset!r} "
                                  "(per-stage offset lists are not supported by this plugin)")
    if not 0 <= layer_id < num_layers:
        raise ParallelConfigError(f"layer_id {layer_id} out of range for num_layers {num_layers}")
    if pp < 1:
        raise ParallelConfigError(f"pipeline_stage must be >= 1, got {pp}")
    per_stage = max(int((num_layers + 1) / pp), 1)
    return min((layer_id + offset) // per_stage, pp - 1)


def stage_layers(num_layers, pp, offset=0):
    """``[[layer ids of stage 0], [.. of stage 1], ...]`` under ``layer_to_stage``."""
    stages = [[] for _ in range(pp)]
    for layer_id in range(num_layers):
        stages[layer_to_stage(layer_id, num_layers, pp, offset)].append(layer_id)
    return stages


def validate_parallel_config(parallel_config, model_config, rank_size, device_target, batch_size,
                             run_mode=None):
    """Raise ``ParallelConfigError`` (a ``ValueError``) naming the numbers if the layout cannot run.

    Args:
        parallel_config: ``data_parallel``, ``model_parallel``, ``pipeline_stage``, ``micro_batch_num``
            (dict or MindFormerConfig; missing values count as 1).
        model_config: ``num_heads``, ``num_layers``, ``vocab_size``, ``hidden_size``,
            ``intermediate_size``/``multiple_of``, ``offset`` and (for predict) ``batch_size``.
        rank_size: number of processes (``RANK_SIZE``).
        device_target: "Ascend", "GPU" or "CPU".
        batch_size: ``runner_config.batch_size``, the batch of one data-parallel replica per step (per
            micro batch under pipeline parallel), as MindFormers defines it; the global batch is
            ``batch_size * dp`` (``* micro_batch_num`` with pipeline stages).
        run_mode: optional; "predict" also requires ``model_config.batch_size`` (the global inference
            batch) divisible by dp, and predict/eval refuse pipeline stages as the original does.
    Returns:
        ``(dp, mp, pp, micro_batch_num)``.
    """
    dp = _positive_int(config_value(parallel_config, "data_parallel", 1), "data_parallel")
    mp = _positive_int(config_value(parallel_config, "model_parallel", 1), "model_parallel")
    pp = _positive_int(config_value(parallel_config, "pipeline_stage", 1), "pipeline_stage")
    micro = _positive_int(config_value(parallel_config, "micro_batch_num", 1), "micro_batch_num")
    rank_size = int(rank_size)
    layout = f"data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp}"

    from baichuan2_device import device_capabilities  # pylint: disable=import-outside-toplevel
    caps = device_capabilities(device_target or "CPU")
    device_target = caps.device_target
    if mp > 1 and not caps.operator_parallel:
        raise ParallelConfigError(
            f"model_parallel {mp} cannot run on MindSpore's {device_target} backend (no semi-auto/operator "
            f"parallel there): set model_parallel 1 and pipeline_stage 1 and use data_parallel {rank_size} "
            f"(e.g. --dp {rank_size} --mp 1 --pp 1), or run on Ascend")
    if pp > 1 and not caps.pipeline_parallel:
        raise ParallelConfigError(
            f"pipeline_stage {pp} cannot run on MindSpore's {device_target} backend (no pipeline parallel "
            f"there): set pipeline_stage 1 and model_parallel 1 and use data_parallel {rank_size} "
            f"(e.g. --dp {rank_size} --mp 1 --pp 1), or run on Ascend")

    if dp * mp * pp != rank_size:
        raise ParallelConfigError(
            f"{layout} = {dp * mp * pp} devices, but RANK_SIZE is {rank_size}: the product must equal "
            "the number of ranks the launcher starts (fix parallel_config or RANK_SIZE)")

    heads = config_value(model_config, "num_heads")
    if heads is not None and heads % mp:
        raise ParallelConfigError(f"num_heads {heads} is not divisible by model_parallel {mp}")
    kv_heads = config_value(model_config, "n_kv_heads")
    if kv_heads is not None and kv_heads % mp:
        raise ParallelConfigError(f"n_kv_heads {kv_heads} is not divisible by model_parallel {mp}")
    vocab = config_value(model_config, "vocab_size")
    if vocab is not None and vocab % mp:
        raise ParallelConfigError(f"vocab_size {vocab} is not divisible by model_parallel {mp}")
    ffn = ffn_width(model_config)
    if ffn is not None and ffn % mp:
        raise ParallelConfigError(f"FFN width (intermediate_size) {ffn} is not divisible by model_parallel {mp}")

    layers = config_value(model_config, "num_layers")
    if layers is not None:
        if layers < pp:
            raise ParallelConfigError(f"num_layers {layers} is less than pipeline_stage {pp}: "
                                      "every stage needs at least one layer")
        offset = config_value(model_config, "offset", 0)
        empty = [stage for stage, ids in enumerate(stage_layers(layers, pp, offset)) if not ids]
        if empty:
            raise ParallelConfigError(f"with num_layers {layers}, pipeline_stage {pp} and offset {offset}, "
                                      f"stage(s) {empty} get no layer; change offset or pipeline_stage")
    if pp > 1 and micro < pp:
        raise ParallelConfigError(f"micro_batch_num {micro} is less than pipeline_stage {pp}: "
                                  "pipeline parallel needs micro_batch_num >= pipeline_stage")

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParallelConfigError(f"runner_config.batch_size must be a positive integer, got {batch_size!r}")
    if run_mode in ("predict", "eval") and pp > 1:
        raise ParallelConfigError(f"distributed {run_mode} does not support pipeline parallel "
                                  f"(pipeline_stage {pp}); use pipeline_stage 1")
    if run_mode == "predict":
        global_batch = config_value(model_config, "batch_size", 1)
        if global_batch % dp:
            raise ParallelConfigError(f"model_config.batch_size {global_batch} (the inference batch) is not "
                                      f"divisible by data_parallel {dp}")
    return dp, mp, pp, micro
