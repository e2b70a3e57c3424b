"""The seeded fault schedule of a chaos run (pure: the same seed, the same schedule).

Faults run one at a time: each starts, lasts ``duration`` seconds, and is healed
before a short calm gap and the next one. Targets that depend on the cluster at
that moment ("the leader") are resolved by the nemesis at run time, using
``pick`` so that the choice among equals is seeded too.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

VARIANTS: dict[str, tuple[str, ...]] = {
    "kill": ("random", "leader", "minority"),
    "pause": ("random", "leader"),
    "partition": ("isolate-leader", "halves", "bridge", "ring", "one-way"),
    "loss": ("all", "one"),
    "clock": ("forward", "backward"),
    "member": ("add-remove", "remove-leader"),
}
KINDS = tuple(VARIANTS)


@dataclass(frozen=True)
class Fault:
    number: int
    start: float  # seconds after the run started
    duration: float
    kind: str
    variant: str
    pick: int  # seeds the choice of targets at run time
    amount: float  # loss percent, clock jump seconds, pause length...

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def schedule(seed: int, duration: float, kinds: list[str], nodes: int,
             start_after: float = 4.0, calm: tuple[float, float] = (2.0, 4.0)) -> list[Fault]:
    """Faults for a run of ``duration`` seconds, cycling through ``kinds`` in a seeded
    order so that a short run still sees every kind."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = start_after
    order: list[str] = []
    while True:
        if not order:
            order = list(kinds)
            rng.shuffle(order)
        kind = order.pop()
        variants = [v for v in VARIANTS[kind] if _fits(kind, v, nodes)]
        variant = rng.choice(variants)
        if kind == "pause":
            length = rng.uniform(1.5, 4.0)  # longer than the election timeout
        elif kind == "member":
            length = rng.uniform(6.0, 10.0)
        else:
            length = rng.uniform(3.0, 7.0)
        if kind == "loss":
            amount = float(rng.choice([5, 10, 20, 30]))
        elif kind == "clock":
            amount = rng.uniform(10, 120) * (1 if variant == "forward" else -1)
        else:
            amount = 0.0
        if t + length > duration - 1.0:
            break
        faults.append(Fault(len(faults) + 1, round(t, 3), round(length, 3), kind, variant,
                            rng.randrange(1 << 30), round(amount, 3)))
        t += length + rng.uniform(*calm)
    return faults


def _fits(kind: str, variant: str, nodes: int) -> bool:
    if kind == "partition" and variant == "ring":
        return nodes >= 4
    if kind == "partition" and variant == "bridge":
        return nodes >= 3
    return True
