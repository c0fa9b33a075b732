"""Stream complete MindSpore ``.ckpt`` files into a network, tensor by tensor.

``mindspore.load_checkpoint`` builds a dict holding a copy of every tensor before
``load_param_into_net`` copies them into the network: the peak is twice the weights (28 GB for
Baichuan2-7B in fp16, more than a 24 GB host has). Here each tensor is read from the mapped file
(``baichuan2_ckpt_reader``), checked, cast as ``load_param_into_net`` would and handed to its
parameter before the next one is read: the peak is the network's weights plus the largest tensor.
``baichuan2_inference.load_weights`` uses it for complete ``.ckpt`` files.
"""
import logging

from baichuan2_checkpoints import CheckpointSourceError, checkpoint_files, checkpoint_format, is_split_layout, rank_dirs
from baichuan2_cli import UserInputError
from baichuan2_names import canonical_lora_name, is_runtime_buffer

logger = logging.getLogger("baichuan2")


def check_all_loaded(not_loaded, source):
    """One line naming what ``source`` lacks (runtime buffers such as the KV cache are never loaded)."""
    missing = [name for name in not_loaded if not is_runtime_buffer(name)]
    if missing:
        raise UserInputError(f"checkpoint {source} lacks {missing[:3]}; check --config (7B vs 13B, LoRA) or the "
                             "checkpoint")


def streams_checkpoint(path, auto_trans_ckpt=False):
    """Whether ``load_weights`` streams ``path`` tensor by tensor: complete ``.ckpt`` files only (a file or a
    folder of them), not ``.safetensors``, ``rank_x/`` layouts or ``auto_trans_ckpt``. Pure ``os``."""
    if not path or auto_trans_ckpt or is_split_layout(path) or rank_dirs(path):
        return False
    try:
        files = checkpoint_files(path)
    except CheckpointSourceError:
        return False
    return bool(files) and all(checkpoint_format(file) == "ckpt" for file in files)


def prefixed_names(ckpt_names, not_loaded):
    """``{checkpoint name: network name}`` for network parameters ``not_loaded`` found under a name prefix.

    ``load_param_into_net``'s rule (``_load_dismatch_prefix_params``): the prefix is what precedes the
    first not-loaded name that some checkpoint name ends with; every not-loaded name found under that
    prefix maps to it; repeated until no new prefix appears.
    """
    ckpt_names = list(ckpt_names)
    present = set(ckpt_names)
    remaining, found, tried = list(not_loaded), {}, set()
    while remaining:
        prefix = next((ckpt[:-len(net)] for net in remaining for ckpt in ckpt_names
                       if ckpt.endswith(net) and ckpt != net), None)
        if prefix is None or prefix in tried:
            break
        tried.add(prefix)
        for net in list(remaining):
            if prefix + net in present:
                found[prefix + net] = net
                remaining.remove(net)
    return found


# load_param_into_net casts within these families (``_type_convert``); dtype names are MindSpore's
# ``str(dtype)``, which is also the ``tensor_type`` string save_checkpoint writes.
_FLOAT_TYPES = {"Float16", "Float32", "Float64", "BFloat16"}
_INT_TYPES = {"Int8", "Int16", "Int32", "Int64", "Int4"}


