#!/usr/bin/env python3
"""Makes another Stable unCLIP reference folder in ../shared/golden/tiny-unclip's layout, so the GoldenUnclip
tests can be run unchanged on a folder they were not written against:

    python3 tests/stages/make_unclip_golden.py --out DIR [--src ../shared/golden/tiny-unclip] [--layers 3]
        [--heads 4] [--variance fixed_small] [--clip-range 3] [--prior-steps 5] [--noise-level 300] [--seed 1]
    DIFFPIPE_GOLDEN_UNCLIP=DIR ./build/tests/test_stages --gtest_filter='GoldenUnclip.*'

The folder keeps the source's text encoders, UNet and VAE, and gets a new random PriorTransformer (other depth
and heads) and prior scheduler (other variance type and clip range). golden.safetensors holds the same keys as
tiny-unclip's (module calls and the whole pipeline with every random draw, in order); golden.json the same fields.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch

from golden_draws import recorded_draws


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.path.join(here, "..", "..", "..", "shared", "golden", "tiny-unclip"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--variance", default="fixed_small", choices=["fixed_small", "fixed_small_log"])
    ap.add_argument("--clip-range", type=float, default=3.0)
    ap.add_argument("--prior-steps", type=int, default=5)
    ap.add_argument("--noise-level", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    from diffusers import DDPMScheduler, PriorTransformer, StableUnCLIPPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_unclip as mod
    from safetensors.torch import load_file, save_file

    src = StableUnCLIPPipeline.from_pretrained(os.path.join(a.src, "model"))
    E = src.prior.config.embedding_dim
    torch.manual_seed(a.seed)
    prior = PriorTransformer(num_attention_heads=a.heads, attention_head_dim=E // a.heads * 2, num_layers=a.layers,
                             embedding_dim=E, num_embeddings=77, additional_embeddings=4,
                             encoder_hid_proj_type="linear", added_emb_type="prd").eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        prior.clip_mean.copy_(torch.randn_like(prior.clip_mean) * 0.1)
        prior.clip_std.copy_(1 + torch.rand_like(prior.clip_std))
    cfg = dict(src.prior_scheduler.config)
    cfg.update(variance_type=a.variance, clip_sample_range=a.clip_range)
    psched = DDPMScheduler.from_config(cfg)
    pipe = StableUnCLIPPipeline(prior_tokenizer=src.prior_tokenizer, prior_text_encoder=src.prior_text_encoder,
                                prior=prior, prior_scheduler=psched, image_normalizer=src.image_normalizer,
                                image_noising_scheduler=src.image_noising_scheduler, tokenizer=src.tokenizer,
                                text_encoder=src.text_encoder, unet=src.unet, scheduler=src.scheduler, vae=src.vae)
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    model = os.path.join(a.out, "model")
    pipe.save_pretrained(model)
    for t in ("tokenizer", "prior_tokenizer"):  # the slow tokenizer's files, as the source ships them
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(os.path.join(a.src, "model", t, f), os.path.join(model, t, f))
    pipe.set_progress_bar_config(disable=True)

    g = load_file(os.path.join(a.src, "golden.safetensors"))
    src_meta = json.load(open(os.path.join(a.src, "golden.json")))
    out = {k: v for k, v in g.items() if k.startswith("prior_text_encoder.") or k.startswith("unet.")}
    with torch.no_grad():
        torch.manual_seed(a.seed + 1)
        lat = torch.randn(3, E)
        ts = torch.tensor([999, 500, 3])
        proj, hid, mask = g["prior_text_encoder.text_embeds"], g["prior_text_encoder.last_hidden_state"], \
            g["prior_text_encoder.attention_mask"].bool()
        out.update({"prior.latents": lat, "prior.timesteps": ts, "prior.proj_embedding": proj,
                    "prior.encoder_hidden_states": hid, "prior.attention_mask": g["prior_text_encoder.attention_mask"]})
        out["prior.predicted_image_embedding"] = prior(lat, timestep=ts, proj_embedding=proj,
                                                       encoder_hidden_states=hid,
                                                       attention_mask=mask).predicted_image_embedding
        out["prior.post_processed"] = prior.post_process_latents(lat)
    run = dict(src_meta["run"], prior_steps=a.prior_steps, noise_level=a.noise_level)
    prompts = src_meta["prompts"]
    kw = dict(prompt=prompts, negative_prompt=[src_meta["negative_prompt"]] * len(prompts), height=run["H"],
              width=run["H"], num_inference_steps=run["steps"], guidance_scale=run["guidance"],
              prior_num_inference_steps=run["prior_steps"], prior_guidance_scale=run["prior_guidance"],
              noise_level=run["noise_level"])
    ddpm_mod = __import__("diffusers.schedulers.scheduling_ddpm", fromlist=["randn_tensor"])
    with torch.no_grad(), recorded_draws(mod, ddpm_mod) as draws:
        lat = pipe(generator=torch.Generator().manual_seed(a.seed), output_type="latent", **kw).images
    with torch.no_grad():
        im = pipe(generator=torch.Generator().manual_seed(a.seed), output_type="np", **kw).images
    for i, d in enumerate(draws):
        out[f"pipeline.draw.{i}"] = d
    out["pipeline.final_latents"] = lat
    out["pipeline.image_uint8"] = torch.from_numpy((im * 255).round().clip(0, 255).astype(np.uint8))
    save_file({k: v.contiguous().clone() for k, v in out.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = dict(src_meta, run=run, draws=[{"index": i, "shape": list(d.shape)} for i, d in enumerate(draws)],
                source=f"tests/stages/make_unclip_golden.py from {a.src}: prior {a.layers} layers x {a.heads} "
                       f"heads, prior scheduler {a.variance}, clip range {a.clip_range}")
    json.dump(meta, open(os.path.join(a.out, "golden.json"), "w"), indent=1)
    print(json.dumps({k: meta[k] for k in ("run", "source")}, indent=1), len(draws), "draws")


if __name__ == "__main__":
    main()
