#!/usr/bin/env python3
"""Makes a tiny Stable Diffusion XL reference folder with diffusers (StableDiffusionXLPipeline), for the GoldenSdxl
tests:

    python3 tests/stages/make_sdxl_golden.py --out DIR [--src ../shared/golden/tiny-sd] [--seed 0]
    DIFFPIPE_GOLDEN_SDXL=DIR ./build/tests/test_stages --gtest_filter='GoldenSdxl.*'

DIR/model/ is a diffusers SDXL folder (random weights): tokenizer/ and tokenizer_2/ (the real CLIP BPE vocabulary of
the source folder; tokenizer_2 pads with "!" as SDXL's does), text_encoder/ (CLIPTextModel, hidden 32) and
text_encoder_2/ (CLIPTextModelWithProjection, hidden 40, gelu, projection 24), unet/ (UNet2DConditionModel with
addition_embed_type "text_time", transformer_layers_per_block [1, 2], per-block heads, linear projections), vae/
(the source's AutoencoderKL, scaling factor 0.13025) and scheduler/ (EulerDiscreteScheduler as SDXL ships it:
"leading" spacing, steps_offset 1).
DIR/golden.safetensors (float32 unless noted, batch first):
  text_encoder.input_ids (i64) -> text_encoder.hidden_states_m2 (hidden_states[-2]: the penultimate layer's output,
  no final layer norm); text_encoder_2.input_ids (i64, padded with "!") -> text_encoder_2.hidden_states_m2,
  text_encoder_2.text_embeds; unet.{sample, timesteps (i64), encoder_hidden_states, text_embeds, time_ids} ->
  unet.out; for each run R in golden.json: pipeline.R.initial_noise, pipeline.R.final_latents,
  pipeline.R.image_uint8 (u8, HWC).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import clip_tokenizers, keep_slow_tokenizer_files

PROMPTS = ["a red circle on a blue square", "a small green triangle, top left"]
PADS = [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]  # the second CLIP tokenizer pads with "!" (id 0)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-sd"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src = os.path.join(a.src, "model")
    model = os.path.join(a.out, "model")
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(model)
    torch.manual_seed(a.seed)

    def nudged(m, scale=0.02):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
        return m.eval()

    tok, tok2 = clip_tokenizers(model, src, PADS)

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=1)
    te = nudged(CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                             num_attention_heads=4, hidden_act="quick_gelu", **common)))
    te2 = nudged(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, intermediate_size=53, num_hidden_layers=3,
                                                            num_attention_heads=5, hidden_act="gelu",
                                                            projection_dim=24, **common)))
    P, T = 24, 8  # pooled (projection) width, addition_time_embed_dim: 6 time ids -> 48
    unet = nudged(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 40,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=T,
        projection_class_embeddings_input_dim=P + 6 * T, norm_num_groups=32))
    vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae"))
    vae.register_to_config(scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                   timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(model)
    keep_slow_tokenizer_files(model, PADS)
    pipe.set_progress_bar_config(disable=True)

    out = {}
    with torch.no_grad():
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out["text_encoder.input_ids"] = ids
        out["text_encoder.hidden_states_m2"] = te(ids, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids2, output_hidden_states=True)
        out["text_encoder_2.input_ids"] = ids2
        out["text_encoder_2.hidden_states_m2"] = o2.hidden_states[-2]
        out["text_encoder_2.text_embeds"] = o2.text_embeds

        g = torch.Generator().manual_seed(a.seed + 1)
        x = torch.randn(3, 4, 8, 8, generator=g)
        ts = torch.tensor([999, 500, 1])
        ehs = torch.randn(3, 77, 72, generator=g)
        te_ = torch.randn(3, P, generator=g)
        tid = torch.tensor([[32., 32, 0, 0, 32, 32], [64, 48, 4, 2, 32, 32], [1024, 1024, 0, 0, 1024, 1024]])
        out.update({"unet.sample": x, "unet.timesteps": ts, "unet.encoder_hidden_states": ehs,
                    "unet.text_embeds": te_, "unet.time_ids": tid})
        out["unet.out"] = unet(x, ts, encoder_hidden_states=ehs,
                               added_cond_kwargs={"text_embeds": te_, "time_ids": tid}).sample

        # whole pipeline: "zeros" (no negative prompt: zero unconditional embeddings, force_zeros_for_empty_prompt),
        # "negative" (a negative prompt, encoded like the prompt), "micro" (non-square, with original_size and
        # crops_coords_top_left, both [height, width] / [top, left] as diffusers takes them), "clip_skip"
        runs = [dict(name="zeros", negative_prompt=None, guidance=5.0, steps=8, height=32, width=32),
                dict(name="negative", negative_prompt="blurry, dark", guidance=6.5, steps=6, height=32, width=32),
                dict(name="micro", negative_prompt=None, guidance=5.0, steps=5, height=32, width=48,
                     original_size=[96, 64], crops_coords_top_left=[8, 4]),
                # clip_skip 1: the prompt from hidden_states[-3] of both encoders, the negative prompt still from [-2]
                dict(name="clip_skip", negative_prompt="blurry, dark", guidance=6.5, steps=5, height=32, width=32,
                     clip_skip=1)]
        for r in runs:
            noise = torch.randn(len(PROMPTS), 4, r["height"] // 4, r["width"] // 4, generator=g)
            lat = pipe(PROMPTS, negative_prompt=None if r["negative_prompt"] is None else [r["negative_prompt"]] * 2,
                       num_inference_steps=r["steps"], guidance_scale=r["guidance"], height=r["height"],
                       width=r["width"], latents=noise.clone(), output_type="latent",
                       original_size=tuple(r.get("original_size", (r["height"], r["width"]))),
                       crops_coords_top_left=tuple(r.get("crops_coords_top_left", (0, 0))),
                       clip_skip=r.get("clip_skip")).images
            im = vae.decode(lat / vae.config.scaling_factor).sample
            im = (im / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            n = r["name"]
            out[f"pipeline.{n}.initial_noise"] = noise
            out[f"pipeline.{n}.final_latents"] = lat
            out[f"pipeline.{n}.image_uint8"] = torch.from_numpy((im * 255).round().clip(0, 255).astype(np.uint8))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"prompts": PROMPTS, "runs": runs, "sampler": "euler (the folder's scheduler)",
            "source": f"diffusers {diffusers.__version__} StableDiffusionXLPipeline, transformers "
                      f"{transformers.__version__}, torch {torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
