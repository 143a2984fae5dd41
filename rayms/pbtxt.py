"""A small reader of the protocol-buffer text format, enough for Triton's ``config.pbtxt``.

Triton model repositories describe each model in ``config.pbtxt``, a ``ModelConfig`` message in protobuf's
text format. Reading it properly needs Triton's ``.proto`` schema and a protobuf runtime; rayms reads only
a handful of fields (name, platform/backend, version policy, inputs, outputs, batching), so this reader
parses the text format without a schema instead, and the caller picks the fields it knows. The subset:

* ``field: value`` and ``field { ... }`` / ``field: { ... }`` (messages, nested to any depth);
* values: double- or single-quoted strings (adjacent strings are joined; ``\\n \\t \\r \\\\ \\" \\'``
  escapes), integers, floats, and bare identifiers (enum values such as ``TYPE_FP32``, ``true``);
* lists ``[a, b]`` of values or of messages; a repeated field may also simply appear several times;
* ``#`` comments, and ``,`` or ``;`` after a field.

Every field maps to a list of its values (a schema would say which fields repeat; without one, each may),
so ``message["input"]`` is every ``input`` block and :func:`single` reads a singular field. Unknown fields are
kept, never an error; text this grammar cannot read, or messages nested deeper than 64, are
:class:`PbtxtError` naming the line.
"""

from __future__ import annotations

import re
from typing import Any

from rayms.errors import InvalidSpec

Message = dict[str, list[Any]]

_TOKEN = re.compile(r"""
    (?P<space>[\s,;]+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.]))
  | (?P<word>[-+]?[A-Za-z_][\w.]*)
  | (?P<punct>[{}\[\]:<>])
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_CLOSE = {"{": "}", "<": ">"}


class PbtxtError(InvalidSpec):
    """Text that is not in the protobuf text format subset this reader knows."""


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), text[1:-1])


def _tokens(text: str) -> list[tuple[str, str, int]]:
    tokens, position, line = [], 0, 1
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise PbtxtError(f"line {line}: cannot read {text[position:position + 20]!r}")
        kind = match.lastgroup
        if kind != "space":
            tokens.append((kind, match.group(), line))
        line += match.group().count("\n")
        position = match.end()
    return tokens


MAX_DEPTH = 64  # nested messages; deeper text is refused rather than exhausting the stack


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise PbtxtError(f"unexpected end of text{f'; expected {expected!r}' if expected else ''}")
        if expected is not None and token[1] != expected:
            raise PbtxtError(f"line {token[2]}: expected {expected!r}, found {token[1]!r}")
        self.at += 1
        return token

    def message(self, close: str | None) -> Message:
        fields: Message = {}
        while True:
            token = self.peek()
            if token is None or token[1] == close:
                if close is not None:
                    self.take(close)
                return fields
            kind, name, line = self.take()
            if kind != "word":
                raise PbtxtError(f"line {line}: expected a field name, found {name!r}")
            if self.peek() is not None and self.peek()[1] == ":":
                self.take(":")
            values = self.value(line)
            fields.setdefault(name, []).extend(values)

    def value(self, line: int) -> list[Any]:
        token = self.peek()
        if token is None:
            raise PbtxtError(f"line {line}: a field has no value")
        kind, text, line = token
        if text in _CLOSE:
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise PbtxtError(f"line {line}: messages nested deeper than {MAX_DEPTH}")
            message = self.message(_CLOSE[text])
            self.depth -= 1
            return [message]
        if text == "[":
            self.take()
            items: list[Any] = []
            while self.peek() is not None and self.peek()[1] != "]":
                if self.peek()[1] == "[":
                    raise PbtxtError(f"line {self.peek()[2]}: a list cannot hold a list")
                items.extend(self.value(line))
            self.take("]")
            return items
        self.take()
        if kind == "string":
            joined = _unquote(text)
            while self.peek() is not None and self.peek()[0] == "string":
                joined += _unquote(self.take()[1])
            return [joined]
        if kind == "number":
            return [float(text) if any(c in text for c in ".eE") else int(text)]
        if kind == "word":
            return [{"true": True, "false": False}.get(text, text)]
        raise PbtxtError(f"line {line}: unexpected {text!r}")


def parse(text: str) -> Message:
    """The message in ``text``: each field name -> the list of its values (messages are dicts again)."""
    return _Parser(text).message(None)


_KINDS = {dict: "a message", str: "a string", int: "an integer", float: "a number"}


def single(message: Message, field: str, default: Any = None, kind: type | None = None) -> Any:
    """The value of a singular ``field`` (the last one written, should it appear twice), or ``default``.
    With ``kind`` (``dict`` for a message, ``str``, ``int``, ``float``) another type is :class:`PbtxtError`."""
    values = message.get(field) or []
    if not values:
        return default
    value = values[-1]
    if kind is not None:
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise PbtxtError(f"{field} must be {_KINDS.get(kind, kind.__name__)}, got {value!r}")
    return value


def messages(message: Message, field: str) -> list[Message]:
    """Every value of a repeated message ``field``; another type is :class:`PbtxtError`."""
    values = message.get(field) or []
    if not all(isinstance(v, dict) for v in values):
        raise PbtxtError(f"{field} must hold messages, got {values!r}")
    return values
