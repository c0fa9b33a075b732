"""Baichuan2 tokenizer (SentencePiece) for MindFormers, role ids and a streaming decoder.

Differences from a plain SentencePiece wrapper such as MindFormers' ``LlamaTokenizer``:

* decoding is exact: special tokens are emitted literally without inserted spaces and
  ordinary pieces are decoded by SentencePiece from ids, so ``decode(encode(s)) == s``
  whenever the model itself is lossless (Baichuan2 and the bundled tiny model are:
  identity normalisation, no dummy prefix, byte fallback);
* ``user_token_id`` / ``assistant_token_id`` come from the pieces ``<reserved_106>`` /
  ``<reserved_107>`` or from constructor overrides, with a clear error if neither exists;
* :class:`StreamDecoder` turns generated ids into text one id at a time.
"""
import codecs
import os
from shutil import copyfile
from typing import Any, Dict, List, Optional

import sentencepiece as spm

from mindformers.models.tokenization_utils import AddedToken, PreTrainedTokenizer
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["Baichuan2Tokenizer", "StreamDecoder", "USER_PIECE", "ASSISTANT_PIECE"]

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
USER_PIECE = "<reserved_106>"
ASSISTANT_PIECE = "<reserved_107>"
_ROUND_TRIP_PROBE = " a  b\n1"


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class Baichuan2Tokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of Baichuan2 (no bos/eos added by default, pad = ``<unk>`` = 0).

    Args:
        vocab_file (str): path of the SentencePiece ``tokenizer.model``.
        unk_token, bos_token, eos_token, pad_token: special tokens (defaults as released).
        sp_model_kwargs (dict, optional): passed to ``SentencePieceProcessor``.
        add_bos_token / add_eos_token (bool): wrap encoded sequences with bos / eos.
        clean_up_tokenization_spaces (bool): keep ``False`` for an exact round trip.
        user_token_id / assistant_token_id (int, optional): role ids overriding the lookup of
            ``<reserved_106>`` / ``<reserved_107>`` (e.g. from the YAML ``processor.tokenizer``).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    FILE_LIST = ["tokenizer_config.json"]

    def __init__(
            self,
            vocab_file,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
            sp_model_kwargs: Optional[Dict[str, Any]] = None,
            add_bos_token=False,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            **kwargs,
    ):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer vocab_file {vocab_file!r} does not exist; set "
                                    "processor.tokenizer.vocab_file to a SentencePiece tokenizer.model")
        self.vocab_file = vocab_file
        self.sp_model_kwargs = {} if sp_model_kwargs is None else sp_model_kwargs
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # Left in kwargs on purpose: they then land in init_kwargs and survive save_pretrained.
        self._user_token_id_override = _optional_int(kwargs.get("user_token_id"), "user_token_id")
        self._assistant_token_id_override = _optional_int(kwargs.get("assistant_token_id"),
                                                          "assistant_token_id")
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        if self.sp_model.decode(self.sp_model.encode(_ROUND_TRIP_PROBE)) != _ROUND_TRIP_PROBE:
            logger.warning("%s is lossy (whitespace folding, dummy prefix or no byte fallback): "
                           "decode(encode(text)) will not always give the text back", vocab_file)

        super().__init__(
            bos_token=_special(bos_token),
            eos_token=_special(eos_token),
            unk_token=_special(unk_token),
            pad_token=_special(pad_token),
            sp_model_kwargs=self.sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__ = state
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(self.sp_model_proto)

    # ----- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (added tokens not included)."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        # The base class counts special tokens twice when they are already pieces.
        return self.vocab_size + sum(1 for index in self._added_tokens_decoder if index >= self.vocab_size)

    def get_vocab(self) -> Dict[str, int]:
        """Piece -> id for all pieces and added tokens."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs) -> List[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index) -> str:
        return self.sp_model.id_to_piece(index)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Copy the SentencePiece model into ``save_directory``; returns ``(path,)``."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary: {save_directory} is not a directory")
        out_file = os.path.join(save_directory,
                                (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) == os.path.abspath(out_file):
            return (out_file,)
        if os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_file)
        else:  # the file went away after loading (e.g. a temp dir): write what is in memory
            with open(out_file, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out_file,)

    # ----- role ids -----------------------------------------------------------------------
    @property
    def user_token_id(self) -> int:
        """Id of the user role token (``<reserved_106>``, 195 in the released vocab)."""
        return self._role_id(USER_PIECE, self._user_token_id_override, "user_token_id")

    @property
    def assistant_token_id(self) -> int:
        """Id of the assistant role token (``<reserved_107>``, 196 in the released vocab)."""
        return self._role_id(ASSISTANT_PIECE, self._assistant_token_id_override, "assistant_token_id")

    def _role_id(self, piece: str, override: Optional[int], name: str) -> int:
        if override is not None:
            if not 0 <= override < len(self):
                raise ValueError(f"{name}={override} is outside the vocabulary of {self.vocab_file} "
                                 f"(size {len(self)}); fix {name} in processor.tokenizer of the YAML")
            return override
        index = self.sp_model.piece_to_id(piece)
        # piece_to_id answers unk_id for unknown pieces, so check the piece really is there.
        if self.sp_model.id_to_piece(index) != piece:
            raise ValueError(f"tokenizer {self.vocab_file} has no piece {piece} for {name}; "
                             f"set {name} (Baichuan2: user_token_id 195, assistant_token_id 196) "
                             "under processor.tokenizer in the YAML")
        return index

    # ----- special tokens around sequences --------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        """``[bos]? + ids + [eos]?``; a second sequence is wrapped the same way."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        """1 where ``build_inputs_with_special_tokens`` adds a token, else 0."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0=token_ids_0, token_ids_1=token_ids_1,
                                                   already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: List[int],
                                             token_ids_1: Optional[List[int]] = None) -> List[int]:
        """0 for the first sequence (with its special tokens), 1 for the second."""
        first = len(self.build_inputs_with_special_tokens(token_ids_0))
        if token_ids_1 is None:
            return [0] * first
        return [0] * first + [1] * len(self.build_inputs_with_special_tokens(token_ids_1))

    # ----- decoding -----------------------------------------------------------------------
    def _literal_text(self, index: int, skip_special_tokens: bool) -> Optional[str]:
        """Text of an added/special token (``""`` if skipped), or None for an ordinary piece.

        Shared by ``decode`` and :class:`StreamDecoder` so the two always agree.
        """
        token = self._added_tokens_decoder.get(index)
        if token is None:
            if not 0 <= index < self.vocab_size:
                raise IndexError(f"token id {index} is outside the vocabulary of {self.vocab_file} "
                                 f"(size {self.vocab_size})")
            return None
        if skip_special_tokens and index in self.all_special_ids:
            return ""
        return token.content

    def _decode(self, token_ids, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: Optional[bool] = None, **kwargs) -> str:
        # Runs of ordinary ids go through SentencePiece in one call so byte-fallback pieces
        # join into characters; special tokens are written as they are, without the spaces
        # the legacy decoders insert (spaces_between_special_tokens is ignored), so the text
        # round-trips.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        kwargs.pop("use_source_tokenizer", None)
        kwargs.pop("spaces_between_special_tokens", None)
        parts, run = [], []
        for index in token_ids:
            index = int(index)
            literal = self._literal_text(index, skip_special_tokens)
            if literal is None:
                run.append(index)
                continue
            if run:
                parts.append(self.sp_model.decode(run))
                run = []
            parts.append(literal)
        if run:
            parts.append(self.sp_model.decode(run))
        text = "".join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Join pieces back into text (same rules as ``decode``)."""
        return self._decode(self.convert_tokens_to_ids(tokens), clean_up_tokenization_spaces=False)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh :class:`StreamDecoder` for this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get the newly completed text.

    ``"".join(put(i) for i in ids) + end() == tokenizer.decode(ids, skip_special_tokens=...)``.

    * Byte-fallback pieces (``<0xE4>`` ...) are held back until they form a whole UTF-8
      character, so a partial character is never emitted (``end()`` flushes a dangling one).
    * Each step decodes the new ids together with already emitted ones (back to the last piece
      with visible text) and returns only the difference, so SentencePiece's handling of a
      leading ``▁`` never eats a space.
    """

    def __init__(self, tokenizer: Baichuan2Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._sp = tokenizer.sp_model
        self._context: List[int] = []  # last emitted ids of the current run
        self._pending: List[int] = []  # ids whose text is not emitted yet

    def put(self, token_id) -> str:
        """Add one id; return the text it completes (possibly ``""``)."""
        index = int(token_id)
        literal = self.tokenizer._literal_text(index, self.skip_special_tokens)  # pylint: disable=W0212
        if literal is not None:
            # decode() decodes each run of ordinary ids on its own: close the run here.
            return self._flush() + literal
        self._pending.append(index)
        if self._ends_inside_character():
            return ""
        return self._emit()

    def end(self) -> str:
        """Flush what is held back (an incomplete character decodes to U+FFFD as in ``decode``)."""
        return self._flush()

    def reset(self) -> None:
        """Forget all state, to decode a new sequence."""
        self._context, self._pending = [], []

    def _emit(self) -> str:
        ids = self._context + self._pending
        before = self._sp.decode(self._context)
        after = self._sp.decode(ids)
        self._context, self._pending = ids[self._anchor(ids):], []
        return after[len(before):]

    def _anchor(self, ids: List[int]) -> int:
        """Index of the last piece with visible text, where the next context may start.

        SentencePiece strips *all* leading '▁' of a decoded sequence when the model adds a
        dummy prefix, so a context made only of spaces would swallow the spaces that follow.
        Starting at a piece with other text (never a byte piece, which may be mid-character)
        keeps both decodes aligned; without one, keep the whole run.
        """
        for pos in range(len(ids) - 1, -1, -1):
            index = ids[pos]
            if (self._sp.is_byte(index) or self._sp.is_control(index) or self._sp.is_unknown(index)):
                continue
            if self._sp.id_to_piece(index).strip("\u2581"):
                return pos
        return 0

    def _flush(self) -> str:
        text = self._emit() if self._pending else ""
        self.reset()
        return text

    def _ends_inside_character(self) -> bool:
        tail = bytearray()
        for index in reversed(self._pending):
            if not self._sp.is_byte(index):
                break
            tail.insert(0, int(self._sp.id_to_piece(index)[3:5], 16))
        if not tail:
            return False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(tail), final=False)
        # Bytes still buffered = a valid but unfinished multi-byte sequence.
        return bool(decoder.getstate()[0])


def _special(token):
    if isinstance(token, str):
        return AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
    return token


def _optional_int(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer token id, got {value!r}; "
                         f"fix {name} under processor.tokenizer in the YAML")
    return value
