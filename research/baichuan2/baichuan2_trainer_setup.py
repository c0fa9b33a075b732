"""Everything MindFormers' Trainer needs to run Baichuan2 configs here, in one place.

* ``FP32StateAdamWeightDecay``: the optimizer the original YAMLs name. MindFormers 1.8 dropped it;
  this registers the name again as MindFormers' ``AdamW`` (fp32 moments) with the original
  ``beta1``/``beta2``/``eps``/``weight_decay`` keys, so the YAMLs keep working unchanged. Where the
  device module says so (CPU, fp32 weights) it is ``baichuan2_optim.FusedAdamW``, the same AdamW
  step as one kernel per weight.
* ``TokenPerplexityMetric``: perplexity over tokens, ``exp(sum NLL / number of counted tokens)``
  over the whole dataset (MindFormers' ``PerplexityMetric`` averages per-batch means instead).
* ``prepare_cpu_training()``: MindSpore's loss-scale wrapper checks overflow with
  ``NPUGetFloatStatusV2``, an Ascend-only kernel. On CPU only, the check is replaced by
  ``IsFinite`` + ``ReduceAll`` over the gradients, which tells the same thing.
"""
import logging
import math

import numpy as np

from mindspore import nn, ops, Tensor
from mindspore import dtype as mstype
from mindspore.train.callback import Callback
from mindformers.core.callback import CheckpointMonitor
from mindformers.core.optim import AdamW
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from baichuan2_device import (check_parallel_supported, device_capabilities, needs_portable_training_ops,
                              use_fused_adam)
from baichuan2_optim import FusedAdamW

logger = logging.getLogger("baichuan2")


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class FP32StateAdamWeightDecay:
    """AdamW with fp32 first/second moments, configured with the original YAML keys."""

    def __new__(cls, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, **kwargs):
        unknown = set(kwargs) - {"param_init_type"}
        if unknown:
            raise TypeError(f"FP32StateAdamWeightDecay got unexpected YAML keys {sorted(unknown)}")
        optimizer = FusedAdamW if use_fused_adam(_weight_dtypes(params)) else AdamW
        return optimizer(params, learning_rate=learning_rate, betas=(beta1, beta2), eps=eps,
                         weight_decay=weight_decay)


def _weight_dtypes(params):
    """The dtypes of an optimizer's ``params``: a list of Parameters, or of groups ``{"params": [...]}``
    (``order_params`` only reorders the groups' weights)."""
    weights = []
    for item in params:
        if isinstance(item, dict):
            weights.extend(item.get("params", ()))
        else:
            weights.append(item)
    return [weight.dtype for weight in weights]


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class CheckpointMointor(CheckpointMonitor):
    """The original YAMLs' (misspelt) name of MindFormers' ``CheckpointMonitor``; same arguments."""


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class ObsMonitor(Callback):
    """The original YAMLs' ModelArts OBS upload callback, gone from MindFormers 1.8.

    Outside ModelArts it never did anything; here it stays inert so those YAMLs load, and says so
    once if an upload was asked for.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        if kwargs.get("remote_save_url") or args:
            logger.warning("ObsMonitor: uploading to OBS (ModelArts) is not supported here; nothing is uploaded.")


def _portable_overflow_status(self, status, compute_output):  # pylint: disable=unused-argument
    """Overflow = some gradient is inf/nan; all-reduced over data-parallel ranks (``status`` unused)."""
    finite = ops.stack([ops.isfinite(grad).all() for grad in compute_output]).all()
    overflow = ops.logical_not(finite)
    if self.is_distributed:
        overflow = ops.cast(self.allreduce(ops.cast(overflow, mstype.float32)), mstype.bool_)
    return overflow


def _allreduce_barrier(group=None):
    """Barrier from an AllReduce, which MindSpore's CPU backend has (its ``Barrier`` kernel is missing)."""
    from mindspore.communication import GlobalComm  # pylint: disable=import-outside-toplevel
    ops.AllReduce(group=group or GlobalComm.WORLD_COMM_GROUP)(Tensor(np.ones(1, np.float32))).asnumpy()


