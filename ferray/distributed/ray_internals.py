"""Every place ferray reaches into Ray's private modules, behind one version check.

Ray's private APIs change between minor releases. ferray uses three, each to work around a cost or
a bug of the public API, and each optional: on a Ray outside the series it was checked against
(TESTED_MINORS, the series pyproject.toml allows), none of them is touched and ferray runs on the
public API alone, a little slower or noisier, saying so once.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

TESTED_MINORS = range(51, 61)  # Ray 2.51 - 2.60


@functools.lru_cache(maxsize=1)
def supported() -> bool:
    """Whether the installed Ray is of a series these workarounds were checked against."""
    import ray

    try:
        major, minor = (int(part) for part in ray.__version__.split(".")[:2])
    except ValueError:
        return False
    ok = major == 2 and minor in TESTED_MINORS
    if not ok:
        log.warning(
            "ray %s is outside the series ferray was checked against (2.%d-2.%d): its workarounds of Ray "
            "internals are off",
            ray.__version__,
            TESTED_MINORS.start,
            TESTED_MINORS.stop - 1,
        )
    return ok


def quiet_train_context_logger() -> None:
    """Ray Train V2's execution context logs its per-report INFO lines under its file path, not under
    "ray.train": raise that logger's level too."""
    if not supported():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def poll_cluster_size_every(seconds: float) -> None:
    """Ray Data learns the cluster's size from an RPC it polls once a second; until the first answer
    lands, every operator runs one task at a time. A faster poll for short pipelines."""
    if not supported():
        return
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > seconds:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = seconds


def placement_group_by_id(group_id: str):
    """The PlacementGroup handle of a hex id (the public API gives handles only to their creator);
    None where the private constructor is not available."""
    if not supported():
        return None
    try:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup
    except ImportError:
        return None
    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
