"""Pre-flight checks: everything that can be checked before MindSpore compiles anything.

A wrong path, a dataset made for another ``seq_length``, a checkpoint of another model or a
``--resume`` without a checkpoint costs a second, not a compile, and is reported as one line
naming the file, the field and the fix (``PreflightError``, a ``UserInputError``).

The checks are functions of a config (plain ``YamlConfig`` or ``MindFormerConfig``) and files:
they return what they found and never rewrite their inputs. The checks on data and checkpoints
read only headers (``baichuan2_ckpt_index``) and one MindRecord row.

``--resume``: training continues from the last checkpoint of ``output_dir/checkpoint`` (or of
``--load_checkpoint``): MindFormers restores the weights, the optimizer moments, ``global_step``
(hence the learning-rate schedule), the loss scale, and skips the data already seen.
"""
from dataclasses import dataclass, field
import glob
import logging
import os
import re

import numpy as np

from baichuan2_checkpoints import checkpoint_files, last_checkpoint
from baichuan2_ckpt_index import CheckpointIndexError, checkpoint_shapes
from baichuan2_cli import UserInputError, read_prompts
from baichuan2_names import (DEFAULT_LORA_TARGETS, LINEAR_CELLS, RESUME_KEYS, canonical_lora_name, ffn_width,
                             is_lora_name, is_runtime_buffer, is_train_state)
from baichuan2_weights import expected_ms_shapes

logger = logging.getLogger("baichuan2")


class PreflightError(UserInputError):
    """A problem with the command line, the YAML, the data or the checkpoint, found before compiling."""


@dataclass
class RunInputs:
    """What the checks of one ``run_baichuan2.py`` run found (the config itself is left as it was).

    Attributes:
        load_checkpoint: what the Trainer loads ("" for none): ``config.load_checkpoint``, or for
            ``--resume`` the checkpoint to continue from (a ``rank_x/`` folder stays a folder).
        resume_checkpoint: the file ``--resume`` continues from (this rank's), or None.
        prompts: the ``--predict_data`` prompts (a prompt file read once), or [].
    """
    load_checkpoint: str = ""
    resume_checkpoint: str = None
    prompts: list = field(default_factory=list)


def check_tokenizer_file(vocab_file, required=True):
    """``processor.tokenizer.vocab_file`` must exist where a tokenizer is built (predict, eval, chat)."""
    if required and not (vocab_file and os.path.isfile(vocab_file)):
        raise PreflightError(f"tokenizer file not found: {vocab_file} (pass --vocab_file path/to/tokenizer.model)")


def mindrecord_files(path, field):
    """The MindRecord files of a dataset folder or file; raises if there are none."""
    if not path:
        raise PreflightError(f"no dataset given: pass --{field} DIR or set {field}.data_loader.dataset_dir "
                             "in the yaml (a folder made by belle_preprocess.py).")
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise PreflightError(f"{field} not found: {path} (pass the folder that holds the .mindrecord files)")
    files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                   if not f.endswith(".db") and os.path.isfile(f + ".db"))
    if not files:
        raise PreflightError(f"{field} {path} holds no MindRecord file (run belle_preprocess.py to make one)")
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
        raise PreflightError(f"{field} {files[0]} has no records")
    missing = [c for c in columns if c not in row]
    if missing:
        raise PreflightError(f"{field} {files[0]}: column(s) {missing} missing (has {sorted(row)}); fix "
                             f"{field}.input_columns in the yaml or remake the dataset")
    length = len(np.asarray(row[columns[0]]).reshape(-1))
    if length != seq_length + 1:
        raise PreflightError(f"{field} {files[0]}: records have {length} tokens but model.model_config.seq_length "
                             f"is {seq_length}, which needs {seq_length + 1}; rerun belle_preprocess.py with "
                             f"--seq_length {length - 1 if length > 1 else seq_length} matching the yaml, "
                             f"or pass --seq_length {length - 1}")
    return files


def expected_weight_shapes(model_config):
    """``{MindSpore name: shape}`` of the network a model_config builds."""
    return expected_ms_shapes({"vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
                               "intermediate_size": ffn_width(model_config),
                               "num_hidden_layers": model_config.num_layers,
                               "num_attention_heads": model_config.num_heads})


