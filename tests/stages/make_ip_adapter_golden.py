#!/usr/bin/env python3
"""Makes an IP-Adapter reference with diffusers (StableDiffusionPipeline.load_ip_adapter) on tiny-sd, for the
GoldenIpAdapter tests:

    python3 tests/stages/make_ip_adapter_golden.py --out DIR [--src ../shared/golden/tiny-sd]
    DIFFPIPE_GOLDEN_IP_ADAPTER=DIR ./build/tests/test_stages --gtest_filter='GoldenIpAdapter.*'

DIR/ip/ is laid out as h94/IP-Adapter's models/ folder: ip-adapter.safetensors (random weights in the original
format: image_proj.proj / image_proj.norm, a Linear of the image embedding to 4 tokens and their LayerNorm, and
ip_adapter.K.to_k_ip / to_v_ip for every cross-attention, K = 1, 3, 5, ... in diffusers' attention-processor order)
and image_encoder/ (a random CLIPVisionModelWithProjection, 32x32 images). DIR/image_K.png: the image prompts.
DIR/golden.safetensors: latents (the initial latents), and per run R of golden.json R.images [B, 3, 32, 32] in [0, 1]
and R.image_embeds (the image encoder's output for the run's images). DIR/model links to the source model. With
--sdxl MODEL: DIR/ip-sdxl/ (an adapter for that SDXL UNet, the same image encoder) and the run "sdxl"
(StableDiffusionXLPipeline, scale 0.7): sdxl.latents, sdxl.images. IP-Adapter Plus: DIR/ip/ip-adapter-plus.safetensors
(a random resampler of 4 blocks, 6 queries; the same image encoder) and the runs of golden.json's plus_runs:
R.images, R.hidden_states (the encoder's penultimate hidden states of each image) and R.uncond_hidden_states (those
of an all-zero image).
"""
import json
import os

import numpy as np
import torch

from golden_draws import out_linked_to, tiny_sd_args

PROMPTS = ["a red circle above a blue square", "two small green triangles"]
RUNS = [dict(name="scale_1", scale=1.0, guidance=7.5, negative_prompt=None, steps=5),
        dict(name="scale_05_negative", scale=0.5, guidance=5.0, negative_prompt="blurry", steps=4),
        dict(name="no_guidance", scale=0.8, guidance=1.0, negative_prompt=None, steps=4)]
PLUS_RUNS = [dict(name="plus", scale=0.6, guidance=6.0, negative_prompt=None, steps=4),
             dict(name="plus_no_guidance", scale=1.0, guidance=1.0, negative_prompt=None, steps=4)]


def plus_image_proj(D, E, H=32, queries=6, depth=4):
    """IP-Adapter Plus's image_proj in h94's format (a perceiver resampler: learned queries [1, queries, H], proj_in from
    the image encoder's width E, `depth` blocks of norm1/norm2/to_q/to_kv/to_out and a GELU feed-forward 1.0/1.1/1.3,
    proj_out to the UNet's width D, norm_out); one head of 64."""
    sd = {"image_proj.latents": torch.randn(1, queries, H) * 0.5,
          "image_proj.proj_in.weight": torch.randn(H, E) * 0.2, "image_proj.proj_in.bias": torch.randn(H) * 0.1,
          "image_proj.proj_out.weight": torch.randn(D, H) * 0.2, "image_proj.proj_out.bias": torch.randn(D) * 0.1,
          "image_proj.norm_out.weight": 1 + torch.randn(D) * 0.1, "image_proj.norm_out.bias": torch.randn(D) * 0.1}
    for i in range(depth):
        b = f"image_proj.layers.{i}"
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[f"{b}.{n}.weight"] = 1 + torch.randn(H) * 0.1
            sd[f"{b}.{n}.bias"] = torch.randn(H) * 0.1
        sd[f"{b}.0.to_q.weight"] = torch.randn(64, H) * 0.2
        sd[f"{b}.0.to_kv.weight"] = torch.randn(128, H) * 0.2
        sd[f"{b}.0.to_out.weight"] = torch.randn(H, 64) * 0.1
        sd[f"{b}.1.1.weight"] = torch.randn(4 * H, H) * 0.2
        sd[f"{b}.1.3.weight"] = torch.randn(H, 4 * H) * 0.1
    return sd


