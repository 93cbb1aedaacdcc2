"""What a credential allows: per operation, globs over stream paths.

A JWT carries them in its ``ds`` claim::

    {"ds": {"read": ["chat/*"], "append": ["chat/42"], "create": [], "delete": []}}

Each entry is a glob of gateway/protocol/globs.py (section 6.2); an operation
not named grants nothing. ``read`` covers GET and HEAD, ``append`` POST
(appends and closing), ``create`` PUT, ``delete`` DELETE; a fork needs
``create`` on itself and ``read`` on its source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.globs import compile_glob

from . import Operation

SCOPE_CLAIM = "ds"
ANSWERS_KEPT = 64


@dataclass(frozen=True, slots=True)
class Scopes:
    globs: Mapping[Operation, tuple[str, ...]] = field(default_factory=dict)
    # Per operation, the globs as one regular expression: a check is one match.
    _compiled: dict[Operation, re.Pattern[str]] = field(init=False, repr=False, compare=False)
    # Recent answers: a client asks about the same few streams again and again.
    _answers: dict[tuple[Operation, str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = {
            operation: re.compile("|".join(compile_glob(p).pattern for p in patterns))
            for operation, patterns in self.globs.items()
            if patterns
        }
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_answers", {})

    def allows(self, operation: Operation, path: str) -> bool:
        key = (operation, path)
        answer = self._answers.get(key)
        if answer is None:
            pattern = self._compiled.get(operation)
            answer = pattern is not None and pattern.match(path) is not None
            if len(self._answers) >= ANSWERS_KEPT:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    @classmethod
    def from_claim(cls, claim: Any) -> Scopes:
        """The scopes of a ``ds`` claim; ValueError when it is malformed (a
        token the issuer got wrong is refused, not read leniently)."""
        if claim is None:
            return cls()
        if not isinstance(claim, dict):
            raise ValueError("the ds claim must be an object")
        globs: dict[Operation, tuple[str, ...]] = {}
        for name, patterns in claim.items():
            try:
                operation = Operation(name)
            except ValueError:
                raise ValueError(f"unknown operation {name!r} in the ds claim") from None
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"ds.{name} must be a list of path globs")
            for pattern in patterns:
                compile_glob(pattern)  # ValueError when malformed
            globs[operation] = tuple(patterns)
        return cls(globs)
