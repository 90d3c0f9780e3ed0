"""Token ids -> text deltas for streaming, with stop sequences.

Decoding each new token alone breaks words whose bytes span tokens (a half UTF-8 character decodes to U+FFFD)
and loses the leading space SentencePiece tokenizers attach to a word; decoding everything again per token costs
O(n^2). As in TGI and vLLM, a short window from the previous read offset is decoded, and only text that can no
longer change is released. Text that could be the start of a stop sequence is held back until it is known not
to be one, so a stop string never reaches the client.
"""

from __future__ import annotations


class TextStream:
    """Accumulates generated ids; `push` returns the text safe to send and whether a stop sequence ended it."""

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (released or held)
        self.sent = 0  # characters of `text` already released
        self._prefix = 0
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns `(delta, stopped)`. After a stop, the text is cut before the stop sequence."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False  # nothing new yet, or a character whose bytes are not all here
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        cut = self._earliest_stop()
        if cut is not None:
            self.stopped = True
            delta = self.text[self.sent:cut]
            self.text = self.text[:cut]
            self.sent = cut
            return delta, True
        end = len(self.text) - self._held_back()
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta, False

    def _earliest_stop(self) -> int | None:
        found = None
        for s in self.stop:
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (found is None or i < found):
                found = i
        return found

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop sequence."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def finish(self) -> tuple[str, bool]:
        """The text still held back when generation ends (also a trailing partial character, as the tokenizer
        decodes it) and whether a stop sequence is in it: then the text is cut before it, as in `push`."""
        if self.stopped:
            return "", True
        tail = self._decode(self.ids[self._prefix:])
        before = self._decode(self.ids[self._prefix:self._read])
        if len(tail) > len(before):
            self.text += tail[len(before):]
            self._prefix = self._read = len(self.ids)
        cut = self._earliest_stop()
        self.stopped = cut is not None
        end = len(self.text) if cut is None else cut
        delta = self.text[self.sent:end]
        self.text, self.sent = self.text[:end], end
        return delta, self.stopped
