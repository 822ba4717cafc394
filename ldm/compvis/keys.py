"""Bookkeeping shared by the CompVis translators: what was translated, what was ignored, and the one-line refusal.

Every key of a CompVis block is accounted for: taken (translated), ignored (it changes nothing here, listed once),
or refused (``ConfigError`` naming the key and what would be needed). ``Params.finish`` refuses whatever is left,
so a key this translation does not know is never dropped without a word.
"""
from __future__ import annotations

from typing import Any, Iterable

from ldm.util import ConfigError

_UNSET = object()


class Record:
    """What a translation did, in the order it did it: translated blocks, ignored keys, notes."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.ignored: list[str] = []
        self.notes: list[str] = []

    def block(self, where: str, old: str, new: str) -> None:
        self.blocks.append(f"{where}: {old} → {new}")

    def note(self, line: str) -> None:
        self.notes.append(line)

    def lines(self) -> list[str]:
        """One line per translated block, one line listing every ignored key, then the notes."""
        out = [f"compvis: {line}" for line in self.blocks]
        if self.ignored:
            out.append("compvis: ignored (no effect here): " + ", ".join(self.ignored))
        return out + [f"compvis: {line}" for line in self.notes]


class Params:
    """The ``params`` of one CompVis block at ``where``, consumed key by key."""

    def __init__(self, params: dict | None, where: str, record: Record, known: Iterable[str] = ()) -> None:
        self.params = dict(params or {})
        self.where, self.record = where, record
        self.known = list(known)
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def key(self, name: str) -> str:
        return f"{self.where}.{name}"

    def take(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.params.get(name, default)

    def ignore(self, name: str, why_refused: str | None = None, allowed: Any = _UNSET) -> None:
        """Mark ``name`` ignored. With ``allowed`` (a value, or a tuple of values), any other value is refused
        with ``why_refused``: the key then asks for something this project does not do."""
        if name not in self.params:
            return
        self.used.add(name)
        value = self.params[name]
        if allowed is not _UNSET:
            values = allowed if isinstance(allowed, tuple) else (allowed,)
            if value not in values:
                self.refuse(name, why_refused or "only " + " or ".join(map(repr, values)) + " is supported")
        self.record.ignored.append(self.key(name))

    def refuse(self, name: str, why: str) -> None:
        raise ConfigError(f"{self.key(name)}: {self.params.get(name)!r} cannot be translated: {why}")

    def finish(self, what: str) -> None:
        """Refuse the first key nobody took or ignored."""
        rest = [k for k in self.params if k not in self.used]
        if rest:
            known = sorted(set(self.known) | self.used)
            raise ConfigError(f"{self.key(rest[0])}: not a key of {what} that this project translates "
                              f"(translated or ignored: {', '.join(known)})")


def refuse(where: str, why: str) -> None:
    raise ConfigError(f"{where}: {why}")
