"""Shared by the golden generators in this folder: records every random draw a diffusers pipeline makes."""
import contextlib


@contextlib.contextmanager
def recorded_draws(*modules):
    """Within the block, each module's `randn_tensor` (diffusers' helper, imported by name into pipelines and
    schedulers) also appends a copy of every tensor it returns to the yielded list, in the order drawn."""
    from diffusers.utils import torch_utils
    draws, real = [], torch_utils.randn_tensor

    def recording(*args, **kw):
        t = real(*args, **kw)
        draws.append(t.clone())
        return t
    saved = [(m, m.randn_tensor) for m in modules]
    for m, _ in saved:
        m.randn_tensor = recording
    try:
        yield draws
    finally:
        for m, f in saved:
            m.randn_tensor = f
