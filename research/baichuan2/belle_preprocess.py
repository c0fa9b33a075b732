"""Turn Belle multi-turn chat JSON into a Baichuan2 fine-tuning MindRecord.

Usage (the command of the original documentation)::

    python research/baichuan2/belle_preprocess.py \
        --input_glob /{path}/belle_chat_ramdon_10k.json \
        --model_file /{path}/tokenizer.model \
        --output_file /{path}/belle_512.mindrecord \
        --seq_length 512

Each conversation becomes one record of ``seq_length + 1`` int32 ``input_ids`` and
``labels`` (the model shifts them itself). A user turn contributes ``[user_id] + ids``
with labels ``[eos] + [-100] * len(ids)``: the eos label on the role token teaches the
model to end the previous assistant answer. Any other turn contributes
``[assistant_id] + ids`` with labels ``[-100] + ids``. An eos closes the conversation
(input and label); then the record is cut or padded (input 0, label -100).

``--pack True`` (default False: one conversation per record, as above) packs whole conversations
into records of ``seq_length + 1`` tokens (best-fit decreasing; a conversation longer than a record is
truncated as above, never split) and adds a ``position_ids`` column that restarts at 0 at every
conversation; the first label of each conversation and all padding labels are -100, padding has
input 0 and position id 0 (see ``baichuan2_packing``). The summary reports rows before/after, the
packing efficiency (real tokens / record tokens) and how many conversations the records hold.

Bad input stops the run with one error line (file, record, problem) and writes nothing;
``--skip_invalid`` skips such files or records instead and counts them.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from baichuan2_packing import POSITION_IDS, pack_lengths, packed_row, packing_report

IGNORE_INDEX = -100
HUMAN = "human"
_WRITE_BATCH = 1000


class InvalidInputError(ValueError):
    """Bad input data or arguments; the message is one line meant for the user."""


# ----- the pure transformation -------------------------------------------------------------
def build_conversation(conversation: Sequence[dict], encode: Callable[[str], List[int]],
                       user_token_id: int, assistant_token_id: int,
                       eos_token_id: int) -> Tuple[List[int], List[int]]:
    """Unpadded ``(input_ids, labels)`` of one conversation (a list of ``{"from", "value"}``).

    Turns need not alternate: every ``human`` turn is a user turn, anything else an assistant
    turn, as in the original script and the Baichuan2 fine-tune recipe.
    """
    input_ids: List[int] = []
    labels: List[int] = []
    for turn in conversation:
        ids = list(encode(turn["value"]))
        if turn["from"] == HUMAN:
            input_ids += [user_token_id] + ids
            labels += [eos_token_id] + [IGNORE_INDEX] * len(ids)
        else:
            input_ids += [assistant_token_id] + ids
            labels += [IGNORE_INDEX] + ids
    input_ids.append(eos_token_id)
    labels.append(eos_token_id)
    return input_ids, labels


def pad_or_truncate(input_ids: List[int], labels: List[int], length: int,
                    pad_token_id: int = 0) -> Tuple[List[int], List[int]]:
    """Cut both lists to ``length`` or pad them (inputs with ``pad_token_id``, labels with -100)."""
    pad = length - len(input_ids)
    if pad <= 0:
        return input_ids[:length], labels[:length]
    return input_ids + [pad_token_id] * pad, labels + [IGNORE_INDEX] * pad


def preprocess_conversation(conversation: Sequence[dict], encode: Callable[[str], List[int]],
                            seq_length: int, *, user_token_id: int, assistant_token_id: int,
                            eos_token_id: int, pad_token_id: int = 0) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of one conversation, each ``seq_length + 1`` long."""
    input_ids, labels = build_conversation(conversation, encode, user_token_id,
                                           assistant_token_id, eos_token_id)
    return pad_or_truncate(input_ids, labels, seq_length + 1, pad_token_id)


