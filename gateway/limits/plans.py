"""The checks of a set of limit scopes, resolved once per scope set rather than per request.

A scope is a key prefix (``keys.team(...)``, ``keys.model(...)``, ...) with its ``Limits``. Request
limits and parallel slots are the same for every request, so their ``Check``s are built once and
shared; a token check carries the request's own reservation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.config import Config, Limits
from gateway.state.base import Check

# A parallel slot left behind by a crashed instance is forgotten after the longest possible request.
_STALE_MARGIN_S = 60


def stale_ms(config: Config) -> int:
    """How long a parallel slot is held at most: the longest request any provider allows, plus a margin."""
    longest = max((p.timeouts.total for p in config.providers), default=600.0)
    return int((longest + _STALE_MARGIN_S) * 1000)


class Slots:
    """Parallel-slot ids. SECURITY: a slot is keyed by an id the gateway makes, never by a client's
    (requests sharing an x-request-id would share a slot and bypass max_parallel); random per
    instance, so two gateways never share one."""

    __slots__ = ("_counter", "_prefix", "stale_ms")

    def __init__(self, stale_ms: int, tag: str = "") -> None:
        self._prefix = tag + os.urandom(6).hex()
        self._counter = itertools.count(1)
        self.stale_ms = stale_ms

    def member(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


@dataclass(frozen=True, slots=True)
class ScopePlan:
    rpm: tuple[Check, ...]  # request-independent: shared by every request
    tpm: tuple[tuple[str, int, float], ...]  # (key, limit, refill per second)
    parallel: tuple[tuple[str, int], ...]  # (key, limit)
    tightest_tpm: int

    @classmethod
    def of(cls, scopes: Sequence[tuple[str, Limits]]) -> ScopePlan:
        return cls(
            rpm=tuple(
                Check("bucket", f"{k}:rpm", lim.rpm, "rpm", rate=lim.rpm / 60, cost=1)
                for k, lim in scopes
                if lim.rpm
            ),
            tpm=tuple((f"{k}:tpm", lim.tpm, lim.tpm / 60) for k, lim in scopes if lim.tpm),
            parallel=tuple((f"{k}:par", lim.max_parallel) for k, lim in scopes if lim.max_parallel),
            tightest_tpm=min((lim.tpm for _, lim in scopes if lim.tpm), default=0),
        )

    def declare(self, into: list[Check], tokens: int, slots: Slots, within: str = "") -> None:
        """Append this plan's checks for one request reserving ``tokens``; with ``within``, only
        those of the scopes under that key prefix."""
        into.extend(_within(self.rpm, within))
        for key, limit, rate in self.tpm:
            if key.startswith(within):
                into.append(Check("bucket", key, limit, "tpm", rate=rate, cost=tokens))
        if self.parallel:
            member = slots.member()
            for key, limit in self.parallel:
                if key.startswith(within):
                    into.append(
                        Check("parallel", key, limit, "parallel", member=member, stale_ms=slots.stale_ms)
                    )


def _within(checks: tuple[Check, ...], prefix: str) -> Iterable[Check]:
    return checks if not prefix else (c for c in checks if c.key.startswith(prefix))
