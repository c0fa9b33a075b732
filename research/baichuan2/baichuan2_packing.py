"""Sequence packing: several whole conversations per fine-tuning row, and the dataset columns that carry it.

A Belle conversation averages ~200 tokens, so an unpacked row of ``seq_length + 1`` = 513 tokens is
mostly padding. Packing puts whole conversations one after another into a row and writes a third
column, ``position_ids``, from which the model rebuilds what each conversation alone would have seen:

* ``position_ids`` (int32, ``seq_length + 1``) restarts at 0 at the first token of every conversation;
  ``segment = cumsum(position_ids == 0)`` numbers the conversations of a row;
* the model attends only within a segment (block-diagonal causal mask), takes RoPE / ALiBi positions
  from ``position_ids`` and never trains a target whose position id is 0 (the first token of a
  conversation is not predicted from the previous conversation);
* padding at the row end: input 0, label -100, position id 0, so every pad token is a segment of its
  own (attends only to itself: a finite softmax, and no real token ever sees it) and never a target;
* the first token of every conversation also gets label -100 in the data (the unpacked template's
  label there is dropped by the model's shift, so nothing the model learns changes).

The packing is best-fit decreasing on the conversations' (truncated) lengths, deterministic for the
same input: longest conversation first (ties by input order), each into the fullest row it still fits
in (ties by row age); a conversation longer than a row is truncated as in the unpacked path, never split.
"""
import bisect
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np

IGNORE_INDEX = -100
POSITION_IDS = "position_ids"
DEFAULT_COLUMNS = ("input_ids", "labels")


def pack_lengths(lengths: Sequence[int], row_length: int) -> List[List[int]]:
    """Best-fit-decreasing bins: a list of rows, each the sorted indices of the conversations it holds.

    ``lengths[i]`` is conversation i's token count (at most ``row_length``; longer ones are truncated
    by the caller). Within a row conversations keep input order, and rows are ordered by their first
    conversation, so the data keeps roughly its input order (not longest first).
    """
    if row_length < 1:
        raise ValueError(f"row_length must be at least 1, got {row_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []          # sorted (room left, row index)
    for index in order:
        length = lengths[index]
        if not 1 <= length <= row_length:
            raise ValueError(f"conversation {index}: length {length} not in [1, {row_length}]")
        slot = bisect.bisect_left(free, (length, -1))       # the tightest row with room >= length
        if slot == len(free):
            rows.append([index])
            room, row = row_length - length, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            room -= length
        if room > 0:
            bisect.insort(free, (room, row))
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def packed_row(examples: Sequence[Tuple[Sequence[int], Sequence[int]]], row_length: int,
               pad_token_id: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, labels, position_ids)`` int32 (row_length,) of conversations laid end to end.

    ``examples``: ``(input_ids, labels)`` of each conversation, already truncated to ``row_length``,
    their lengths summing to at most ``row_length``. See the module docstring for the convention.
    """
    input_ids, labels, positions = [], [], []
    for ids, targets in examples:
        input_ids += list(ids)
        labels += [IGNORE_INDEX] + list(targets[1:])
        positions += range(len(ids))
    pad = row_length - len(input_ids)
    if pad < 0:
        raise ValueError(f"conversations of {len(input_ids)} tokens do not fit a row of {row_length}")
    input_ids += [pad_token_id] * pad
    labels += [IGNORE_INDEX] * pad
    positions += [0] * pad
    as_int32 = lambda values: np.asarray(values, dtype=np.int32)  # noqa: E731
    return as_int32(input_ids), as_int32(labels), as_int32(positions)


def packing_report(rows: Sequence[Sequence[int]], lengths: Sequence[int], row_length: int) -> dict:
    """Rows before/after, efficiency (real tokens / row tokens) before/after, conversations per row."""
    tokens = int(sum(lengths))
    return {"rows_before": len(lengths), "rows_after": len(rows),
            "efficiency_before": tokens / (len(lengths) * row_length) if lengths else 0.0,
            "efficiency_after": tokens / (len(rows) * row_length) if rows else 0.0,
            "conversations_per_row": dict(sorted(Counter(len(r) for r in rows).items()))}


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """``cumsum(position_ids == 0)`` along the last axis: the conversation number of every token."""
    return np.cumsum(np.asarray(position_ids) == 0, axis=-1)


# ----- which columns a run feeds the network ---------------------------------------------------
def mindrecord_columns(mindrecord_file: str) -> List[str]:
    """Column names of a MindRecord file (from its schema, no record is read)."""
    from mindspore.mindrecord import FileReader  # pylint: disable=import-outside-toplevel
    reader = FileReader(mindrecord_file, num_consumer=1)
    try:
        return list(reader.schema())
    finally:
        reader.close()


def dataset_columns(mindrecord_file: str, yaml_columns: Optional[Sequence[str]]) -> List[str]:
    """Columns to read from ``mindrecord_file`` and pass to the network (by keyword, as MindFormers does).

    The yaml's ``input_columns`` (default ``input_ids, labels``) are kept as written; a MindRecord made
    with ``belle_preprocess.py --pack True`` (it has ``position_ids``) adds ``position_ids``, so packed
    data is trained as packed without editing the yaml. A yaml may also name ``position_ids`` itself;
    then the file must have it. Raises ``ValueError`` (one line) for a column the file lacks.
    """
    columns = list(yaml_columns) if yaml_columns else list(DEFAULT_COLUMNS)
    available = mindrecord_columns(mindrecord_file)
    missing = [c for c in columns if c not in available]
    if missing:
        hint = (" (a packed dataset: rerun belle_preprocess.py with --pack True)" if POSITION_IDS in missing
                else "")
        raise ValueError(f"{mindrecord_file}: column(s) {missing} named by input_columns are not in the "
                         f"MindRecord (has {sorted(available)}){hint}")
    if POSITION_IDS in available and POSITION_IDS not in columns:
        columns.append(POSITION_IDS)
    return columns


def apply_dataset_columns(config, run_mode: str) -> None:
    """Set the train (``train``/``finetune``) or eval (``eval``) dataset columns of a MindFormers config.

    ``input_columns`` becomes ``dataset_columns(first MindRecord file, yaml input_columns)``. The
    Trainer passes training columns to ``construct`` by keyword (``construct_args_key`` defaults to
    ``input_columns``); evaluation passes them by position unless ``construct_args_key`` is set, so it
    is set to the same names when ``position_ids`` is fed. Unpacked data leaves the config unchanged.
    """
    import glob  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    section = {"train": "train_dataset", "finetune": "train_dataset", "eval": "eval_dataset"}.get(run_mode)
    if section is None:
        return
    dataset = config[section]
    path = dataset.data_loader.dataset_dir
    files = [path] if os.path.isfile(path) else sorted(
        f for f in glob.glob(os.path.join(path, "*")) if not f.endswith(".db") and os.path.isfile(f + ".db"))
    if not files:
        return                                  # the up-front dataset check reports it
    yaml_columns = list(dataset.input_columns) if dataset.get("input_columns") else None
    columns = dataset_columns(files[0], yaml_columns)
    if columns == yaml_columns:
        if POSITION_IDS in columns and section == "eval_dataset" and not dataset.get("construct_args_key"):
            dataset.construct_args_key = list(columns)
        return
    dataset.input_columns = columns
    if section == "eval_dataset":
        dataset.construct_args_key = list(columns)
    task = config.get(section + "_task")
    if task and task.get("dataset_config") is not None:
        task.dataset_config.input_columns = columns
        if section == "eval_dataset":
            task.dataset_config.construct_args_key = list(columns)