def write_adapter(unet, enc, folder, save_file, plus=False, filename="ip-adapter.safetensors"):
    """A random adapter for `unet` in h94's format in folder/FILENAME: image_proj (the embedding -> 4 tokens of the UNet's
    cross-attention width; `plus`: IP-Adapter Plus's resampler over the image encoder's hidden states) and per
    cross-attention to_k_ip / to_v_ip, numbered as diffusers' _convert_ip_adapter_attn_to_diffusers reads them (K = 1,
    3, 5, ... in attention-processor order)."""
    cfg = unet.config
    D, E, T = cfg.cross_attention_dim, enc.config.projection_dim, 4
    if plus:
        sd = plus_image_proj(D, enc.config.hidden_size)
    else:
        sd = {"image_proj.proj.weight": torch.randn(T * D, E) * 0.3, "image_proj.proj.bias": torch.randn(T * D) * 0.1,
              "image_proj.norm.weight": 1 + torch.randn(D) * 0.1, "image_proj.norm.bias": torch.randn(D) * 0.1}
    key_id = 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, D) * 0.3
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, D) * 0.3
        key_id += 2
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, filename))


def main():
    a = tiny_sd_args("an SDXL model folder for the sdxl run (an adapter of its own in DIR/ip-sdxl/)")
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    src = out_linked_to(a.out, a.src)
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(a.seed + 5)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ip_dir = os.path.join(a.out, "ip")
    enc.save_pretrained(os.path.join(ip_dir, "image_encoder"))

    write_adapter(pipe.unet, enc, ip_dir, save_file)
    pipe.load_ip_adapter(ip_dir, subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder="image_encoder")

    rng = np.random.default_rng(a.seed)
    images = []
    for k in range(len(PROMPTS)):
        rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not square: resize and crop matter
        rgb[:, :, k] = 255
        Image.fromarray(rgb, "RGB").save(os.path.join(a.out, f"image_{k}.png"))
        images.append(Image.fromarray(rgb, "RGB"))

    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(a.seed + 7))
    res = {"latents": latents}
    for r in RUNS:
        pipe.set_ip_adapter_scale(r["scale"])
        neg = None if r["negative_prompt"] is None else [r["negative_prompt"]] * len(PROMPTS)
        captured = {}
        real = pipe.encode_image

        def encode_image(*args, real=real, captured=captured, **kw):
            out = real(*args, **kw)
            captured.setdefault("embeds", []).append(out[0].clone())
            return out
        pipe.encode_image = encode_image
        with torch.no_grad():  # one call per prompt: the pipeline takes one image prompt per adapter and call
            img = torch.cat([pipe(PROMPTS[k], ip_adapter_image=images[k], negative_prompt=neg and neg[k],
                                  num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                                  latents=latents[k:k + 1], output_type="pt").images for k in range(len(PROMPTS))])
        pipe.encode_image = real
        res[f"{r['name']}.images"] = img
        res[f"{r['name']}.image_embeds"] = torch.cat(captured["embeds"]).reshape(len(PROMPTS), -1)
    with torch.no_grad():  # the same requests without the adapter, for comparison
        pipe.set_ip_adapter_scale(0.0)
        res["no_adapter.images"] = pipe(PROMPTS, ip_adapter_image=images[0], num_inference_steps=5,
                                        guidance_scale=7.5, latents=latents, output_type="pt").images
    # IP-Adapter Plus (DIR/ip/ip-adapter-plus.safetensors, the same image encoder): its resampler reads the encoder's
    # penultimate hidden states, the unconditional row those of an all-zero image
    plus = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    plus.set_progress_bar_config(disable=True)
    plus.scheduler = DDIMScheduler.from_config(plus.scheduler.config)
    torch.manual_seed(a.seed + 6)
    write_adapter(plus.unet, enc, ip_dir, save_file, plus=True, filename="ip-adapter-plus.safetensors")
    plus.load_ip_adapter(ip_dir, subfolder="", weight_name="ip-adapter-plus.safetensors",
                         image_encoder_folder="image_encoder")
    for r in PLUS_RUNS:
        plus.set_ip_adapter_scale(r["scale"])
        captured = {}
        real = plus.encode_image

        def encode_image(*args, real=real, captured=captured, **kw):
            out = real(*args, **kw)
            captured.setdefault("hidden", []).append(out[0].clone())
            captured.setdefault("uncond", []).append(out[1].clone())
            return out
        plus.encode_image = encode_image
        with torch.no_grad():
            img = torch.cat([plus(PROMPTS[k], ip_adapter_image=images[k], num_inference_steps=r["steps"],
                                  guidance_scale=r["guidance"], latents=latents[k:k + 1], output_type="pt").images
                             for k in range(len(PROMPTS))])
        plus.encode_image = real
        res[f"{r['name']}.images"] = img
        res[f"{r['name']}.hidden_states"] = torch.cat(captured["hidden"])
        res[f"{r['name']}.uncond_hidden_states"] = captured["uncond"][0][0]
    sdxl = None
    if a.sdxl:  # StableDiffusionXLPipeline with an adapter for its UNet (the same image encoder)
        from diffusers import StableDiffusionXLPipeline
        xl = StableDiffusionXLPipeline.from_pretrained(a.sdxl)
        xl.set_progress_bar_config(disable=True)
        xl_dir = os.path.join(a.out, "ip-sdxl")
        enc.save_pretrained(os.path.join(xl_dir, "image_encoder"))
        write_adapter(xl.unet, enc, xl_dir, save_file)
        xl.load_ip_adapter(xl_dir, subfolder="", weight_name="ip-adapter.safetensors",
                           image_encoder_folder="image_encoder")
        xl.set_ip_adapter_scale(0.7)
        xl_latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(a.seed + 8))
        with torch.no_grad():
            res["sdxl.images"] = torch.cat([xl(PROMPTS[k], ip_adapter_image=images[k], num_inference_steps=4,
                                               guidance_scale=5.0, height=32, width=32, latents=xl_latents[k:k + 1],
                                               output_type="pt").images for k in range(len(PROMPTS))])
        res["sdxl.latents"] = xl_latents
        # IP-Adapter Plus for the SDXL UNet (as ip-adapter-plus_sdxl_vit-h), the same image encoder
        torch.manual_seed(a.seed + 9)
        write_adapter(xl.unet, enc, xl_dir, save_file, plus=True, filename="ip-adapter-plus.safetensors")
        xl_plus = StableDiffusionXLPipeline.from_pretrained(a.sdxl)
        xl_plus.set_progress_bar_config(disable=True)
        xl_plus.load_ip_adapter(xl_dir, subfolder="", weight_name="ip-adapter-plus.safetensors",
                                image_encoder_folder="image_encoder")
        xl_plus.set_ip_adapter_scale(0.8)
        with torch.no_grad():
            res["sdxl_plus.images"] = torch.cat([xl_plus(PROMPTS[k], ip_adapter_image=images[k], num_inference_steps=4,
                                                         guidance_scale=5.0, height=32, width=32,
                                                         latents=xl_latents[k:k + 1], output_type="pt").images
                                                 for k in range(len(PROMPTS))])
        sdxl = {"model": os.path.abspath(a.sdxl), "adapter": "ip-sdxl/ip-adapter.safetensors", "scale": 0.7,
                "steps": 4, "guidance": 5.0,
                "plus": {"adapter": "ip-sdxl/ip-adapter-plus.safetensors", "scale": 0.8, "steps": 4, "guidance": 5.0}}
    save_file({k: v.clone().contiguous() for k, v in res.items()}, os.path.join(a.out, "golden.safetensors"))
    meta = {"sdxl": sdxl, "prompts": PROMPTS, "images": [f"image_{k}.png" for k in range(len(PROMPTS))], "runs": RUNS,
            "adapter": "ip/ip-adapter.safetensors", "tokens": 4, "plus_runs": PLUS_RUNS,
            "plus_adapter": "ip/ip-adapter-plus.safetensors",
            "source": f"diffusers {diffusers.__version__} load_ip_adapter on {a.src}, torch {torch.__version__}, "
                      "float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
