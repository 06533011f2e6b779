"""Shared by the golden generators in this folder: their common options, a recorder of every random draw a diffusers
pipeline makes, and an output folder beside a source model."""
import argparse
import contextlib
import os
import shutil

TINY_SD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "golden", "tiny-sd")


def tiny_sd_args(sdxl_help=None):
    """The generators' common options, parsed: --out (required), --seed (0), --src (a tiny-sd folder, default the one in
    ../shared/golden beside the repository) and, with `sdxl_help`, --sdxl (an SDXL model folder for extra runs)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src", default=TINY_SD)
    if sdxl_help:
        ap.add_argument("--sdxl", help=sdxl_help)
    return ap.parse_args()


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


def clip_tokenizers(model, src, pads):
    """Writes model/NAME/ for each (NAME, PAD) of `pads` from the tiny-sd source's CLIP BPE files (its vocab.json,
    merges.txt and tokenizer_config.json with pad_token PAD: "!" for SDXL's and SD3's second tokenizer) and returns
    transformers' CLIPTokenizers read from them, in order."""
    import json
    from transformers import CLIPTokenizer
    out = []
    for name, pad in pads:
        d = os.path.join(model, name)
        os.makedirs(d, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(src, "tokenizer", f), os.path.join(d, f))
        cfg = json.load(open(os.path.join(src, "tokenizer", "tokenizer_config.json")))
        cfg["pad_token"] = pad
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
        out.append(CLIPTokenizer.from_pretrained(d))
    return out


def keep_slow_tokenizer_files(model, pads):
    """After a pipeline's save_pretrained: each CLIP tokenizer folder of `pads` (NAME, PAD) holds the slow tokenizer's
    three files only, its pad_token PAD, as the source ships them (diffpipe reads vocab.json and merges.txt)."""
    import json
    for name, pad in pads:
        d = os.path.join(model, name)
        for f in os.listdir(d):
            if f not in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                os.remove(os.path.join(d, f))
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        cfg["pad_token"] = pad
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=1)
