"""The accelerator layer: everything scriven does to run faster than plain PyTorch on a
particular machine. Models stay plain; this package swaps faster parts in from outside."""

from __future__ import annotations


def native_available() -> bool:
    """Whether scriven's native CPU kernels load on this machine (see `scriven.native`)."""
    from .. import native

    return native.library() is not None
