"""belle_preprocess: template/masking against an independent re-implementation, the
MindRecord output, the CLI's handling of bad input, overwrite protection and globbing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

import belle_preprocess as bp
from train_tiny_tokenizer import iter_belle_texts, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "research", "baichuan2", "assets")
MODEL = os.path.join(ASSETS, "tokenizer.model")
SAMPLE = os.path.join(ASSETS, "belle_sample.json")
NON_ALTERNATING = ["65045", "62797", "17014", "19208", "54719"]


def reference_example(conversation, sp, seq_length):
    """The original's template (MindFormers r1.0 ``research/baichuan2/belle_preprocess.py``), written independently of belle_preprocess, on raw SentencePiece."""
    user, assistant, eos = sp.piece_to_id("<reserved_106>"), sp.piece_to_id("<reserved_107>"), sp.eos_id()
    tokens, targets = [], []
    for turn in conversation:
        ids = sp.encode(turn["value"])
        if turn["from"] == "human":
            tokens.extend([user, *ids])
            targets.extend([eos] + [-100] * len(ids))
        else:
            tokens.extend([assistant, *ids])
            targets.extend([-100, *ids])
    tokens.append(eos)
    targets.append(eos)
    total = seq_length + 1
    tokens, targets = tokens[:total], targets[:total]
    return tokens + [0] * (total - len(tokens)), targets + [-100] * (total - len(targets))


def read_rows(path):
    import mindspore.dataset as ds
    dataset = ds.MindDataset(path, columns_list=["input_ids", "labels"], shuffle=False)
    return [(row["input_ids"], row["labels"]) for row in dataset.create_dict_iterator(output_numpy=True)]


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def good_record(i):
    return {"id": f"g{i}", "conversations": [{"from": "human", "value": f"问题{i}"},
                                             {"from": "gpt", "value": f"回答 {i}"}]}


def run_cli(*args):
    return bp.main(["--model_file", MODEL, *map(str, args)])


@pytest.fixture(scope="module")
def sample():
    with open(SAMPLE, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=MODEL)


@pytest.fixture(scope="module")
def sample_mindrecord(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "belle_256.mindrecord"
    assert run_cli("--input_glob", SAMPLE, "--output_file", out, "--seq_length", 256) == 0
    return str(out)


# ----- the transformation ---------------------------------------------------------------------
def test_worked_example_from_the_facts_sheet():
    vocab = {"u1 u2": [11, 12], "a1 a2": [21, 22], "u3": [13], "a3": [23]}
    conversation = [{"from": "human", "value": "u1 u2"}, {"from": "gpt", "value": "a1 a2"},
                    {"from": "human", "value": "u3"}, {"from": "gpt", "value": "a3"}]
    ids, labels = bp.preprocess_conversation(conversation, vocab.__getitem__, 13, user_token_id=195,
                                             assistant_token_id=196, eos_token_id=2)
    assert ids == [195, 11, 12, 196, 21, 22, 195, 13, 196, 23, 2, 0, 0, 0]
    # eos label on each user role token: it trains the end of the previous answer.
    assert labels == [2, -100, -100, -100, 21, 22, 2, -100, -100, 23, 2, -100, -100, -100]


def test_non_alternating_turns_keep_their_roles():
    conversation = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                    {"from": "gpt", "value": "b"}, {"from": "human", "value": "r"},
                    {"from": "human", "value": "s"}]
    ids, labels = bp.build_conversation(conversation, lambda s: [ord(s)], 195, 196, 2)
    assert ids == [195, ord("q"), 196, ord("a"), 196, ord("b"), 195, ord("r"), 195, ord("s"), 2]
    assert labels == [2, -100, -100, ord("a"), -100, ord("b"), 2, -100, 2, -100, 2]


def test_truncation_drops_the_final_eos():
    ids, labels = bp.pad_or_truncate([195, 5, 196, 6, 7, 2], [2, -100, -100, 6, 7, 2], 4)
    assert (ids, labels) == ([195, 5, 196, 6], [2, -100, -100, 6])


def test_sample_holds_the_edge_cases(sample):
    ids = [record["id"] for record in sample]
    assert len(sample) == 205 and all(i in ids for i in NON_ALTERNATING + ["41935"])
    for record in sample:
        if record["id"] in NON_ALTERNATING:
            roles = [turn["from"] for turn in record["conversations"]]
            assert any(a == b for a, b in zip(roles, roles[1:]))


