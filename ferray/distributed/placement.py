"""A workaround for Ray Train V2 under Tune (ray-project/ray#54305): a trial that Tune stops leaves
its Train workers' placement group reserved for the rest of the driver's life, which on a small
machine hangs the next Train run. Each run records its group's id (in the worker, where the group
is known); `ferray tune` removes the group of every ended trial by that id."""

from __future__ import annotations

from pathlib import Path

PLACEMENT_GROUP_FILE = "placement_group"


def record_placement_group(run_dir: Path) -> None:
    """Write the id of the workers' placement group into the run folder: when Tune stops a trial,
    Train V2 leaves that group reserved (ray-project/ray#54305) and release_placement_group removes it by this id."""
    import ray.util

    group = ray.util.get_current_placement_group()
    if group is not None:
        (run_dir / PLACEMENT_GROUP_FILE).write_text(group.id.hex() + "\n")


def release_placement_group(run_dir: Path) -> bool:
    """Remove the placement group a run recorded if it is still reserved; True if one was removed."""
    import ray.util

    from ferray.distributed.ray_internals import placement_group_by_id

    path = Path(run_dir) / PLACEMENT_GROUP_FILE
    if not path.is_file():
        return False
    group_id = path.read_text().strip()
    if ray.util.placement_group_table().get(group_id, {}).get("state") != "CREATED":
        return False
    group = placement_group_by_id(group_id)
    if group is None:
        return False
    ray.util.remove_placement_group(group)
    return True
