"""The embedded world as a :class:`swiftjax.tasks.Task`: generated problems, exact integer answers."""
from __future__ import annotations

from swiftjax.tasks import Problem
from swiftjax.world import problems as world


def world_problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of a world split (default :class:`WorldConfig`), as Task problems."""
    return [Problem(id=p.id, question=p.question, gold=str(p.answer), solution=p.solution)
            for p in world.make_split(split, n, seed=seed)]
