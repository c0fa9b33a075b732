"""Baichuan2 weights: HF <-> MindSpore shapes, checks and the streaming converters (names: ``baichuan2_names``).

Used by ``convert_weight.py`` / ``convert_reversed.py`` (both directions) and by the tests.
The specification is the original converter, MindFormers r1.0 ``research/baichuan/convert_weight.py``
(and ``research/baichuan2/convert_reversed.py`` of r1.1.0 for the reverse). Notation: ``V`` vocab_size, ``h`` hidden_size,
``I`` intermediate_size, ``L`` num_hidden_layers, ``i`` a layer index. All Linear weights are
``[out, in]`` on both sides, so nothing is transposed; the only structural change is the fused
QKV: HF ``model.layers.i.self_attn.W_pack.weight`` ``[3h, h]`` <-> MindSpore
``model.layers.i.attention.{wq,wk,wv}.weight`` ``[h, h]`` each (rows ``[0:h)`` q, ``[h:2h)`` k,
``[2h:3h)`` v). ``lm_head.weight`` is stored raw (not row-normalised) on both sides.

Pure name/shape helpers need neither torch nor mindspore. The streaming converters
(:func:`convert_hf_to_ms`, :func:`convert_ms_to_hf`) import them lazily. Errors for bad input
are ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` with a one-line message.
"""
import json
import os
import time

# Names: the tables live in baichuan2_names (re-exported here for the converters' users).
from baichuan2_names import (  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
    GLOBAL_NAMES, HF_IGNORED_SUFFIXES, LAYER_NAMES, QKV, W_PACK, classify_ms_name, hf_to_ms_name,
    LAYER_RE, hf_to_ms_names, ms_to_hf_name)

BAICHUAN1_VOCAB = 64000
DTYPES = ("fp16", "bf16", "fp32")
LORA_MERGE_TOOL = "research/baichuan2/merge_lora.py"


def split_w_pack(w_pack, hidden_size):
    """Split ``W_pack`` ``[3h, h]`` along dim 0 into ``(wq, wk, wv)``, each ``[h, h]``.

    Works on torch tensors and numpy arrays; returns views (no copy), dtype unchanged.
    """
    shape = tuple(w_pack.shape)
    if shape != (3 * hidden_size, hidden_size):
        raise ValueError(f"W_pack has shape {list(shape)}, expected "
                         f"[{3 * hidden_size}, {hidden_size}] (3*hidden_size, hidden_size)")
    h = hidden_size
    return w_pack[0:h], w_pack[h:2 * h], w_pack[2 * h:3 * h]


def pack_w_pack(wq, wk, wv):
    """Concatenate ``wq, wk, wv`` (torch, each ``[h, h]``) along dim 0 into W_pack ``[3h, h]``."""
    import torch
    return torch.cat([wq, wk, wv], dim=0)


# --------------------------------------------------------------------------------------------
# Config and shapes
# --------------------------------------------------------------------------------------------
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def validate_config(config, source="config.json"):
    """Check the fields the conversion needs; refuse Baichuan-1 (vocab_size 64000)."""
    for key in _REQUIRED:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
    if config["vocab_size"] == BAICHUAN1_VOCAB:
        raise ValueError(f"{source}: vocab_size {BAICHUAN1_VOCAB} is a Baichuan-1 checkpoint; this "
                         "converter is for Baichuan2 (vocab_size 125696) only")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"{source}: hidden_size {config['hidden_size']} is not divisible by "
                         f"num_attention_heads {config['num_attention_heads']}")
    return config


