"""Split a complete Baichuan2 checkpoint into per-rank checkpoints for a dp/mp/pp layout, and merge back.

This is the strategy-free counterpart of MindSpore's ``transform_checkpoints`` (which needs the
strategy files that only a semi-auto-parallel compile on Ascend/GPU writes). The layout is derived from
the parameter names (docs/design.md; MindFormers r1.0 ``research/baichuan/convert_weight.py``):

* pipeline (``pp``): decoder layer ``i`` goes to ``layer_to_stage(i, L, pp, offset)`` (MindFormers r1.0 ``mindformers/models/llama/llama.py``);
  the embedding to stage 0; ``model.norm_out`` and ``lm_head`` to the last stage.
* model parallel (``mp``): column-parallel weights (``wq``, ``wk``, ``wv``, ``w1``, ``w3``, their biases,
  ``lm_head`` along the vocabulary, and the embedding along the vocabulary when ``vocab_emb_dp`` is False)
  are split on dim 0; row-parallel weights (``wo``, ``w2``) on dim 1; norms are replicated. LoRA
  ``mindpet_delta_lora_b`` of a column weight is split on dim 0, ``lora_a`` of a row weight on dim 1.
* data parallel (``dp``): every replica gets a copy.
* Optimizer states (``adam_m.``, ``adam_v.``, ...) follow their weight; anything else (``global_step``,
  ``scale_sense``, ...) is copied to every rank.

Ranks are numbered as in MindSpore's semi-auto parallel: ``rank = stage * dp * mp + dp_index * mp +
mp_index``. The output follows the MindFormers layout ``<dir>/rank_<r>/<prefix><r>.ckpt`` plus a
``layout.json`` manifest (layout, parameter order, full shapes and dtypes) so that merging back is
exact and self-checking: a complete checkpoint split and merged again is bit-identical.
"""
from collections import OrderedDict
from dataclasses import dataclass, asdict
import json
import os
import re
import shutil

import numpy as np

from baichuan2_checkpoints import checkpoint_format, rank_dirs, single_checkpoint
from baichuan2_names import EMBEDDING, LM_HEAD, NORM_OUT, OPTIMIZER_STATE_PREFIXES
from baichuan2_parallel import layer_to_stage

MANIFEST = "layout.json"
MANIFEST_FORMAT = "baichuan2-ckpt-layout/1"
COLUMN = ("wq", "wk", "wv", "w1", "w3")
ROW = ("wo", "w2")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_LINEAR = re.compile(r"^(?:attention|feed_forward)\.(\w+)\.(weight|bias|mindpet_delta_lora_a|mindpet_delta_lora_b)$")


class LayoutError(ValueError):
    """A checkpoint or layout that cannot be split or merged as asked."""


