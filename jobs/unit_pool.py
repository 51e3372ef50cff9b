"""Running work units on a pool of Ray actors: each unit done exactly once, or the job fails.

Exactly once comes from the units themselves: a unit's files appear whole or not at all
(workers.unit_writer), so re-running a unit whose attempt died leaves one copy of each sample.
This module supplies the retries: a unit whose task raises, or whose actor dies (a killed
process, a lost node), goes back to the queue; a dead actor is replaced by a new one, which Ray
places on whatever node still has room. A unit that fails ``max_attempts`` times ends the job
with ``UnitFailed`` naming the unit and the cause; units already finished stay finished, and
``generate --resume`` continues from them.

We requeue ourselves instead of relying on ``max_task_retries`` so that every attempt is
counted and reported, and so that a unit is never retried on an actor whose constructor failed
(for example: the shield index did not pass its checksum, so it cannot be searched).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

import ray


class UnitFailed(RuntimeError):
    """A unit failed on every attempt: the job stops, finished units stay."""


@dataclass
class PoolStats:
    attempts: int = 0
    retries: int = 0
    actors_replaced: int = 0


def failure_message(exc: BaseException) -> str:
    """One line saying why an attempt failed, with Ray's wrapping peeled off."""
    cause = exc
    for _ in range(5):
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause or not isinstance(inner, BaseException):
            break
        cause = inner
    if cause is not exc and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "ray.", "^")):
            return line
    return lines[-1] if lines else type(exc).__name__


def run_units(
    units: list,
    make_actor: Callable[[], "ray.actor.ActorHandle"],
    workers: int,
    on_result: Callable[[object, dict], None],
    max_attempts: int = 3,
    retry_delay: float = 0.5,
) -> PoolStats:
    """Run ``actor.run_unit.remote(unit)`` for every unit on ``workers`` actors."""
    stats = PoolStats()
    queue = collections.deque(units)
    attempts: collections.Counter = collections.Counter()
    idle = [make_actor() for _ in range(min(workers, len(units)))]
    pending: dict = {}
    try:
        while queue or pending:
            while idle and queue:
                actor, unit = idle.pop(), queue.popleft()
                attempts[unit.index] += 1
                stats.attempts += 1
                pending[actor.run_unit.remote(unit)] = (actor, unit)
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, unit = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                reason = failure_message(exc)
                if attempts[unit.index] >= max_attempts:
                    # No replacement actor first: one created only to be dropped has its creation
                    # cancelled at shutdown, and Ray logs that after the job's failure line.
                    _kill(actor)
                    raise UnitFailed(f"unit {unit.index} failed {attempts[unit.index]} times; last: {reason}") from None
                if isinstance(exc, ray.exceptions.RayActorError):
                    # The process is gone (killed, node lost, constructor failed): a new actor.
                    _kill(actor)
                    actor = make_actor()
                    stats.actors_replaced += 1
                stats.retries += 1
                queue.appendleft(unit)
                idle.append(actor)
                time.sleep(retry_delay)
                continue
            on_result(unit, result)
            idle.append(actor)
    finally:
        for actor, _ in pending.values():
            _kill(actor)
        for actor in idle:
            _kill(actor)
    return stats


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead: nothing to release
        pass