def _lora_target(name, target_modules, exclude_layers):
    """Whether mindformers' LoraAdapter wraps the Linear of weight ``name`` (``...<cell>.weight``).

    The adapter walks the cell tree from the network: at each level a child whose name matches
    ``exclude_layers`` is skipped, a child whose name matches ``target_modules`` (``re.match``) is
    replaced if it is a Linear and left alone (not entered) otherwise; other children are entered.
    """
    cells = name.split(".")[:-1]
    if not cells or cells[-1] not in LINEAR_CELLS:
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
    targets = pet_config.get("target_modules") or DEFAULT_LORA_TARGETS
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
            raise PreflightError(f"cannot read checkpoint {file}: {error}; pass a checkpoint written by "
                                 "convert_weight.py or by training") from None
        found.update({canonical_lora_name(name): shape for name, shape in shapes.items()})
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
    weights = {n: s for n, s in found.items() if not is_train_state(n) and not is_runtime_buffer(n)}
    lora_names = [n for n in weights if is_lora_name(n)]
    if lora_names and not lora:
        raise PreflightError(f"checkpoint {path} holds LoRA weights ({lora_names[0]}, ...) but the yaml has no "
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
            raise PreflightError(f"checkpoint {path} does not fit the LoRA network of the yaml ({detail}); check "
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
        raise PreflightError(f"checkpoint {path} holds LoRA weights only; put the base checkpoint and the LoRA "
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
        raise PreflightError(f"checkpoint {path} does not fit the network of the yaml ({'; '.join(parts)}); "
                             "check --config (7B vs 13B, seq/vocab/hidden sizes) or the checkpoint")


def resolve_resume(config, run_mode):
    """For ``--resume``: ``(what the Trainer loads, the checkpoint file training continues from)``, or
    ``(None, None)`` without ``--resume``.

    ``load_checkpoint`` defaults to ``<output_dir>/checkpoint`` (where the previous run saved). A
    folder with ``rank_x/`` sub-folders is loaded as is (MindFormers picks each rank's checkpoint
    from its ``meta.json``); a folder of ``.ckpt`` files means its newest file.
    """
    resume = config.resume_training
    if not resume:
        return None, None
    if run_mode not in ("train", "finetune"):
        raise PreflightError(f"--resume applies to --run_mode train/finetune, not {run_mode}")
    path = config.load_checkpoint or os.path.join(config.output_dir or "./output", "checkpoint")
    if os.path.isfile(path):
        return path, path
    if not os.path.isdir(path):
        raise PreflightError(f"--resume: no checkpoint to resume from, {path} does not exist; resume needs the "
                             "checkpoint folder of an earlier run (same --output_dir, or --load_checkpoint "
                             "OUTPUT/checkpoint or a .ckpt file)")
    rank_dir = os.path.join(path, f"rank_{int(os.getenv('RANK_ID', '0'))}")
    if os.path.isdir(rank_dir):
        if isinstance(resume, str):
            name = resume if resume.endswith(".ckpt") else resume + ".ckpt"
            ckpt = os.path.join(rank_dir, name)
            if not os.path.isfile(ckpt):
                raise PreflightError(f"resume_training names {name}, which is not in {rank_dir}")
            return path, ckpt
        ckpt = last_checkpoint(rank_dir)
        if ckpt is None:
            raise PreflightError(f"--resume: no checkpoint to resume from in {rank_dir} yet; train without "
                                 "--resume first")
        return path, ckpt
    ckpt = last_checkpoint(path)
    if ckpt is None:
        raise PreflightError(f"--resume: no checkpoint to resume from in {path} (nor a rank_0/ folder); train "
                             "without --resume first, or pass --load_checkpoint")
    return ckpt, ckpt


def check_memory(config, run_mode, skip=False, **overrides):
    """The memory pre-flight: plan the run (``baichuan2_memory``) before anything is built.

    In host RAM (CPU) a run whose plan exceeds the available memory is refused with one line
    (needed vs available, the biggest part, the fix), unless ``skip`` (``--skip_memory_check True``);
    on a device, a plan over ``max_device_memory`` is a one-line warning naming the planner (the
    device's own allocator has the last word). ``overrides``: ``baichuan2_memory.plan`` keywords such
    as the batch size the script builds. Returns the message.
    """
    import sys  # pylint: disable=import-outside-toplevel
    from baichuan2_device import memory_is_host_ram  # pylint: disable=import-outside-toplevel
    from baichuan2_memory import preflight  # pylint: disable=import-outside-toplevel
    host = memory_is_host_ram(config.context.device_target)
    if host and "mindspore" in sys.modules:   # the framework is already resident (not available): not planned again
        overrides.setdefault("framework_bytes", 0)
    fits, message = preflight(config, run_mode, **overrides)
    if fits:
        logger.info("%s", message)
    elif not host:
        logger.warning("%s (see research/baichuan2/plan_memory.py)", message)
    elif skip:
        logger.warning("%s; going on (--skip_memory_check True)", message)
    else:
        raise PreflightError(f"{message} (research/baichuan2/plan_memory.py explains the plan; pass "
                             "--skip_memory_check True to run anyway)")
    return message


def check_run_inputs(config, run_mode, predict_data=None):
    """Device, data, prompts and checkpoint of a ``run_baichuan2.py`` run; returns ``RunInputs``.

    ``config`` (already overridden) is read, not changed.
    """
    from baichuan2_device import check_device_available  # pylint: disable=import-outside-toplevel
    check_device_available(config.context.device_target)
    model_config = config.model.model_config
    lora = bool(model_config.pet_config)
    load_checkpoint, resume_ckpt = resolve_resume(config, run_mode)
    if run_mode in ("train", "finetune"):
        check_dataset(config.train_dataset.data_loader.dataset_dir, "train_dataset", model_config.seq_length,
                      list(config.train_dataset.input_columns))
    if run_mode == "eval":
        check_dataset(config.eval_dataset.data_loader.dataset_dir, "eval_dataset", model_config.seq_length,
                      list(config.eval_dataset.input_columns))
    prompts = []
    if run_mode == "predict":
        if not predict_data:
            raise PreflightError("--predict_data is required for --run_mode predict (prompts or a text file)")
        prompts = read_prompts(predict_data, "--predict_data")   # a prompt file: read here, once
    if resume_ckpt:
        found = check_checkpoint(resume_ckpt, model_config, lora, run_mode)
        if not any(key in found for key in RESUME_KEYS):
            raise PreflightError(f"--resume: {resume_ckpt} holds weights only (no step/optimizer state, e.g. a "
                                 "converted model); start from it with --load_checkpoint and without --resume")
        logger.info("resuming from %s", resume_ckpt)
    else:
        load_checkpoint = config.load_checkpoint or ""
        if load_checkpoint:
            check_checkpoint(load_checkpoint, model_config, lora, run_mode)
    return RunInputs(load_checkpoint=load_checkpoint, resume_checkpoint=resume_ckpt, prompts=prompts)
