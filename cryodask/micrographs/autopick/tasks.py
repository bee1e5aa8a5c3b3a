"""One task per micrograph, through the block runner: on the cluster's workers when there is a
client, else a plain loop."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.runner import run_blocks


@dataclass(frozen=True)
class _Micrograph:
    """One item of work: its position in the list (its task's name) and its arguments."""

    name: str
    args: tuple


def _apply(region, func, kwargs):
    return func(*region.block.args, **kwargs)


def map_micrographs(client, func, items: list[tuple], name: str, **kwargs) -> list:
    """``[func(*item, **kwargs) for item in items]``, each a retried task on ``client``.

    Results come back in the order of ``items``; the first task's error is raised here, as it
    would be in the loop."""
    work = [_Micrograph(str(i), tuple(item)) for i, item in enumerate(items)]
    return run_blocks(client, _apply, work, step=name, args=(func, kwargs), stage=None, fault=False)