def _set_parameter(param, value, tensor_type, file):
    """``param.set_data`` from ``value`` of dtype ``tensor_type`` ("Float16", ...): a numpy array from
    ``baichuan2_ckpt_reader`` or a MindSpore Tensor.

    The shape must match (trailing 1s are squeezed, as ``load_param_into_net`` does). A float (int) value
    of another float (int) dtype is cast to the parameter's dtype as ``load_param_into_net`` does
    (``Tensor(array, param.dtype)``); any other dtype difference is an error. A read-only array is a view
    of the checkpoint file, at whatever (unaligned) offset protobuf put it, which MindSpore cannot cast
    from and the network must not keep mapped: it is copied once into an aligned array of its own. A
    writable array (the reader's join of a sliced tensor, or that copy) is handed over without another copy.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    if not isinstance(value, (ms.Tensor, np.ndarray)):
        raise UserInputError(f"checkpoint {file}: {param.name} holds a {type(value).__name__}, not a tensor")
    shape, want = tuple(value.shape), tuple(param.shape)
    if shape != want:
        if len(shape) > len(want) and shape[:len(want)] == want and all(d == 1 for d in shape[len(want):]):
            value = value.reshape(want)
        else:
            raise UserInputError(f"checkpoint {file}: {param.name} has shape {list(shape)} but the network's "
                                 f"parameter has {list(want)}; check --config (7B vs 13B, vocab_size) or the "
                                 "checkpoint")
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = np.array(value)                         # the one copy of this tensor (aligned, private)
    target = str(param.dtype)
    if tensor_type != target:
        if not ({tensor_type, target} <= _FLOAT_TYPES or {tensor_type, target} <= _INT_TYPES):
            raise UserInputError(f"checkpoint {file}: {param.name} is {tensor_type} but the network's parameter is "
                                 f"{target}; check --config (param_init_type) or the checkpoint")
        data = ms.Tensor(value.asnumpy() if isinstance(value, ms.Tensor) else value, param.dtype)
    elif isinstance(value, ms.Tensor):
        data = value
    else:
        data = ms.Tensor.from_numpy(value)              # shares the array: no second copy
    param.set_data(data, param.sliced)
    if hasattr(param, "init_param") and not param.init_param:
        param.init_param = True


def _ckpt_entries(file):
    """``(names, items, close)`` of the ``.ckpt`` ``file``: ``items`` yields ``(name, value, tensor_type)``.

    Streamed by ``baichuan2_ckpt_reader``; a file holding entries it does not parse (map tensors) is read
    with ``mindspore.load_checkpoint`` instead (a full copy of that file).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from baichuan2_ckpt_reader import CheckpointFile, UnsupportedCheckpointError  # pylint: disable=C0415
    try:
        ckpt = CheckpointFile(file)
    except UnsupportedCheckpointError as error:
        logger.info("%s: reading it with mindspore.load_checkpoint instead", error)
        entries = []
        for name, value in ms.load_checkpoint(file).items():
            value = value.data if isinstance(value, ms.Parameter) else value
            entries.append((name, value, "str" if isinstance(value, str) else str(getattr(value, "dtype", ""))))
        return [name for name, _, _ in entries], iter(entries), lambda: None
    return [entry.name for entry in ckpt.entries], iter(ckpt), ckpt.close


def load_ckpt_files(network, files, source):
    """Stream the complete ``.ckpt`` ``files`` into ``network`` tensor by tensor (later files win).

    Peak memory: the network's weights plus one tensor (``baichuan2_ckpt_reader``), not a second copy
    of the checkpoint. Names take the ``tk_delta`` -> ``mindpet_delta`` rename and, for parameters not
    found as such, ``load_param_into_net``'s prefix rule; runtime buffers (KV cache) and strings are
    never loaded; every other parameter must be found (``accu_grads`` excepted, as MindSpore does).
    """
    params = network.parameters_dict()
    loaded, unexpected = set(), []
    for file in files:
        names, items, close = _ckpt_entries(file)
        try:
            canonical = [canonical_lora_name(name) for name in names]
            present = set(canonical)
            renamed = prefixed_names(canonical, [n for n in params if n not in loaded and n not in present])
            for name, value, tensor_type in items:
                name = canonical_lora_name(name)
                target = name if name in params else renamed.get(name)
                if target is None or is_runtime_buffer(target) or tensor_type == "str":
                    unexpected.append(name)
                else:
                    _set_parameter(params[target], value, tensor_type, file)
                    loaded.add(target)
                del value                      # the previous tensor's memory goes before the next is read
        finally:
            close()
    if unexpected:
        logger.info("checkpoint %s: %d entries are not network weights, not loaded (%s%s)", source,
                    len(unexpected), ", ".join(unexpected[:3]), ", ..." if len(unexpected) > 3 else "")
    check_all_loaded([name for name in params if name not in loaded and not name.startswith("accu_grads")],
                      source)
