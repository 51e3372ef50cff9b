"""Where a worker runs, for the records (run.json per unit, index servers): read lazily so that
the workers stay plain classes that also run without Ray."""

from __future__ import annotations


def node_id() -> str | None:
    """The Ray node of the calling process, or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # no Ray, or no runtime context: nothing to record
        return None
