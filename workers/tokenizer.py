"""Tokenizer of a checkpoint's tokenizer.json (tokenizers library) and incremental detokenization."""
from __future__ import annotations

from pathlib import Path

from orchestrator.errors import CheckpointError

CONTEXT_TOKENS = 4  # prompt tokens decoded with the output so that word boundaries come out right


class Tokenizer:
    """Encode text and decode token ids with the model's own tokenizer.json."""

    def __init__(self, model_dir: Path | str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(model_dir) / "tokenizer.json"
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for missing or bad files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(
            tid for tid, tok in self._tok.get_added_tokens_decoder().items() if tok.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text (special tokens such as BOS as the tokenizer's post-processor adds them)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one token id ('' when unknown)."""
        return self._tok.id_to_token(token_id) or ""

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A fresh incremental detokenizer for the output that follows prompt_ids."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns output tokens into text deltas that never split a multi-byte character.

    It decodes a short window of tokens twice (without and with the new ones) and emits the
    difference once it no longer ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0                 # window start
        self._read = len(self._ids)      # tokens before this index have been emitted

    def add(self, token_id: int, final: bool = False) -> str:
        """Append one token; returns the newly complete text (all that is left when final)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        if final and after.startswith(before):
            return after[len(before):]
        return ""


class TextStream:
    """The text of one request's outputs: incremental detokenization and stop strings.

    It runs where outputs are consumed (the RPC front end's process), not on the engine thread. Text
    that could still turn out to begin a stop string is held back until it cannot; a matched stop
    string and everything after it is never handed out.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 stops: list[str] | tuple[str, ...] = ()) -> None:
        self._det = tokenizer.detokenizer(prompt_ids, skip_special_tokens)
        self._stops = list(stops)
        self.text = ""     # all text so far (cut at a matched stop string)
        self._sent = 0     # characters of it handed out

    def add(self, token_ids: list[int], final: bool) -> tuple[str, str | None]:
        """Feed one output's tokens (`final`: the engine ended the sequence with them). Returns the text
        to hand out now and the stop string that matched (the request then ends here), or None."""
        for i, tok in enumerate(token_ids):
            self.text += self._det.add(tok, final=final and i == len(token_ids) - 1)
        hit = find_stop_string(self.text, self._stops, self._sent)
        if hit is not None:
            self.text = self.text[:hit[0]]
        end = len(self.text) if final or hit else len(self.text) - held_back(self.text, self._stops)
        end = max(end, self._sent)
        out, self._sent = self.text[self._sent:end], end
        return out, None if hit is None else hit[1]


def find_stop_string(text: str, stops: list[str], sent: int) -> tuple[int, str] | None:
    """Earliest stop string in the unsent part of text (plus its possible overlap with sent text)."""
    if not stops:
        return None
    best = None
    for s in stops:
        i = text.find(s, max(0, sent - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that could start a stop string (not sent yet)."""
    if not stops:
        return 0
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0