def read_hf_config(path):
    """Load and validate a HF ``config.json`` (a dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.json not found: {path} (pass --config_json PATH)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {_one_line(err)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return validate_config(config, path)


def detect_model_kind(config):
    """``"7b"`` (RoPE; config has ``max_position_embeddings``) or ``"13b"`` (ALiBi; it has not)."""
    return "7b" if "max_position_embeddings" in config else "13b"


def describe_kind(kind):
    return {"7b": "Baichuan2-7B (RoPE)", "13b": "Baichuan2-13B (ALiBi)"}[kind]


def expected_hf_shapes(config):
    """Ordered ``{HF name: shape tuple}`` implied by ``config`` (embeddings, layers, norm, head).

    ``embed_tokens``/``lm_head`` ``[V,h]``; ``W_pack`` ``[3h,h]``; ``o_proj`` ``[h,h]``;
    ``gate_proj``/``up_proj`` ``[I,h]``; ``down_proj`` ``[h,I]``; norms ``[h]``.
    """
    v, h, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    per_layer = {W_PACK: (3 * h, h), "self_attn.o_proj.weight": (h, h),
                 "mlp.gate_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
                 "mlp.up_proj.weight": (inter, h), "input_layernorm.weight": (h,),
                 "post_attention_layernorm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def expected_ms_shapes(config):
    """Ordered ``{MindSpore name: shape tuple}`` implied by ``config`` (``wq/wk/wv`` ``[h,h]``)."""
    h = config["hidden_size"]
    shapes = {}
    for name, shape in expected_hf_shapes(config).items():
        if name.endswith(W_PACK):
            for ms_name in hf_to_ms_names(name):
                shapes[ms_name] = (h, h)
        else:
            shapes[hf_to_ms_name(name)] = shape
    return shapes


def _name_list(names, limit=8):
    names = list(names)
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names) - limit} more)"
    return text


def check_tensors(found, expected, source, where=None):
    """Refuse unless ``found`` (``{name: shape}``) has exactly the ``expected`` names and shapes.

    ``where`` optionally maps a name to the file it came from (named in shape errors).
    """
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_name_list(unexpected)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            origin = f" in {where[name]}" if where and name in where else ""
            raise ValueError(f"shape mismatch: {name} is {list(found[name])}{origin}, "
                             f"config expects {list(shape)}")


# --------------------------------------------------------------------------------------------
# In-memory conversion (small models, tests)
# --------------------------------------------------------------------------------------------
def hf_to_ms_state_dict(state_dict, config):
    """HF state dict (torch tensors) -> ``{MindSpore name: torch tensor}``; dtypes unchanged.

    Checks names and shapes against ``config``; ``W_pack`` is split (views, no copy).
    """
    validate_config(config)
    state = {k: v for k, v in state_dict.items() if not k.endswith(HF_IGNORED_SUFFIXES)}
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, expected_hf_shapes(config),
                  "HF state dict")
    out = {}
    for name, tensor in state.items():
        if name.endswith(W_PACK):
            out.update(zip(hf_to_ms_names(name), split_w_pack(tensor, config["hidden_size"])))
        else:
            out[hf_to_ms_name(name)] = tensor
    return out


def ms_to_hf_state_dict(ms_state, config=None):
    """``{MindSpore name: tensor}`` -> HF state dict of torch tensors (with ``W_pack``).

    Values may be torch tensors, numpy arrays or MindSpore Tensors/Parameters; dtypes are kept.
    Runtime-only (KV cache, normalised head) and training-state entries are skipped; LoRA
    parameters are refused. Without ``config`` the shapes are inferred from the tensors.
    """
    state = {}
    for name, value in ms_state.items():
        kind = classify_ms_name(name)
        if kind == "lora":
            raise ValueError(_lora_message([name]))
        if kind == "weight":
            state[name] = value
    config = validate_config(config) if config else infer_config_from_ms(
        {k: tuple(v.shape) for k, v in state.items()})
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, expected_ms_shapes(config),
                  "MindSpore checkpoint")
    return _assemble_hf(state, config, lambda t: to_torch(t))


def _assemble_hf(state, config, convert):
    """Build the HF dict in HF order, popping consumed entries from ``state`` to free memory."""
    out = {}
    for hf_name in expected_hf_shapes(config):
        if hf_name.endswith(W_PACK):
            parts = [convert(state.pop(n)) for n in hf_to_ms_names(hf_name)]
            out[hf_name] = pack_w_pack(*parts)
        else:
            out[hf_name] = convert(state.pop(hf_to_ms_name(hf_name)))
    return out


def infer_config_from_ms(shapes):
    """Minimal config (V, h, I, L; heads unknown -> 1) inferred from MindSpore tensor shapes."""
    emb = shapes.get("model.tok_embeddings.embedding_weight")
    w1 = shapes.get("model.layers.0.feed_forward.w1.weight")
    if emb is None or len(emb) != 2 or w1 is None or len(w1) != 2:
        raise ValueError("MindSpore checkpoint: cannot infer the model size (missing "
                         "model.tok_embeddings.embedding_weight or model.layers.0.feed_forward."
                         "w1.weight); pass --config_json")
    layers = {int(m.group(1)) for m in map(LAYER_RE.match, shapes) if m}
    config = {"vocab_size": emb[0], "hidden_size": emb[1], "intermediate_size": w1[0],
              "num_hidden_layers": max(layers) + 1, "num_attention_heads": 1}
    return validate_config(config, "MindSpore checkpoint")


def _lora_message(lora_names):
    return (f"checkpoint has {len(lora_names)} LoRA parameters (e.g. {lora_names[0]}); merge them "
            f"into the base weights first with {LORA_MERGE_TOOL}, or pass --drop_lora to discard "
            "them")


# --------------------------------------------------------------------------------------------
# Tensor helpers (lazy imports)
# --------------------------------------------------------------------------------------------
def torch_dtype(name):
    """``"fp16"|"bf16"|"fp32"`` -> torch dtype."""
    import torch
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return table[name]


def to_torch(value):
    """torch tensor / numpy array / MindSpore Tensor -> torch tensor, bit-exact (bf16 included)."""
    import numpy as np
    import torch
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, np.ndarray):
        value = value.asnumpy()
    if value.dtype.itemsize == 2 and value.dtype.name == "bfloat16":
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def torch_to_ms(tensor):
    """torch tensor -> MindSpore Tensor with the same dtype and bits (bf16 included)."""
    import mindspore as ms
    import torch
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return ms.Tensor(tensor.view(torch.int16).numpy().view(ms.dtype_to_nptype(ms.bfloat16)))
    return ms.Tensor(tensor.numpy())


def _one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# HF checkpoint discovery and reading
# --------------------------------------------------------------------------------------------
_INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
_GLOB_PREFIX = {"safetensors": "model", "bin": "pytorch_model"}
_SUFFIX = {"safetensors": ".safetensors", "bin": ".bin"}


def find_hf_weight_files(path):
    """Resolve ``--torch_ckpt_path`` (the HF directory or any weight file in it).

    Returns ``(directory, fmt, files)`` where ``fmt`` is ``"safetensors"`` or ``"bin"``. The
    shards are those listed in the index json if there is one, else the standard names
    (``model*.safetensors`` / ``pytorch_model*.bin``), else the given file alone. A directory with
    both formats is read as safetensors (as transformers does); a file selects its own format.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"HF checkpoint not found: {path}")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        directory, given = path, None
        formats = [f for f in ("safetensors", "bin") if _list_format(directory, f)]
        if not formats:
            raise FileNotFoundError(f"no HF weights in {directory} (expected pytorch_model*.bin or "
                                    "model*.safetensors, optionally with an index json)")
        fmt = formats[0]
    else:
        directory, given = os.path.dirname(path), path
        if path.endswith(".safetensors"):
            fmt = "safetensors"
        elif path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
            fmt = "bin"
        else:
            raise ValueError(f"{path}: not a weight file (.bin or .safetensors) or a directory")
    files = _list_format(directory, fmt) or [given]
    return directory, fmt, files