# ----- reading and checking input ------------------------------------------------------------
def record_problem(record: Any) -> Optional[str]:
    """What is wrong with one Belle record, or None if it can be used."""
    if not isinstance(record, dict):
        return f"record is {_kind(record)}, expected an object with \"conversations\""
    if "conversations" not in record:
        return "record has no \"conversations\" field"
    turns = record["conversations"]
    if not isinstance(turns, list):
        return f"\"conversations\" is {_kind(turns)}, expected a list of turns"
    if not turns:
        return "\"conversations\" is empty"
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {number} is {_kind(turn)}, expected {{\"from\", \"value\"}}"
        for key in ("from", "value"):
            if key not in turn:
                return f"turn {number} has no \"{key}\""
            if not isinstance(turn[key], str):
                return f"turn {number} \"{key}\" is {_kind(turn[key])}, expected a string"
    return None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


@dataclass
class Stats:
    """Counters reported at the end of a run."""
    files: int = 0
    skipped_files: int = 0
    records: int = 0
    skipped_records: int = 0
    truncated: int = 0
    tokens: int = 0
    labelled: int = 0
    written_files: List[str] = field(default_factory=list)
    packing: Optional[dict] = None


def expand_inputs(pattern: str) -> List[str]:
    """Files matching ``pattern`` (``**`` allowed), sorted so runs are reproducible."""
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        what = "no file matches" if glob.has_magic(pattern) else "file not found"
        raise InvalidInputError(f"--input_glob {pattern}: {what}")
    return paths


def load_conversations(paths: Sequence[str], skip_invalid: bool, stats: Stats) -> List[List[dict]]:
    """Read and check every record of every file before anything is written."""
    conversations = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            detail = (f"{err.msg} at line {err.lineno} column {err.colno}"
                      if isinstance(err, json.JSONDecodeError) else "not UTF-8 text")
            _reject(f"{path}: not valid JSON ({detail})", skip_invalid, stats, whole_file=True)
            continue
        if not isinstance(records, list):
            _reject(f"{path}: top level is {_kind(records)}, expected a JSON array of records",
                    skip_invalid, stats, whole_file=True)
            continue
        stats.files += 1
        for index, record in enumerate(records):
            problem = record_problem(record)
            if problem is None:
                conversations.append(record["conversations"])
                continue
            record_id = record.get("id") if isinstance(record, dict) else None
            label = f"id {record_id!r}" if record_id is not None else "no id"
            _reject(f"{path}: record {index} ({label}): {problem}", skip_invalid, stats)
    return conversations


def _reject(message: str, skip_invalid: bool, stats: Stats, whole_file: bool = False) -> None:
    if not skip_invalid:
        raise InvalidInputError(f"{message}; fix the input or pass --skip_invalid to skip it")
    print(f"warning: skipped {message}", file=sys.stderr)
    if whole_file:
        stats.skipped_files += 1
    else:
        stats.skipped_records += 1


# ----- writing --------------------------------------------------------------------------------
def output_files(output_file: str, file_partition: int) -> List[str]:
    """MindRecord files (with their ``.db`` index) that a run writes."""
    names = [output_file] if file_partition == 1 else [f"{output_file}{i}" for i in range(file_partition)]
    return [name + suffix for name in names for suffix in ("", ".db")]


def write_mindrecord(conversations: Sequence[List[dict]], tokenizer, args, stats: Stats) -> None:
    """Write all records into a temp dir next to the output, then move them into place."""
    from mindspore.mindrecord import FileWriter  # pylint: disable=C0415
    from tqdm import tqdm  # pylint: disable=C0415

    length = args.seq_length + 1
    role_ids = {"user_token_id": tokenizer.user_token_id,
                "assistant_token_id": tokenizer.assistant_token_id,
                "eos_token_id": tokenizer.eos_token_id}

    def encode(text):
        # As the original script and the HF recipe: through the tokenizer, so a literal "</s>"
        # in the data would become the eos id (the Belle data has none).
        return tokenizer.encode(text, add_special_tokens=False)

    examples = []
    # disable=None: a bar on a terminal, none in logs and pipes.
    for conversation in tqdm(conversations, desc="belle_preprocess", unit="conv", file=sys.stderr, disable=None):
        input_ids, labels = build_conversation(conversation, encode, **role_ids)
        stats.truncated += len(input_ids) > length
        examples.append((input_ids[:length], labels[:length]))
    stats.tokens = sum(len(ids) for ids, _ in examples)
    records = list(_records(examples, length, tokenizer.pad_token_id, args.pack, stats))
    schema = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
    if args.pack:
        schema[POSITION_IDS] = {"type": "int32", "shape": [-1]}

    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    os.makedirs(out_dir, exist_ok=True)
    # Same directory (so the final rename is cheap and atomic per file) and same base name
    # (MindRecord shards refer to each other by name).
    tmp_dir = tempfile.mkdtemp(dir=out_dir, prefix=".belle_preprocess-")
    try:
        writer = FileWriter(os.path.join(tmp_dir, os.path.basename(args.output_file)),
                            shard_num=args.file_partition, overwrite=True)
        writer.add_schema(schema, args.mindrecord_schema)
        for start in range(0, len(records), _WRITE_BATCH):
            writer.write_raw_data(records[start:start + _WRITE_BATCH])
        writer.commit()
        stats.records = len(records)
        for target in output_files(args.output_file, args.file_partition):
            os.replace(os.path.join(tmp_dir, os.path.basename(target)), target)
            stats.written_files.append(target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _records(examples, length, pad_token_id, pack, stats):
    """MindRecord rows: one per conversation, or packed rows with ``position_ids`` (``pack``)."""
    if not pack:
        for input_ids, labels in examples:
            input_ids, labels = pad_or_truncate(input_ids, labels, length, pad_token_id)
            stats.labelled += sum(label != IGNORE_INDEX for label in labels)
            yield {"input_ids": np.asarray(input_ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int32)}
        return
    lengths = [len(ids) for ids, _ in examples]
    rows = pack_lengths(lengths, length)
    stats.packing = packing_report(rows, lengths, length)
    for row in rows:
        input_ids, labels, position_ids = packed_row([examples[i] for i in row], length, pad_token_id)
        stats.labelled += int((labels != IGNORE_INDEX).sum())
        yield {"input_ids": input_ids, "labels": labels, POSITION_IDS: position_ids}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ----- command line ------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--mindrecord_schema", default="belle_baichuan2", help="schema description name")
    parser.add_argument("--input_glob", default="./belle_chat_ramdon_10k.json",
                        help="Belle JSON file or glob pattern (quote it; ** allowed)")
    parser.add_argument("--output_file", default="./belle512.mindrecord", help="MindRecord output file")
    parser.add_argument("--model_file", default="./tokenizer.model", help="SentencePiece tokenizer.model")
    parser.add_argument("--file_partition", type=int, default=1,
                        help="number of MindRecord shards (>1 appends 0..N-1 to the file name)")
    parser.add_argument("--seq_length", type=int, default=512, help="records are seq_length + 1 long")
    parser.add_argument("--pack", type=_bool, default=False, metavar="{True,False}",
                        help="pack whole conversations into each record and write position_ids "
                             "(default False: one conversation per record)")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip bad files/records (counted in the summary) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error("--seq_length must be at least 1")
    if args.file_partition < 1:
        parser.error("--file_partition must be at least 1")
    return args


def run(args: argparse.Namespace) -> Stats:
    """Check everything that can fail, then write; raises InvalidInputError/FileNotFoundError."""
    existing = [p for p in output_files(args.output_file, args.file_partition) if os.path.exists(p)]
    if existing and not args.overwrite:
        raise InvalidInputError(f"--output_file {existing[0]} already exists; "
                                "choose another name or pass --overwrite")
    stats = Stats()
    conversations = load_conversations(expand_inputs(args.input_glob), args.skip_invalid, stats)
    if not conversations:
        raise InvalidInputError(f"--input_glob {args.input_glob}: no valid conversation to write")

    from baichuan2_tokenizer import Baichuan2Tokenizer  # pylint: disable=C0415  (slow import)
    tokenizer = Baichuan2Tokenizer(vocab_file=args.model_file)
    write_mindrecord(conversations, tokenizer, args, stats)
    return stats


def summary(stats: Stats) -> str:
    """Human-readable end-of-run report."""
    share = stats.labelled / stats.tokens if stats.tokens else 0.0
    lines = [f"Transformed {stats.records} records.",
             f"  files read: {stats.files}, skipped files: {stats.skipped_files}",
             f"  records written: {stats.records}, skipped: {stats.skipped_records}, "
             f"truncated: {stats.truncated}",
             f"  tokens (without padding): {stats.tokens}, with a label: {stats.labelled} ({share:.1%})",
             ]
    if stats.packing is not None:
        pack = stats.packing
        lines += [f"  packing: {pack['rows_before']} conversations -> {pack['rows_after']} rows, "
                  f"efficiency (real tokens / row tokens) {pack['efficiency_before']:.1%} -> "
                  f"{pack['efficiency_after']:.1%}",
                  "  conversations per row: " + ", ".join(f"{k}: {v} rows"
                                                         for k, v in pack["conversations_per_row"].items())]
    lines += ["  output: " + ", ".join(p for p in stats.written_files if not p.endswith(".db"))]
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI entry point; bad input ends with one ``belle_preprocess.py: error:`` line on stderr and exit code 2."""
    from baichuan2_cli import fail  # pylint: disable=import-outside-toplevel
    args = parse_args(argv)
    try:
        stats = run(args)
    except (ValueError, OSError) as err:          # InvalidInputError is a ValueError
        raise SystemExit(fail("belle_preprocess.py", err)) from err
    print(summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
