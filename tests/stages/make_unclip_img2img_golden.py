#!/usr/bin/env python3
"""Makes the image-variations reference folder (StableUnCLIPImg2ImgPipeline) that
tests/stages/test_golden_unclip.cpp checks diffpipe's `--image-prompt` path against.

    python3 tests/stages/make_unclip_img2img_golden.py [--src ../shared/golden/tiny-unclip] \
        [--out ../shared/golden/tiny-unclip-img2img]

The folder reuses tiny-unclip's UNet, VAE, text encoder, tokenizer, image normaliser and noising scheduler, and
adds a tiny random CLIPVisionModelWithProjection (`image_encoder/`, 32 px, patch 8, projection 32) and its
CLIPImageProcessor (`feature_extractor/`: shortest edge 32, centre crop 32). golden.safetensors holds:
  input.png's pixels as the processor sees them -> feature_extractor.pixel_values [1, 3, 32, 32]
  image_encoder.image_embeds [1, 32] for those pixel values
  pipeline.draw.0 (the image-embedding noise) and pipeline.draw.1 (the initial latents), in the order drawn
  pipeline.final_latents, pipeline.image_uint8 for golden.json's `run` (prompt, 8 DDIM steps, guidance 7.5,
  noise_level 100, 16 px)
Reference packages (diffusers, transformers) are only test tools; diffpipe never runs Python.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from golden_draws import recorded_draws


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--src", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-unclip"))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-unclip-img2img"))
    # other folders of the same layout, to check that the tests pass unchanged on them
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--act", default="quick_gelu", choices=["quick_gelu", "gelu"])
    ap.add_argument("--noise-level", type=int, default=100)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import diffusers
    import transformers
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_unclip_img2img as mod
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    src = os.path.join(a.src, "model")
    model = os.path.join(a.out, "model")
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(model)
    torch.manual_seed(a.seed)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                            image_size=a.image_size, patch_size=a.patch, projection_dim=32, hidden_act=a.act)
    enc = CLIPVisionModelWithProjection(vcfg).eval()
    with torch.no_grad():  # random weights, nudged as tiny-unclip's README describes
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fe = CLIPImageProcessor(size={"shortest_edge": a.image_size}, crop_size={"height": a.image_size, "width": a.image_size})
    base = diffusers.StableUnCLIPPipeline.from_pretrained(src)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=fe, image_encoder=enc, image_normalizer=base.image_normalizer,
        image_noising_scheduler=base.image_noising_scheduler, tokenizer=base.tokenizer,
        text_encoder=base.text_encoder, unet=base.unet, scheduler=base.scheduler, vae=base.vae)
    pipe.save_pretrained(model)
    # the slow tokenizer's files, as tiny-unclip ships them (transformers 5 saves tokenizer.json only)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, "tokenizer", f), os.path.join(model, "tokenizer", f))
    pipe.set_progress_bar_config(disable=True)

    # a test picture, not square and not the crop size (the processor resizes and crops): 48x40 by default
    h, w = a.image_size + 8, a.image_size + 16
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    img[10:25, 12:30] = [220, 40, 40]
    Image.fromarray(img).save(os.path.join(a.out, "input.png"))
    pil = Image.open(os.path.join(a.out, "input.png")).convert("RGB")

    out = {}
    pv = fe(images=pil, return_tensors="pt").pixel_values
    out["feature_extractor.pixel_values"] = pv
    with torch.no_grad():
        out["image_encoder.image_embeds"] = enc(pv).image_embeds

    run = {"prompt": "a photo of a cat", "steps": a.steps, "guidance": 7.5, "noise_level": a.noise_level, "H": 16}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), recorded_draws(mod) as draws:
        lat = pipe(image=pil, prompt=run["prompt"], height=16, width=16, num_inference_steps=run["steps"],
                   guidance_scale=run["guidance"], noise_level=run["noise_level"], generator=g,
                   output_type="latent").images
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        im = pipe(image=pil, prompt=run["prompt"], height=16, width=16, num_inference_steps=run["steps"],
                  guidance_scale=run["guidance"], noise_level=run["noise_level"], generator=g, output_type="np").images
    for i, d in enumerate(draws):
        out[f"pipeline.draw.{i}"] = d
    out["pipeline.final_latents"] = lat
    out["pipeline.image_uint8"] = torch.from_numpy((im * 255).round().clip(0, 255).astype(np.uint8))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"run": run, "draws": [list(d.shape) for d in draws],
            "draw_order": "image-embedding noise (noise_image_embeddings), then the initial latents",
            "feature_extractor_class": type(fe).__name__ + " (" + type(fe).__mro__[1].__name__ + ")",
            "source": f"diffusers {diffusers.__version__} StableUnCLIPImg2ImgPipeline, transformers "
                      f"{transformers.__version__}, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