def test_mindrecord_matches_reference_on_belle_sample(sample, sp, sample_mindrecord):
    rows = read_rows(sample_mindrecord)
    assert len(rows) == len(sample)
    truncated = 0
    for record, (ids, labels) in zip(sample, rows):
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        assert ids.shape == labels.shape == (257,)
        want_ids, want_labels = reference_example(record["conversations"], sp, 256)
        assert ids.tolist() == want_ids, record["id"]
        assert labels.tolist() == want_labels, record["id"]
        truncated += ids[-1] != 0
    assert truncated > 0  # the sample exercises truncation too


def test_pure_function_with_tokenizer_matches_reference(sample, sp):
    from baichuan2_tokenizer import Baichuan2Tokenizer
    tokenizer = Baichuan2Tokenizer(MODEL)
    for record in sample:
        if record["id"] in NON_ALTERNATING + ["41935"]:
            got = bp.preprocess_conversation(
                record["conversations"], lambda text: tokenizer.encode(text, add_special_tokens=False), 512,
                user_token_id=tokenizer.user_token_id, assistant_token_id=tokenizer.assistant_token_id,
                eos_token_id=tokenizer.eos_token_id)
            assert got == reference_example(record["conversations"], sp, 512)


def test_original_command_as_written(tmp_path):
    """The documented command line, run as a script from the repository root."""
    out = tmp_path / "belle_512.mindrecord"
    result = subprocess.run(
        [sys.executable, "research/baichuan2/belle_preprocess.py", "--input_glob", SAMPLE,
         "--model_file", MODEL, "--output_file", str(out), "--seq_length", "512"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Transformed 205 records." in result.stdout
    assert "truncated:" in result.stdout and "with a label:" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["belle_512.mindrecord", "belle_512.mindrecord.db"]


# ----- bad input -----------------------------------------------------------------------------
def assert_fails(capsys, out_dir, *args):
    with pytest.raises(SystemExit) as err:
        run_cli(*args, "--output_file", out_dir / "out.mindrecord", "--seq_length", 32)
    assert err.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("belle_preprocess.py: error: ") and "\n" not in stderr
    assert not [name for name in os.listdir(out_dir) if name.startswith(("out", ".belle"))]
    return stderr


BAD_RECORDS = {
    "no_conversations": ({"id": "b1", "dialog": []}, 'no "conversations" field'),
    "turn_without_from": ({"id": "b1", "conversations": [{"value": "hi"}]}, 'turn 0 has no "from"'),
    "turn_without_value": ({"id": "b1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
                           'turn 1 has no "value"'),
    "non_string_value": ({"id": "b1", "conversations": [{"from": "human", "value": 42}]},
                         'turn 0 "value" is a number, expected a string'),
    "empty_conversation": ({"id": "b1", "conversations": []}, '"conversations" is empty'),
    "record_not_object": (["human", "hi"], "record is a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_names_file_index_id_and_problem(case, tmp_path, capsys):
    record, problem = BAD_RECORDS[case]
    data = write_json(tmp_path / "data.json", [good_record(0), good_record(1), record])
    message = assert_fails(capsys, tmp_path, "--input_glob", data)
    assert data in message and "record 2" in message and problem in message
    assert ("id 'b1'" if isinstance(record, dict) else "no id") in message
    assert "--skip_invalid" in message


def test_file_that_is_not_json(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text("{not json", encoding="utf-8")
    message = assert_fails(capsys, tmp_path, "--input_glob", data)
    assert str(data) in message and "not valid JSON" in message and "line 1" in message


def test_top_level_not_a_list(tmp_path, capsys):
    data = write_json(tmp_path / "data.json", good_record(0))
    message = assert_fails(capsys, tmp_path, "--input_glob", data)
    assert data in message and "top level is an object, expected a JSON array" in message


def test_missing_input_and_model(tmp_path, capsys):
    assert "file not found" in assert_fails(capsys, tmp_path, "--input_glob", tmp_path / "none.json")
    assert "no file matches" in assert_fails(capsys, tmp_path, "--input_glob", tmp_path / "*.json")
    data = write_json(tmp_path / "data.json", [good_record(0)])
    with pytest.raises(SystemExit) as err:
        bp.main(["--input_glob", data, "--model_file", str(tmp_path / "no.model"),
                 "--output_file", str(tmp_path / "out.mindrecord")])
    assert err.value.code == 2 and "no.model" in capsys.readouterr().err


def test_tokenizer_without_role_pieces(tmp_path, capsys):
    model = tmp_path / "plain.model"
    model.write_bytes(train_tokenizer(iter_belle_texts([SAMPLE]), vocab_size=3000, with_role_pieces=False))
    data = write_json(tmp_path / "data.json", [good_record(0)])
    with pytest.raises(SystemExit) as err:
        bp.main(["--input_glob", data, "--model_file", str(model),
                 "--output_file", str(tmp_path / "out.mindrecord")])
    message = capsys.readouterr().err
    assert err.value.code == 2
    assert str(model) in message and "<reserved_106>" in message and "user_token_id" in message
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("out", ".belle"))]


# ----- output handling --------------------------------------------------------------------------
def test_existing_output_is_not_overwritten(tmp_path, capsys):
    data = write_json(tmp_path / "data.json", [good_record(0), good_record(1)])
    out = tmp_path / "out.mindrecord"
    out.write_text("precious", encoding="utf-8")
    with pytest.raises(SystemExit) as err:
        run_cli("--input_glob", data, "--output_file", out, "--seq_length", 16)
    assert err.value.code == 2
    assert str(out) in capsys.readouterr().err and out.read_text(encoding="utf-8") == "precious"
    assert run_cli("--input_glob", data, "--output_file", out, "--seq_length", 16, "--overwrite") == 0
    assert len(read_rows(str(out))) == 2
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".belle")]


def test_skip_invalid_skips_and_counts(tmp_path, capsys):
    records = [good_record(0), {"id": "x", "conversations": []}, good_record(1),
               {"id": "y", "conversations": [{"from": "human"}]}, good_record(2)]
    write_json(tmp_path / "a.json", records)
    (tmp_path / "b.json").write_text("oops", encoding="utf-8")
    out = tmp_path / "out" / "skip.mindrecord"
    assert run_cli("--input_glob", tmp_path / "*.json", "--output_file", out, "--seq_length", 16,
                   "--skip_invalid") == 0
    captured = capsys.readouterr()
    assert "records written: 3, skipped: 2" in captured.out and "skipped files: 1" in captured.out
    assert captured.err.count("warning: skipped") == 3
    assert len(read_rows(str(out))) == 3


def test_glob_over_two_files(tmp_path, sp):
    first = [good_record(i) for i in range(3)]
    second = [good_record(i) for i in range(10, 12)]
    write_json(tmp_path / "part_b.json", second)
    write_json(tmp_path / "part_a.json", first)
    out = tmp_path / "both.mindrecord"
    assert run_cli("--input_glob", tmp_path / "part_*.json", "--output_file", out, "--seq_length", 24) == 0
    rows = read_rows(str(out))
    assert [r[0].tolist() for r in rows] == [reference_example(rec["conversations"], sp, 24)[0]
                                             for rec in first + second]


def test_file_partition(tmp_path, capsys):
    data = write_json(tmp_path / "data.json", [good_record(i) for i in range(6)])
    out = tmp_path / "part.mindrecord"
    assert run_cli("--input_glob", data, "--output_file", out, "--seq_length", 16, "--file_partition", 2,
                   "--mindrecord_schema", "my_schema") == 0
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("part")) == [
        "part.mindrecord0", "part.mindrecord0.db", "part.mindrecord1", "part.mindrecord1.db"]
    assert "part.mindrecord0, " in capsys.readouterr().out
    rows = read_rows([str(out) + "0", str(out) + "1"])
    assert len(rows) == 6 and all(ids.shape == (17,) for ids, _ in rows)


def test_summary_counts(tmp_path, capsys):
    long_answer = "很长的回答。" * 40
    records = [good_record(0), {"id": "long", "conversations": [{"from": "human", "value": "问"},
                                                               {"from": "gpt", "value": long_answer}]}]
    data = write_json(tmp_path / "data.json", records)
    assert run_cli("--input_glob", data, "--output_file", tmp_path / "s.mindrecord", "--seq_length", 32) == 0
    rows = read_rows(str(tmp_path / "s.mindrecord"))
    tokens = sum(int((ids != 0).sum()) for ids, _ in rows)
    labelled = sum(int((labels != -100).sum()) for _, labels in rows)
    out = capsys.readouterr().out
    assert "truncated: 1" in out
    assert f"tokens (without padding): {tokens}, with a label: {labelled} " in out


# ----- packing (--pack True) --------------------------------------------------------------------
def read_packed_rows(path):
    import mindspore.dataset as ds
    dataset = ds.MindDataset(path, columns_list=["input_ids", "labels", "position_ids"], shuffle=False)
    return [(row["input_ids"], row["labels"], row["position_ids"])
            for row in dataset.create_dict_iterator(output_numpy=True)]


def split_packed_row(ids, labels, positions):
    """The conversations of a packed row (a run from one position-0 token to the next), pads left out
    (a pad is input 0, label -100, position 0: a one-token run of id 0)."""
    starts = [t for t in range(len(ids)) if positions[t] == 0] + [len(ids)]
    runs = [(ids[a:b].tolist(), labels[a:b].tolist(), positions[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    return [run for run in runs if not (len(run[0]) == 1 and run[0][0] == 0 and run[1][0] == -100)]


@pytest.fixture(scope="module")
def packed_mindrecord(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "belle_256_packed.mindrecord"
    assert run_cli("--input_glob", SAMPLE, "--output_file", out, "--seq_length", 256, "--pack", "True") == 0
    return str(out)


def test_pack_puts_every_conversation_once_unchanged(sample, sp, packed_mindrecord):
    """Each conversation lands whole in exactly one row, with the unpacked template's input ids and labels
    (truncated as unpacked), except its first label: -100 (the unpacked shift drops it too)."""
    rows = read_packed_rows(packed_mindrecord)
    assert len(rows) < len(sample)
    found = []
    for ids, labels, positions in rows:
        assert ids.dtype == labels.dtype == positions.dtype == np.int32
        assert ids.shape == labels.shape == positions.shape == (257,)
        for conv_ids, conv_labels, conv_positions in split_packed_row(ids, labels, positions):
            assert conv_positions == list(range(len(conv_ids)))
            found.append((conv_ids, conv_labels))
    expected = []
    for record in sample:
        want_ids, want_labels = reference_example(record["conversations"], sp, 256)
        n = min(257, _conversation_length(record["conversations"], sp))       # without the padding
        expected.append((want_ids[:n], [-100] + want_labels[1:n]))
    assert sorted(found) == sorted(expected)


def _conversation_length(conversation, sp):
    """Tokens of the unpacked template before truncation: a role token per turn, its text, the eos."""
    return sum(1 + len(sp.encode(turn["value"])) for turn in conversation) + 1


def test_pack_reports_efficiency_and_is_deterministic(tmp_path, capsys, sample, sp):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.mindrecord"
        assert run_cli("--input_glob", SAMPLE, "--output_file", out, "--seq_length", 256, "--pack", "True") == 0
        outputs.append(read_packed_rows(str(out)))
    report = capsys.readouterr().out
    assert all(np.array_equal(x, y) for row_a, row_b in zip(*outputs) for x, y in zip(row_a, row_b))
    assert len(outputs[0]) == len(outputs[1])
    rows = outputs[0]
    tokens = sum(min(257, _conversation_length(r["conversations"], sp)) for r in sample)
    assert f"packing: {len(sample)} conversations -> {len(rows)} rows" in report
    assert f"{tokens / (len(sample) * 257):.1%} -> {tokens / (len(rows) * 257):.1%}" in report
    per_row = {}
    for ids, labels, positions in rows:
        count = len(split_packed_row(ids, labels, positions))
        per_row[count] = per_row.get(count, 0) + 1
    assert "conversations per row: " + ", ".join(f"{k}: {v} rows" for k, v in sorted(per_row.items())) in report


def test_default_output_has_no_position_ids(sample_mindrecord):
    from mindspore.mindrecord import FileReader
    reader = FileReader(sample_mindrecord, num_consumer=1)
    assert sorted(reader.schema()) == ["input_ids", "labels"]
    reader.close()


def test_pack_rejects_bad_input_as_unpacked(tmp_path, capsys):
    record, problem = BAD_RECORDS["turn_without_from"]
    data = write_json(tmp_path / "data.json", [good_record(0), record])
    message = assert_fails(capsys, tmp_path, "--input_glob", data, "--pack", "True")
    assert problem in message


def test_pack_flag_takes_true_or_false(tmp_path, capsys):
    data = write_json(tmp_path / "data.json", [good_record(0)])
    with pytest.raises(SystemExit) as err:
        run_cli("--input_glob", data, "--output_file", tmp_path / "x.mindrecord", "--pack", "maybe")
    assert err.value.code == 2
    assert "--pack" in capsys.readouterr().err