# MindFormers modules that imported ``barrier`` by name and call it on data-parallel paths.
_BARRIER_USERS = ("mindformers.trainer.utils", "mindformers.core.callback.callback",
                  "mindformers.utils.load_checkpoint_utils", "mindformers.version_control")


def prepare_cpu_training():
    """Make MindFormers' training paths run on CPU (no-op on Ascend/GPU).

    * the loss-scale wrappers' overflow check (``NPUGetFloatStatusV2``) -> IsFinite + ReduceAll;
    * ``comm_func.barrier`` (no CPU kernel), called when loading a checkpoint with
      ``use_parallel`` -> an AllReduce barrier.
    """
    if not needs_portable_training_ops():
        return
    nn.TrainOneStepWithLossScaleCell.get_overflow_status = _portable_overflow_status
    import importlib  # pylint: disable=import-outside-toplevel
    for name in _BARRIER_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "barrier"):
            module.barrier = _allreduce_barrier


def adapt_parallel_for_device(config):
    """On a device without operator/pipeline parallel, run ``use_parallel`` as plain data parallel.

    The original YAMLs ask for semi-auto parallel (``parallel_mode: 1``, ``full_batch: True``), which
    MindSpore's CPU backend cannot compile. With ``model_parallel == pipeline_stage == 1`` that layout
    is pure data parallelism, so it is run in ``data_parallel`` mode: each rank reads its own shard
    of the data and gradients are averaged. Anything else is refused with a plain message.
    """
    caps = device_capabilities(config.context.device_target)
    if not config.use_parallel or caps.operator_parallel:
        return
    parallel_config = config.parallel_config
    check_parallel_supported(parallel_config.model_parallel or 1, parallel_config.pipeline_stage or 1)
    parallel = config.parallel
    if parallel.parallel_mode not in (0, "data_parallel"):
        logger.info("%s: running parallel_mode %s as data_parallel (model_parallel = pipeline_stage = 1)",
                    caps.device_target, parallel.parallel_mode)
    parallel.parallel_mode = 0
    parallel.full_batch = False
    parallel.gradients_mean = True
    parallel.enable_parallel_optimizer = False
    parallel.pop("search_mode", None)
    parallel.pop("strategy_ckpt_save_file", None)
    parallel.pop("strategy_ckpt_config", None)


@MindFormerRegister.register(MindFormerModuleType.METRIC)
class TokenPerplexityMetric(nn.Metric):
    """Token-level perplexity of a causal LM over a dataset.

    ``update(logits (B, S, V), tokens (B, S), input_mask (B, S))`` (the network's eval outputs) adds
    the NLL of ``tokens[:, 1:]`` under ``logits[:, :-1]`` where ``input_mask[:, 1:]`` is set;
    ``eval()`` returns ``{"loss": mean NLL per token, "PPL": exp(loss), "tokens": count}``.
    """

    def __init__(self):
        super().__init__()
        self.total_nll = 0.0
        self.count = 0

    def clear(self):
        self.total_nll = 0.0
        self.count = 0

    def update(self, *inputs):
        logits, tokens, input_mask = (x.asnumpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs[:3])
        for row_logits, row_tokens, row_mask in zip(logits, tokens, input_mask):
            keep = row_mask[1:] > 0
            if not keep.any():
                continue
            scores = row_logits[:-1][keep].astype(np.float64)                    # (N, V)
            targets = row_tokens[1:][keep].astype(np.int64)
            peak = scores.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(scores - peak).sum(axis=-1)) + peak[:, 0]
            self.total_nll += float((log_norm - scores[np.arange(len(targets)), targets]).sum())
            self.count += int(keep.sum())

    def eval(self):
        if self.count == 0:
            raise ValueError("TokenPerplexityMetric: no token was counted (empty dataset or all masked)")
        loss = self.total_nll / self.count
        result = {"loss": loss, "PPL": math.exp(loss), "tokens": self.count}
        logger.info("perplexity: %s", result)
        print(f"Perplexity: {result}", flush=True)
        return result
