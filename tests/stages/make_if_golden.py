#!/usr/bin/env python3
"""Makes a tiny DeepFloyd-IF-style UNet reference with diffusers, for the GoldenIf tests:

    python3 tests/stages/make_if_golden.py --out DIR [--seed 0]
    DIFFPIPE_GOLDEN_IF=DIR ./build/tests/test_stages --gtest_filter='GoldenIf.*'

DIR/model/: an IFPipeline folder (model_index.json, tokenizer/ and text_encoder/ from make_t5_golden.make_t5 with
d_model 40, unet/, scheduler/: DDPMScheduler as IF-I ships it: squaredcos_cap_v2, learned_range, dynamic
thresholding 0.95 / 1.5). Its unet/ is UNet2DConditionModel configured as IF's stage I (IF-I-XL's config keys at a tiny size): pixel space (3 in,
6 out: the noise prediction and learned_range variance), gelu activations, scale-shift time conditioning with
skip_time_act and output scale 1.414, ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D (added-KV attention with
group-normed text states) and their up counterparts, UNetMidBlock2DSimpleCrossAttn, T5 states projected by
encoder_hid_proj and attention-pooled into the time embedding (addition_embed_type "text"), time_embedding_act_fn
gelu. Random weights. DIR/golden.safetensors: unet.sample [2, 3, 16, 16], unet.timesteps (i64), unet.encoder_hidden_states
[2, 9, 40] (T5-width states) -> unet.out [2, 6, 16, 16]; for each run R of golden.json (IFPipeline with
clean_caption=False, output_type "pt"): pipeline.R.draws.K (every random draw in order: the initial image, then
each step's variance noise), pipeline.R.final_images [B, 3, 16, 16] in [-1, 1] and pipeline.R.image_uint8.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import recorded_draws
from make_t5_golden import make_t5

PROMPTS = ["A Red Circle above a blue square", "  two small GREEN triangles  "]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--clip-vocab", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-sd",
                                                        "model", "tokenizer", "vocab.json"))
    a = ap.parse_args()
    import diffusers
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from diffusers.pipelines.deepfloyd_if import pipeline_if
    from diffusers.schedulers import scheduling_ddpm
    from safetensors.torch import save_file

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    torch.manual_seed(a.seed + 100)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=2, block_out_channels=(32, 64, 96),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", act_fn="gelu", addition_embed_type="text",
        addition_embed_type_num_heads=4, attention_head_dim=16, cross_attention_dim=64, cross_attention_norm="group_norm",
        encoder_hid_dim=40, encoder_hid_dim_type="text_proj", resnet_time_scale_shift="scale_shift",
        resnet_skip_time_act=True, resnet_out_scale_factor=1.414, time_embedding_act_fn="gelu", norm_num_groups=8).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = os.path.join(a.out, "model")
    tok, enc = make_t5(os.path.join(model, "tokenizer"), os.path.join(model, "text_encoder"), a.seed, a.clip_vocab,
                       d_model=40)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                          thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
                          prediction_type="epsilon")
    pipe = IFPipeline(tokenizer=tok, text_encoder=enc, unet=unet, scheduler=sched, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ts = torch.tensor([981, 20])
    ehs = torch.randn(2, 9, 40, generator=g)
    with torch.no_grad():
        out = unet(x, ts, encoder_hidden_states=ehs).sample
    res = {"unet.sample": x, "unet.timesteps": ts, "unet.encoder_hidden_states": ehs, "unet.out": out}
    # IF stage II's UNet layout (super-resolution): the noisy image and the upscaled stage-I image side by side
    # (6 channels in), the upscaled image's noise level as class label (class_embed_type "timestep")
    torch.manual_seed(a.seed + 200)
    sr = UNet2DConditionModel(
        sample_size=32, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=4, attention_head_dim=16,
        cross_attention_dim=64, cross_attention_norm="group_norm", encoder_hid_dim=40, encoder_hid_dim_type="text_proj",
        resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
        time_embedding_act_fn="gelu", class_embed_type="timestep", norm_num_groups=8).eval()
    with torch.no_grad():
        for p in sr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        sr.save_pretrained(os.path.join(a.out, "sr_unet"))
        xs = torch.randn(2, 6, 32, 32, generator=g)
        lv = torch.tensor([250, 0])
        res.update({"sr_unet.sample": xs, "sr_unet.timesteps": torch.tensor([700, 3]), "sr_unet.class_labels": lv,
                    "sr_unet.encoder_hidden_states": ehs})
        res["sr_unet.out"] = sr(xs, torch.tensor([700, 3]), encoder_hidden_states=ehs, class_labels=lv).sample
    runs = [dict(name="plain", negative_prompt=None, guidance=7.0, steps=8, size=16),
            dict(name="negative", negative_prompt="Blurry, DARK", guidance=4.0, steps=5, size=16)]
    for r in runs:
        with torch.no_grad(), recorded_draws(pipeline_if, scheduling_ddpm) as draws:
            neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
            img = pipe(PROMPTS, negative_prompt=neg, num_inference_steps=r["steps"],
                       guidance_scale=r["guidance"], height=r["size"], width=r["size"], clean_caption=False,
                       output_type="pt", generator=torch.Generator().manual_seed(a.seed + 7)).images
        n = r["name"]
        for k, d in enumerate(draws):
            res[f"pipeline.{n}.draws.{k}"] = d
        res[f"pipeline.{n}.final_images"] = img
        u8 = ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        res[f"pipeline.{n}.image_uint8"] = torch.from_numpy(u8)
        r["draws"] = len(draws)
    # stage II (IFSuperResolutionPipeline) as model/super_resolution/: the stage-II UNet above, its own DDPM
    # scheduler and image-noising scheduler; run on run "plain"'s stage-I images with stage I's text embeddings
    from diffusers import IFSuperResolutionPipeline
    from diffusers.pipelines.deepfloyd_if import pipeline_if_superresolution
    sr_pipe = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=sr, safety_checker=None, feature_extractor=None, watermarker=None,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.95,
                                sample_max_value=1.0, clip_sample=True, prediction_type="epsilon"),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                              variance_type="fixed_small", clip_sample=True),
        requires_safety_checker=False)
    sr_pipe.save_pretrained(os.path.join(model, "super_resolution"))
    sr_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, clean_caption=False)
        sr_run = dict(name="sr", steps=4, guidance=4.0, noise_level=250, size=32, input="pipeline.plain.final_images")
        with recorded_draws(pipeline_if_superresolution, scheduling_ddpm) as draws:
            img = sr_pipe(image=res["pipeline.plain.final_images"], prompt_embeds=pe, negative_prompt_embeds=ne,
                          num_inference_steps=sr_run["steps"], guidance_scale=sr_run["guidance"],
                          noise_level=sr_run["noise_level"], height=32, width=32, output_type="pt",
                          generator=torch.Generator().manual_seed(a.seed + 9)).images
    for k, d in enumerate(draws):
        res[f"pipeline.sr.draws.{k}"] = d
    res["pipeline.sr.final_images"] = img
    sr_run["draws"] = len(draws)
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs, "draw_order": "the initial image, then each step's variance noise",
            "sr_run": sr_run, "sr_draw_order": "the initial image, the upscaled image's noise, each step's noise",
            "source": f"diffusers {diffusers.__version__} IFPipeline (clean_caption=False) with UNet2DConditionModel "
                      f"in IF's stage I layout, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
