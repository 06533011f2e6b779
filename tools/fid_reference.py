#!/usr/bin/env python3
"""Reference FID with pytorch-fid itself, for tests/apps/inception_reference_test.sh.

Builds pytorch-fid's FID Inception-v3 (its own block classes) with random weights -- nothing is downloaded:
the weight URL loader is replaced by the model's own, re-initialised state dict -- saves those weights as
safetensors under torchvision's key names (what `diffpipe eval fid --inception` reads), and computes, with
pytorch-fid's code, the pool3 features of two image folders (diffpipe's images.jsonl layout) and their FID.
Writes JSON: {"fid": ..., "features_real": [[...], ...]}. Testing aid only; the product never runs Python.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from pytorch_fid import inception as pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance


def random_fid_inception(seed):
    torch.manual_seed(seed)
    holder = {}

    def fake_download(*_args, **_kwargs):
        return holder["state"]

    # Build once to learn the state dict's keys and shapes, then give it well-scaled random values:
    # He-normal convolutions and batch-norm statistics that keep activations O(1) through 94 layers.
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    state = {}
    for k, v in net.state_dict().items():
        if "num_batches_tracked" in k:
            continue
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            state[k] = torch.randn_like(v) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight"):
            state[k] = 0.5 + torch.rand_like(v)
        elif k.endswith("bn.bias"):
            state[k] = 0.1 * torch.randn_like(v)
        elif k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn_like(v)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand_like(v)
        else:
            state[k] = 0.01 * torch.randn_like(v)
    holder["state"] = state
    pf_inception.load_state_dict_from_url = fake_download
    # fid_inception_v3() swaps in the FID blocks (renamed keys are identical) and loads `state`.
    model = pf_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    return model.eval(), state


def load_folder(d):
    rows = [json.loads(line) for line in open(os.path.join(d, "images.jsonl")) if line.strip()]
    ims = [np.asarray(Image.open(r["file"]).convert("RGB"), dtype=np.float32) / 255.0 for r in rows]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()  # [0, 1], as pytorch-fid loads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--real", required=True)
    ap.add_argument("--generated", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, state = random_fid_inception(a.seed)
    save_file({k: v.contiguous() for k, v in state.items()}, a.weights)
    feats = []
    with torch.no_grad():
        for d in (a.real, a.generated):
            x = load_folder(d)
            feats.append(torch.cat([model(x[i:i + 16])[0].squeeze(3).squeeze(2) for i in range(0, len(x), 16)]).double().numpy())
    mu = [f.mean(axis=0) for f in feats]
    sigma = [np.cov(f, rowvar=False) for f in feats]
    fid = calculate_frechet_distance(mu[0], sigma[0], mu[1], sigma[1])
    json.dump({"fid": float(fid), "features_real": feats[0].tolist()}, open(a.out, "w"))


if __name__ == "__main__":
    main()
