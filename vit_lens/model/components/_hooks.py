"""Small helpers shared by the components."""

from vit_lens.model._transformer_lens import HookPoint


def is_hooked(*points: HookPoint) -> bool:
    """Whether anyone (a user hook or a cache) is attached to any of these points, either direction."""
    return any(point.fwd_hooks or point.bwd_hooks for point in points)
