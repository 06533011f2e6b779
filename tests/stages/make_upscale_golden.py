#!/usr/bin/env python3
"""Makes a tiny Stable Diffusion x4 upscaler reference with diffusers, for the GoldenUpscale tests:

    python3 tests/stages/make_upscale_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--seed 0]
    DIFFPIPE_GOLDEN_UPSCALE=DIR ./build/tests/test_stages --gtest_filter='GoldenUpscale.*'

DIR/model/ is a StableDiffusionUpscalePipeline folder (random weights): tokenizer/, text_encoder/ and vae/ from the
source folder (its VAE has three levels, a latent factor of 4, as the x4 upscaler's; scaling_factor set to the
upscaler's 0.08333), unet/ in the x4 upscaler's layout at a tiny size (7 channels in: the latents and the noised
low-resolution image; num_class_embeds 1000: the noise level's learned embedding; only_cross_attention on the first
attention block, off on the second, so both forms are checked; linear projections), scheduler/ (DDIMScheduler,
v_prediction, as the upscaler ships it) and low_res_scheduler/ (DDPMScheduler), max_noise_level 350.
DIR/low_K.png: the low-resolution input images (16x16). DIR/golden.safetensors: unet.sample [2, 7, 16, 16],
unet.timesteps (i64), unet.encoder_hidden_states, unet.class_labels (i64) -> unet.out; for each run R of golden.json:
pipeline.R.draws.K (every random draw in order: the image noise [B, 3, 16, 16], then the initial latents
[B, 4, 16, 16]) and pipeline.R.images [B, 3, 64, 64] in [0, 1] (output_type "pt").
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import recorded_draws

PROMPTS = ["a red circle above a blue square", "two small green triangles"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--src", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-sd"))
    a = ap.parse_args()
    import diffusers
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    src = os.path.join(a.src, "model")
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    tok = CLIPTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae")).eval()
    vae.register_to_config(scaling_factor=0.08333)
    torch.manual_seed(a.seed + 300)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=enc.config.hidden_size, attention_head_dim=4, only_cross_attention=[False, True, False],
        num_class_embeds=1000, use_linear_projection=True, norm_num_groups=32).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    low = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                        clip_sample=False, variance_type="fixed_small")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, low_res_scheduler=low,
                                          scheduler=sched, max_noise_level=350)
    model = os.path.join(a.out, "model")
    pipe.save_pretrained(model)
    # the source's tokenizer files as they are (vocab.json + merges.txt: what diffpipe reads; transformers may save
    # tokenizer.json alone)
    shutil.rmtree(os.path.join(model, "tokenizer"))
    shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(model, "tokenizer"))
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(2, 7, 16, 16, generator=g)
    ts = torch.tensor([981, 20])
    ehs = torch.randn(2, 77, enc.config.hidden_size, generator=g)
    lv = torch.tensor([20, 349])
    with torch.no_grad():
        out = unet(x, ts, encoder_hidden_states=ehs, class_labels=lv).sample
    res = {"unet.sample": x, "unet.timesteps": ts, "unet.encoder_hidden_states": ehs, "unet.class_labels": lv,
           "unet.out": out}
    # low-resolution inputs: smooth colour fields with a little texture, saved as the PNGs the requests name
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32) / 15.0
    rng = np.random.default_rng(a.seed)
    images = []
    for k in range(len(PROMPTS)):
        rgb = np.stack([xx, yy, (xx + yy) / 2 if k == 0 else 1 - xx], -1) * 200 + 30
        rgb = (rgb + rng.normal(0, 12, rgb.shape)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(rgb, "RGB")
        im.save(os.path.join(a.out, f"low_{k}.png"))
        images.append(im)
    runs = [dict(name="plain", negative_prompt=None, guidance=7.5, steps=6, noise_level=20),
            dict(name="negative", negative_prompt="blurry, dark", guidance=4.0, steps=4, noise_level=150)]
    for r in runs:
        with torch.no_grad(), recorded_draws(pipeline_stable_diffusion_upscale) as draws:
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            img = pipe(PROMPTS, image=images, negative_prompt=neg, num_inference_steps=r["steps"],
                       guidance_scale=r["guidance"], noise_level=r["noise_level"], output_type="pt",
                       generator=torch.Generator().manual_seed(a.seed + 7)).images
        n = r["name"]
        for k, d in enumerate(draws):
            res[f"pipeline.{n}.draws.{k}"] = d
        res[f"pipeline.{n}.images"] = img
        r["draws"] = len(draws)
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "images": [f"low_{k}.png" for k in range(len(PROMPTS))], "runs": runs,
            "draw_order": "the image noise, then the initial latents",
            "source": f"diffusers {diffusers.__version__} StableDiffusionUpscalePipeline with a tiny x4-upscaler-layout "
                      f"UNet, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
