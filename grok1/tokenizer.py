"""SentencePiece tokenizer, used the way the official runner uses it, plus an incremental text decoder.

The official runner encodes prompts with default options: no BOS, no EOS (`add_bos=True` is
available for callers who want it). Streaming decodes pieces to bytes as they arrive: byte-fallback
pieces (`<0xNN>`) come one byte at a time, so an incremental UTF-8 decoder holds incomplete
characters back until they are whole.
"""

from __future__ import annotations

import os

import sentencepiece as spm

from .errors import Grok1Error

SPACE_MARK = "\u2581"  # SentencePiece's visible space


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise Grok1Error(f"{model_file}: no such tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as exc:
            raise Grok1Error(f"{model_file}: not a SentencePiece model ({exc})") from None
        self.path = model_file
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        # Bytes each id contributes when decoded, with the space marker as a real space.
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            if self.sp.is_control(i):
                self._bytes.append(b"")
            elif self.sp.is_byte(i):
                self._bytes.append(bytes([int(self.sp.id_to_piece(i)[3:5], 16)]))
            elif self.sp.is_unknown(i):
                self._bytes.append(self.sp.decode([i]).encode("utf-8"))
            else:
                self._bytes.append(self.sp.id_to_piece(i).replace(SPACE_MARK, " ").encode("utf-8"))
        # SentencePiece drops the dummy-prefix space only from a first piece that starts with the space
        # marker (not from user-defined pieces of raw spaces).
        self._marked = [self.sp.id_to_piece(i).startswith(SPACE_MARK) for i in range(self.vocab_size)]
        self._is_byte = [self.sp.is_byte(i) for i in range(self.vocab_size)]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=add_bos)

    def decode(self, ids: list[int]) -> str:
        self._check_ids(ids)
        return self.sp.decode(list(ids))

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise Grok1Error(f"token id {i} is outside the tokenizer's vocabulary of {self.vocab_size}")

    def piece_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            return b""
        return self._bytes[token_id]

    def stream_decoder(self, at_start: bool = True) -> StreamDecoder:
        return StreamDecoder(self, at_start)


class StreamDecoder:
    """Turns ids into text as they arrive; the concatenated output equals `Tokenizer.decode(all ids)`.

    Consecutive byte pieces are assembled into UTF-8 characters the way SentencePiece does: a byte that
    cannot start or continue a valid character becomes U+FFFD on its own, and an incomplete
    character is held back until the next piece completes it or proves it invalid.
    `at_start=True` applies SentencePiece's rule that the first piece's leading space (the dummy
    prefix) is dropped; a continuation after a prompt keeps it (`at_start=False`).
    """

    def __init__(self, tokenizer: Tokenizer, at_start: bool = True) -> None:
        self.tokenizer = tokenizer
        self.pending = b""
        self.first = at_start

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if not 0 <= token_id < tok.vocab_size:
            return ""
        data = tok.piece_bytes(token_id)
        if tok._is_byte[token_id]:
            self.first = False
            self.pending += data
            return self._drain(final=False)
        text = self._drain(final=True)
        if data and self.first:
            self.first = False
            if tok._marked[token_id]:
                data = data[1:]
        return text + data.decode("utf-8")

    def flush(self) -> str:
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        out = []
        while self.pending:
            length = _utf8_char_length(self.pending)
            if length > 0:
                out.append(self.pending[:length].decode("utf-8"))
                self.pending = self.pending[length:]
            elif length == 0 and not final:
                break  # a valid prefix: wait for the rest of the character
            else:
                out.append("\ufffd")
                self.pending = self.pending[1:]
        return "".join(out)


def _utf8_char_length(data: bytes) -> int:
    """Length of the valid UTF-8 character at the start of data; 0 if data is an incomplete but
    valid prefix; -1 if the first byte cannot start a valid character here."""
    for n in range(1, min(4, len(data)) + 1):
        try:
            data[:n].decode("utf-8")
            return n
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                return -1
    return 0 if len(data) < 4 else -1


def find_tokenizer(model_dir: str | os.PathLike[str]) -> str | None:
    """`tokenizer.model` inside or beside a model directory."""
    model_dir = os.fspath(model_dir)
    for candidate in (
        os.path.join(model_dir, "tokenizer.model"),
        os.path.join(os.path.dirname(os.path.abspath(model_dir)), "tokenizer.model"),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None
