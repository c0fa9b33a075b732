"""Train a small SentencePiece BPE model laid out like the Baichuan2 tokenizer.

The real Baichuan2 ``tokenizer.model`` is not available here, so demos and tests use a
tiny stand-in trained on Belle chat data. It keeps what the code depends on:

* ``<unk>`` = 0 (also the pad token), ``<s>`` = 1, ``</s>`` = 2;
* ``<reserved_106>`` = 195 (user role) and ``<reserved_107>`` = 196 (assistant role),
  as user-defined symbols so the literal text encodes to one id;
* byte fallback, no text normalisation, no dummy prefix, digits split one by one
  (Baichuan2 tokenizer settings), so ``decode(encode(s)) == s`` for any text.

Usage::

    python research/baichuan2/train_tiny_tokenizer.py \
        --input research/baichuan2/assets/belle_sample.json \
        --output research/baichuan2/assets/tokenizer.model --overwrite
"""
import argparse
import io
import json
import os
import sys
import tempfile
from typing import Iterable, Iterator, List, Sequence

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "assets", "belle_sample.json")
DEFAULT_OUTPUT = os.path.join(HERE, "assets", "tokenizer.model")

USER_PIECE = "<reserved_106>"
ASSISTANT_PIECE = "<reserved_107>"
# In the released vocab <reserved_k> has id k + 89 (106 -> 195, 107 -> 196).
RESERVED_OFFSET = 89
FIRST_FREE_ID = 3  # after <unk>, <s>, </s>


def reserved_symbols(last_reserved: int = 107) -> List[str]:
    """User-defined symbols for ids 3 .. ``last_reserved + 89``, in id order.

    Ids 3..88 hold placeholders (``<unused_3>`` ...): what the released vocab has there
    is not known, only that ``<reserved_k>`` sits at ``k + 89``.
    """
    unused = [f"<unused_{i}>" for i in range(FIRST_FREE_ID, RESERVED_OFFSET)]
    reserved = [f"<reserved_{k}>" for k in range(last_reserved + 1)]
    return unused + reserved


def iter_belle_texts(paths: Sequence[str]) -> Iterator[str]:
    """Yield every string ``value`` of every turn in Belle-format JSON files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} "
                                 f"column {err.colno}); pass Belle-format JSON files") from err
        if not isinstance(records, list):
            raise ValueError(f"{path}: top level is {type(records).__name__}, expected a JSON array "
                             "of {\"id\", \"conversations\"} records")
        for record in records:
            turns = record.get("conversations") if isinstance(record, dict) else None
            for turn in turns if isinstance(turns, list) else []:
                value = turn.get("value") if isinstance(turn, dict) else None
                if isinstance(value, str) and value:
                    yield value


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000, with_role_pieces: bool = True) -> bytes:
    """Train the BPE model on ``texts`` and return the serialized model.

    Whole turns (newlines included) are fed as sentences so that ``\\n`` becomes an ordinary
    piece. One thread and no sampling make the output byte-for-byte reproducible.
    ``with_role_pieces=False`` leaves out all reserved symbols (for testing the error path).
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=reserved_symbols() if with_role_pieces else [],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=1 << 20,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    if with_role_pieces:
        _check_layout(proto)
    return proto


def _check_layout(proto: bytes) -> None:
    """Fail loudly if SentencePiece ever places the fixed pieces elsewhere."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2,
                USER_PIECE: 106 + RESERVED_OFFSET, ASSISTANT_PIECE: 107 + RESERVED_OFFSET}
    got = {piece: sp.piece_to_id(piece) for piece in expected}
    if got != expected:
        raise RuntimeError(f"unexpected piece ids {got}, expected {expected}")


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates the file 0600; give it the usual permissions of a new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--input", nargs="+", default=[DEFAULT_INPUT],
                        help="Belle-format JSON file(s) (default: the bundled sample)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write tokenizer.model")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        proto = train_tokenizer(iter_belle_texts(args.input), vocab_size=args.vocab_size)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_atomically(args.output, proto)
    size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    print(f"wrote {args.output}: {size} pieces, {len(proto)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