def _list_format(directory, fmt):
    index = os.path.join(directory, _INDEX[fmt])
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read index {index}: {_one_line(err)}") from None
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {file} listed in {index} does not exist")
        return files
    prefix, suffix = _GLOB_PREFIX[fmt], _SUFFIX[fmt]
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.startswith(prefix) and n.endswith(suffix)
                  and os.path.isfile(os.path.join(directory, n)))


def _open_shard(path, fmt):
    """Return ``{name: torch tensor}`` lazily backed by the file (safe_open / mmap torch.load)."""
    import torch
    try:
        if fmt == "safetensors":
            from safetensors import safe_open
            handle = safe_open(path, framework="pt")
            return _LazySafetensors(handle)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be mmapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure means the shard is unusable
        raise ValueError(f"cannot read shard {path}: {_one_line(err)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"cannot read shard {path}: not a state dict of tensors")
    return state


class _LazySafetensors:
    """Mapping-like view of a ``safe_open`` handle: shapes without reading data."""

    def __init__(self, handle):
        self.handle = handle

    def keys(self):
        return list(self.handle.keys())

    def shape(self, name):
        return tuple(self.handle.get_slice(name).get_shape())

    def __getitem__(self, name):
        return self.handle.get_tensor(name)


def _shard_shapes(shard):
    if isinstance(shard, _LazySafetensors):
        return {k: shard.shape(k) for k in shard.keys()}
    return {k: tuple(v.shape) for k, v in shard.items()}


def scan_hf_files(files, fmt):
    """Pre-pass: ``({name: shape}, {name: file basename})`` of all shards, reading headers only."""
    shapes, where = {}, {}
    for file in files:
        shard = _open_shard(file, fmt)
        try:
            for name, shape in _shard_shapes(shard).items():
                if name in shapes:
                    raise ValueError(f"tensor {name} appears in both {where[name]} and "
                                     f"{os.path.basename(file)}")
                shapes[name], where[name] = shape, os.path.basename(file)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read shard {file}: {_one_line(err)}") from None
        del shard
    return shapes, where


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------
def _check_output(path, overwrite, suffix=None):
    """Absolute output path; refuse a directory, a wrong suffix or an existing file."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory; give a file name")
    if suffix and not path.endswith(suffix):
        raise ValueError(f"output {path} must end with {suffix}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite to replace it")
    return path


def _tmp_name(path, tag="tmp"):
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{tag}-{os.getpid()}")


def _chmod_default(path):
    """Give a finished output the usual 0666 & ~umask permissions (some writers use 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# HF -> MindSpore (streaming)
# --------------------------------------------------------------------------------------------
def convert_hf_to_ms(torch_ckpt_path, mindspore_ckpt_path, dtype="fp16", model=None,
                     config_json=None, overwrite=False, log=print, flush_bytes=1 << 30):
    """Convert a HF Baichuan2 checkpoint into one MindSpore ``.ckpt``, one shard at a time.

    All names, shapes and shard readability are checked before anything is written; the
    output is assembled in a hidden temp file beside the target and renamed at the end. Shards
    are read lazily (safetensors ``safe_open``, ``torch.load(mmap=True)``) one at a time and
    converted tensors are appended whenever ``flush_bytes`` (1 GiB) are pending, so peak memory
    stays below one shard (plus the mapped source pages of that shard, which the OS can drop).
    Every tensor is cast to ``dtype`` (``fp16`` default, as the original converter, norms
    included). Returns a summary dict.
    """
    import mindspore as ms

    target = torch_dtype(dtype)
    directory, fmt, files = find_hf_weight_files(torch_ckpt_path)
    config_json = config_json or os.path.join(directory, "config.json")
    config = read_hf_config(config_json)
    out_path = _check_output(mindspore_ckpt_path, overwrite, ".ckpt")
    kind = detect_model_kind(config)
    if model:
        model = model.lower()
        if model not in ("7b", "13b"):
            raise ValueError(f"--model must be 7b or 13b, got {model!r}")
        if model != kind:
            log(f"--model {model}: overriding detected {describe_kind(kind)}")
        kind = model
    else:
        why = "has" if kind == "7b" else "has no"
        log(f"detected {describe_kind(kind)}: config.json {why} max_position_embeddings")
    log(f"config: vocab {config['vocab_size']}, hidden {config['hidden_size']}, intermediate "
        f"{config['intermediate_size']}, layers {config['num_hidden_layers']}, heads "
        f"{config['num_attention_heads']}; {len(files)} {fmt} shard(s) in {directory}")

    shapes, where = scan_hf_files(files, fmt)
    ignored = [n for n in shapes if n.endswith(HF_IGNORED_SUFFIXES)]
    for name in ignored:
        shapes.pop(name)
    if ignored:
        log(f"skipping {len(ignored)} derived buffers (e.g. {ignored[0]})")
    check_tensors(shapes, expected_hf_shapes(config), f"HF checkpoint {directory}", where)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    tmp_out = _tmp_name(out_path)
    part = _tmp_name(out_path, "part") + ".ckpt"
    hidden = config["hidden_size"]
    total_bytes, start = 0, time.time()
    def flush(items, out):
        """Serialise ``items`` with MindSpore and append them to the output (a .ckpt file is a
        concatenation of serialised ``Checkpoint`` protobuf messages)."""
        ms.save_checkpoint(items, part)
        items.clear()
        with open(part, "rb") as src:
            while True:
                chunk = src.read(64 << 20)
                if not chunk:
                    break
                out.write(chunk)
        _remove_quietly(part)

    try:
        with open(tmp_out, "wb") as out:
            for index, file in enumerate(files, 1):
                t0 = time.time()
                shard = _open_shard(file, fmt)
                names = shard.keys() if isinstance(shard, _LazySafetensors) else list(shard)
                names = [n for n in names if not n.endswith(HF_IGNORED_SUFFIXES)]
                items, nbytes, pending, n_ms = [], 0, 0, 0
                for name in names:
                    try:
                        tensor = shard[name].to(target)
                    except Exception as err:
                        raise ValueError(f"cannot read shard {file}: tensor {name}: "
                                         f"{_one_line(err)}") from None
                    if name.endswith(W_PACK):
                        pairs = zip(hf_to_ms_names(name), split_w_pack(tensor, hidden))
                    else:
                        pairs = [(hf_to_ms_name(name), tensor)]
                    for ms_name, value in pairs:
                        items.append({"name": ms_name, "data": torch_to_ms(value)})
                        size = value.numel() * value.element_size()
                        nbytes, pending, n_ms = nbytes + size, pending + size, n_ms + 1
                    del tensor, pairs, value
                    if pending >= flush_bytes:
                        flush(items, out)
                        pending = 0
                del shard
                if items:
                    flush(items, out)
                total_bytes += nbytes
                log(f"[shard {index}/{len(files)}] {os.path.basename(file)}: {len(names)} HF -> "
                    f"{n_ms} MindSpore tensors, {nbytes / 2**20:.1f} MB {dtype}, "
                    f"{time.time() - t0:.2f} s")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_out, out_path)
    finally:
        _remove_quietly(part)
        _remove_quietly(tmp_out)
    log(f"wrote {out_path}: {len(expected_ms_shapes(config))} MindSpore tensors, "
        f"{total_bytes / 2**20:.1f} MB {dtype}, {time.time() - start:.2f} s")
    return {"output": out_path, "kind": kind, "format": fmt, "shards": len(files),
            "dtype": dtype, "config": config}


# --------------------------------------------------------------------------------------------
# MindSpore -> HF
# --------------------------------------------------------------------------------------------
def convert_ms_to_hf(mindspore_ckpt_path, torch_ckpt_path, dtype=None, config_json=None,
                     overwrite=False, drop_lora=False, log=print):
    """Convert a MindSpore checkpoint into a HF state dict file with ``W_pack``.

    Output by extension: ``.safetensors`` (safetensors) or anything else (``torch.save``); an
    existing directory gets ``pytorch_model.bin``. ``dtype`` None keeps each tensor's dtype.
    Runtime-only and optimizer entries are ignored; LoRA parameters are refused unless
    ``drop_lora``. ``config_json`` (optional) is used for the shape check and copied beside the
    output as ``config.json``. The whole model is held in memory once (the output is one file).
    """
    import mindspore as ms
    import torch

    if not os.path.isfile(mindspore_ckpt_path):
        raise FileNotFoundError(f"MindSpore checkpoint not found: {mindspore_ckpt_path}")
    config = read_hf_config(config_json) if config_json else None
    if config:
        log(f"config {config_json}: {describe_kind(detect_model_kind(config))}")
    if os.path.isdir(torch_ckpt_path):
        torch_ckpt_path = os.path.join(torch_ckpt_path, "pytorch_model.bin")
    out_path = _check_output(torch_ckpt_path, overwrite)
    config_out = os.path.join(os.path.dirname(out_path), "config.json")
    if config_json and os.path.exists(config_out) and not overwrite and \
            os.path.abspath(config_json) != config_out:
        raise FileExistsError(f"output {config_out} exists; pass --overwrite to replace it")

    seen = {}

    def choose(name):
        kind = classify_ms_name(name)
        seen[name] = kind
        return kind == "weight"

    fmt = "safetensors" if mindspore_ckpt_path.endswith(".safetensors") else "ckpt"
    start = time.time()
    try:
        params = ms.load_checkpoint(mindspore_ckpt_path, choice_func=choose, format=fmt)
    except Exception as err:
        raise ValueError(f"cannot read MindSpore checkpoint {mindspore_ckpt_path}: "
                         f"{_one_line(err)}") from None
    by_kind = {}
    for name, kind in seen.items():
        by_kind.setdefault(kind, []).append(name)
    if by_kind.get("lora"):
        if not drop_lora:
            raise ValueError(_lora_message(by_kind["lora"]))
        log(f"--drop_lora: discarding {len(by_kind['lora'])} LoRA parameters")
    for kind, what in (("runtime", "runtime-only"), ("train_state", "optimizer/training-state")):
        if by_kind.get(kind):
            log(f"ignoring {len(by_kind[kind])} {what} entries (e.g. {by_kind[kind][0]})")
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    config = config or infer_config_from_ms(shapes)
    check_tensors(shapes, expected_ms_shapes(config), f"MindSpore checkpoint {mindspore_ckpt_path}")
    log(f"read {mindspore_ckpt_path}: {len(params)} tensors, {time.time() - start:.2f} s")

    cast = torch_dtype(dtype) if dtype else None
    state = _assemble_hf(params, config,
                         lambda p: to_torch(p) if cast is None else to_torch(p).to(cast))
    del params
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp_out = _tmp_name(out_path)
    try:
        if out_path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, tmp_out,
                      metadata={"format": "pt"})
        else:
            torch.save(state, tmp_out)
        _chmod_default(tmp_out)
        os.replace(tmp_out, out_path)
    finally:
        _remove_quietly(tmp_out)
    if config_json and os.path.abspath(config_json) != config_out:
        with open(config_json, "rb") as src:
            data = src.read()
        tmp_cfg = _tmp_name(config_out)
        with open(tmp_cfg, "wb") as dst:
            dst.write(data)
        os.replace(tmp_cfg, config_out)
        log(f"wrote {config_out}")
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    log(f"wrote {out_path}: {len(state)} HF tensors, {nbytes / 2**20:.1f} MB, "
        f"{time.time() - start:.2f} s")
    return {"output": out_path, "tensors": len(state)}
