"""Shared by the golden generators in this folder: records every random draw a diffusers pipeline makes, and sets up
an output folder beside a source model."""
import contextlib
import os
import shutil


def out_linked_to(out, src_folder):
    """Empties `out` and links out/model to src_folder/model (a reference that reuses a model it does not change);
    returns that model folder's absolute path."""
    src = os.path.abspath(os.path.join(src_folder, "model"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.symlink(src, os.path.join(out, "model"))
    return src


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