@dataclass(frozen=True)
class Layout:
    """A dp x mp x pp layout of a model with ``num_layers`` decoder layers."""
    dp: int
    mp: int
    pp: int
    num_layers: int
    offset: int = 0
    vocab_emb_dp: bool = True

    def __post_init__(self):
        for field in ("dp", "mp", "pp"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{field} must be a positive integer, got {value!r}")
        if self.num_layers < self.pp:
            raise LayoutError(f"num_layers {self.num_layers} is less than pipeline stages {self.pp}")

    @property
    def world(self):
        """Number of ranks."""
        return self.dp * self.mp * self.pp

    def coords(self, rank):
        """``(stage, dp_index, mp_index)`` of ``rank``."""
        if not 0 <= rank < self.world:
            raise LayoutError(f"rank {rank} out of range for {self.world} ranks")
        stage, inner = divmod(rank, self.dp * self.mp)
        dp_index, mp_index = divmod(inner, self.mp)
        return stage, dp_index, mp_index

    def rank(self, stage, dp_index, mp_index):
        """Inverse of ``coords``."""
        return stage * self.dp * self.mp + dp_index * self.mp + mp_index

    def describe(self):
        return f"dp {self.dp} x mp {self.mp} x pp {self.pp}"


def param_rule(name, layout):
    """``(stage, axis)`` of a parameter: ``stage`` None = on every stage; ``axis`` None = not split by mp."""
    base = name
    for prefix in OPTIMIZER_STATE_PREFIXES:
        if name.startswith(prefix):
            base = name[len(prefix):]
            break
    last = layout.pp - 1
    if base == EMBEDDING:
        return 0, (None if layout.vocab_emb_dp else 0)
    if base == LM_HEAD:
        return last, 0
    if base == NORM_OUT:
        return last, None
    match = _LAYER.match(base)
    if match:
        layer_id, rest = int(match.group(1)), match.group(2)
        if layer_id >= layout.num_layers:
            raise LayoutError(f"{name}: layer {layer_id} but the layout has num_layers {layout.num_layers}")
        stage = layer_to_stage(layer_id, layout.num_layers, layout.pp, layout.offset)
        linear = _LINEAR.match(rest)
        if not linear:
            return stage, None            # norms and anything else inside a layer: replicated
        module, kind = linear.groups()
        if module in COLUMN:
            return stage, (None if kind == "mindpet_delta_lora_a" else 0)
        if module in ROW:
            return stage, {"weight": 1, "mindpet_delta_lora_a": 1}.get(kind)
        return stage, None
    return None, None                     # step counters, loss scale, ...: every rank


def infer_num_layers(names):
    """1 + the highest ``model.layers.<i>`` index among ``names`` (optimizer prefixes allowed)."""
    layers = [int(m.group(1)) for n in names for m in [_LAYER.match(_strip_optimizer(n))] if m]
    if not layers:
        raise LayoutError("the checkpoint has no model.layers.<i>.* parameter; is it a Baichuan2 checkpoint?")
    return max(layers) + 1


def _strip_optimizer(name):
    for prefix in OPTIMIZER_STATE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def split_params(params, layout):
    """Per-rank parameter dicts (``list`` indexed by rank) of a complete ``{name: ndarray}``."""
    ranks = [OrderedDict() for _ in range(layout.world)]
    for name, value in params.items():
        stage, axis = param_rule(name, layout)
        if axis is not None and layout.mp > 1:
            if value.ndim <= axis or value.shape[axis] % layout.mp:
                raise LayoutError(f"{name} of shape {tuple(value.shape)} cannot be split in {layout.mp} "
                                  f"(model_parallel) along dim {axis}")
            pieces = np.split(value, layout.mp, axis=axis)
        else:
            pieces = [value] * layout.mp
        stages = range(layout.pp) if stage is None else [stage]
        for stage_id in stages:
            for dp_index in range(layout.dp):
                for mp_index in range(layout.mp):
                    ranks[layout.rank(stage_id, dp_index, mp_index)][name] = pieces[mp_index]
    return ranks


def manifest_for(params, layout, prefix):
    """The ``layout.json`` content for a complete ``params`` split with ``layout``."""
    return {"format": MANIFEST_FORMAT, **asdict(layout), "prefix": prefix,
            "params": [[name, list(value.shape), str(value.dtype)] for name, value in params.items()]}


def layout_from_manifest(manifest, source="layout.json"):
    """``Layout`` recorded in a manifest."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise LayoutError(f"{source}: not a {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r})")
    try:
        return Layout(int(manifest["dp"]), int(manifest["mp"]), int(manifest["pp"]), int(manifest["num_layers"]),
                      int(manifest.get("offset", 0)), bool(manifest.get("vocab_emb_dp", True)))
    except KeyError as error:
        raise LayoutError(f"{source}: missing field {error}") from None


def same_bits(first, second):
    """Same shape, dtype and bytes (NaNs included)."""
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    return np.array_equal(np.ascontiguousarray(first).view(np.uint8), np.ascontiguousarray(second).view(np.uint8))


def merge_params(rank_params, layout, order=None, check_replicas=True):
    """The complete ``{name: ndarray}`` from per-rank dicts; ``order`` = names in their original order.

    Every parameter must be present on every rank that holds it; with ``check_replicas`` data-parallel
    (and pipeline-shared) copies must be bit-identical.
    """
    if len(rank_params) != layout.world:
        raise LayoutError(f"layout {layout.describe()} has {layout.world} ranks, got {len(rank_params)} rank files")
    if order is None:
        order = []
        seen = set()
        for params in rank_params:
            for name in params:
                if name not in seen:
                    seen.add(name)
                    order.append(name)
    merged = OrderedDict()
    for name in order:
        stage, axis = param_rule(name, layout)
        stages = range(layout.pp) if stage is None else [stage]
        holders = [layout.rank(s, d, m) for s in stages for d in range(layout.dp) for m in range(layout.mp)]
        missing = [r for r in holders if name not in rank_params[r]]
        if missing:
            raise LayoutError(f"{name} is missing on rank(s) {missing[:8]} (layout {layout.describe()})")
        first_stage = stages[0]
        pieces = [rank_params[layout.rank(first_stage, 0, m)][name] for m in range(layout.mp)]
        if check_replicas:
            for r in holders:
                s, d, m = layout.coords(r)
                reference = pieces[m] if axis is not None else pieces[0]
                if not same_bits(rank_params[r][name], reference):
                    raise LayoutError(f"{name}: rank {r} (stage {s}, dp {d}, mp {m}) differs from rank "
                                      f"{layout.rank(first_stage, 0, m)}; replicas must be identical")
        if axis is not None and layout.mp > 1:
            merged[name] = np.concatenate(pieces, axis=axis)
        else:
            merged[name] = pieces[0]
    return merged


# ----------------------------------------------------------------------------------------------- files

def load_ckpt(path):
    """``OrderedDict`` name -> ndarray of a MindSpore ``.ckpt``/``.safetensors`` file (order kept)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(path, format=checkpoint_format(path))
    except Exception as error:  # pylint: disable=broad-except
        raise LayoutError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    return OrderedDict((name, value.asnumpy()) for name, value in params.items())


def save_ckpt(params, path):
    """Write ``{name: ndarray}`` as a MindSpore checkpoint (dtype and order kept)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(np.ascontiguousarray(value))}
                        for name, value in params.items()], path)


def rank_file(dst_dir, rank, prefix="checkpoint_"):
    """``<dst_dir>/rank_<rank>/<prefix><rank>.ckpt`` (the MindFormers/transform_checkpoints layout)."""
    return os.path.join(dst_dir, f"rank_{rank}", f"{prefix}{rank}.ckpt")


def _single_ckpt(folder):
    return single_checkpoint(folder, LayoutError)


def split_to_dir(params, dst_dir, layout, prefix="checkpoint_", ranks=None):
    """Write the per-rank checkpoints of complete ``params`` and ``layout.json``; returns the files.

    ``ranks`` limits the output to those ranks (e.g. the one rank a process needs). Data-parallel copies
    are hard links to the first replica's file where the filesystem allows it.
    """
    per_rank = split_params(params, layout)
    wanted = range(layout.world) if ranks is None else sorted(ranks)
    os.makedirs(dst_dir, exist_ok=True)
    written = {}
    files = []
    for rank in wanted:
        stage, _, mp_index = layout.coords(rank)
        path = rank_file(dst_dir, rank, prefix)
        if os.path.exists(path):
            os.remove(path)
        twin = written.get((stage, mp_index))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if twin is not None:
            try:
                os.link(twin, path)
            except OSError:
                shutil.copyfile(twin, path)
        else:
            save_ckpt(per_rank[rank], path)
            written[(stage, mp_index)] = path
        files.append(path)
    manifest = os.path.join(dst_dir, MANIFEST)
    temporary = f"{manifest}.{os.getpid()}.tmp"       # ranks may write it concurrently: replace atomically
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest_for(params, layout, prefix), handle, indent=1)
    os.replace(temporary, manifest)
    return files


def read_layout_dir(src_dir, layout=None):
    """``(rank_params, layout, order)`` of a ``rank_x/`` folder; ``layout`` needed if there is no layout.json."""
    manifest_path = os.path.join(src_dir, MANIFEST)
    order = None
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            try:
                manifest = json.load(handle)
            except json.JSONDecodeError as error:
                raise LayoutError(f"{manifest_path} is not valid JSON: {error}") from None
        recorded = layout_from_manifest(manifest, manifest_path)
        if layout is not None and (layout.dp, layout.mp, layout.pp) != (recorded.dp, recorded.mp, recorded.pp):
            raise LayoutError(f"{manifest_path} records {recorded.describe()}, but {layout.describe()} was given")
        layout = recorded
        order = [entry[0] for entry in manifest.get("params", [])] or None
    elif layout is None:
        raise LayoutError(f"{src_dir} has rank_x folders but no {MANIFEST}: give its layout "
                          "(--src_dp/--src_mp/--src_pp) or, for checkpoints from a semi-auto-parallel run, "
                          "its strategy file (--src_ckpt_strategy, Ascend/GPU)")
    dirs = rank_dirs(src_dir)
    missing = [r for r in range(layout.world) if r not in dirs]
    extra = sorted(r for r in dirs if r >= layout.world)
    if missing or extra:
        raise LayoutError(f"{src_dir}: layout {layout.describe()} needs rank_0..rank_{layout.world - 1}; "
                          f"missing {missing[:8]}, unexpected {extra[:8]}")
    rank_params = [load_ckpt(_single_ckpt(dirs[r])) for r in range(layout.world)]
    return rank_params, layout, order


def load_complete(src, layout=None):
    """Complete ``{name: ndarray}`` from a file, a folder with one checkpoint, or a ``rank_x/`` folder."""
    if os.path.isfile(src):
        return load_ckpt(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint not found: {src}")
    dirs = rank_dirs(src)
    if not dirs:
        return load_ckpt(_single_ckpt(src))
    if list(dirs) == [0] and not os.path.isfile(os.path.join(src, MANIFEST)) and layout is None:
        return load_ckpt(_single_ckpt(dirs[0]))      # rank_0 only: a complete checkpoint
    rank_params, layout, order = read_layout_dir(src, layout)
    merged = merge_params(rank_params, layout, order)
    if order is not None:
        with open(os.path.join(src, MANIFEST), encoding="utf-8") as handle:
            recorded = {e[0]: (tuple(e[1]), e[2]) for e in json.load(handle)["params"]}
        for name, value in merged.items():
            if (tuple(value.shape), str(value.dtype)) != recorded[name]:
                raise LayoutError(f"{src}: merged {name} is {tuple(value.shape)} {value.dtype}, "
                                  f"{MANIFEST} says {recorded[name][0]} {recorded[name][1]}")
    return merged


def transform(src, dst_dir, dp, mp, pp, prefix="checkpoint_", src_layout=None, offset=0, vocab_emb_dp=True,
              num_layers=None, ranks=None):
    """Any supported source -> per-rank checkpoints for ``dp x mp x pp`` in ``dst_dir`` (1x1x1 = complete)."""
    params = load_complete(src, src_layout)
    layout = Layout(dp, mp, pp, num_layers or infer_num_layers(params), offset, vocab_emb_dp)
    return split_to_dir(params, dst_dir, layout, prefix, ranks)


def resolve_strategy(path, rank_id=None):
    """A strategy file as given, a folder merged (``merge_pipeline_strategys``) into one file, or None."""
    if not path or path == "None":
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"strategy not found: {path}")
    if os.path.isfile(path):
        return path
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    suffix = "" if rank_id is None else f"_{rank_id}"
    merged = os.path.join(path, f"merged_ckpt_strategy{suffix}.ckpt")
    if os.path.exists(merged):
        os.remove(merged)
    ms.merge_pipeline_strategys(path, merged)
    return merged


def strategy_transform(src_dir, dst_dir, prefix, src_strategy, dst_strategy):
    """The original ``transform_ckpt.py``: MindSpore's ``transform_checkpoints`` on strategy files.

    Needs strategy files written by a semi-auto-parallel compile (Ascend/GPU); cannot run on CPU.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    ms.transform_checkpoints(src_dir, dst_dir, prefix, resolve_strategy(src_strategy), resolve_strategy(dst_strategy))


def checkpoint_for_rank(load_checkpoint, output_dir, dp, mp, pp, rank_id, src_strategy=None, dst_strategy=None,
                        prefix="checkpoint_", **layout_kwargs):
    """What ``auto_trans_ckpt`` loads on ``rank_id``: a checkpoint file in the requested layout.

    With a destination strategy file (Ascend/GPU semi-auto parallel) this is MindSpore's
    ``transform_checkpoint_by_rank``; without one (CPU, or no strategy files) the strategy-free split
    above. Each rank writes only its own file, so ranks need not wait for each other:
    ``<output_dir>/transformed_checkpoint/<name>/rank_<r>/<prefix><r>.ckpt``; returns that path.
    """
    name = os.path.splitext(os.path.basename(os.path.normpath(load_checkpoint)))[0]
    dst_dir = os.path.join(output_dir, "transformed_checkpoint", name)
    if dst_strategy and dst_strategy != "None" and os.path.exists(dst_strategy):
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        if os.path.isfile(load_checkpoint):
            files = {0: load_checkpoint}
        else:
            dirs = rank_dirs(load_checkpoint)
            files = {r: _single_ckpt(d) for r, d in dirs.items()} if dirs else {0: _single_ckpt(load_checkpoint)}
        path = rank_file(dst_dir, rank_id, prefix)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ms.transform_checkpoint_by_rank(rank_id, files, path, resolve_strategy(src_strategy, rank_id),
                                        resolve_strategy(dst_strategy, rank_id))
        return path
    return transform(load_checkpoint, dst_dir, dp, mp, pp, prefix, ranks=[rank_id], **layout_kwargs)[0]
