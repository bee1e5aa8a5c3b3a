"""One task per micrograph: on the cluster's workers when there is a client, else a plain loop."""

from __future__ import annotations

import uuid


def map_micrographs(client, func, items: list[tuple], name: str, **kwargs) -> list:
    """``[func(*item, **kwargs) for item in items]``, each a retried task on ``client``.

    Results come back in the order of ``items``; a task's error is raised here, as it would be
    in the loop."""
    if client is None:
        return [func(*item, **kwargs) for item in items]
    if not items:
        return []
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(func, *item, **kwargs, key=f"{name}-{token}-{i}", retries=1, pure=False)
               for i, item in enumerate(items)]
    return client.gather(futures)
