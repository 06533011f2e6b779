#!/usr/bin/env python3
"""Makes a tiny DeepFloyd-IF-style UNet reference with diffusers, for the GoldenIf tests:

    python3 tests/stages/make_if_golden.py --out DIR [--seed 0]
    DIFFPIPE_GOLDEN_IF=DIR ./build/tests/test_stages --gtest_filter='GoldenIf.*'

DIR/unet/: UNet2DConditionModel configured as IF's stage I (IF-I-XL's config keys at a tiny size): pixel space (3 in,
6 out: the noise prediction and learned_range variance), gelu activations, scale-shift time conditioning with
skip_time_act and output scale 1.414, ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D (added-KV attention with
group-normed text states) and their up counterparts, UNetMidBlock2DSimpleCrossAttn, T5 states projected by
encoder_hid_proj and attention-pooled into the time embedding (addition_embed_type "text"), time_embedding_act_fn
gelu. Random weights. DIR/golden.safetensors: unet.sample [2, 3, 16, 16], unet.timesteps (i64), unet.encoder_hidden_states
[2, 9, 40] (T5-width states) -> unet.out [2, 6, 16, 16].
"""
import argparse
import json
import os
import shutil

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import diffusers
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    torch.manual_seed(a.seed)
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
    unet.save_pretrained(os.path.join(a.out, "unet"))
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ts = torch.tensor([981, 20])
    ehs = torch.randn(2, 9, 40, generator=g)
    with torch.no_grad():
        out = unet(x, ts, encoder_hidden_states=ehs).sample
    save_file({"unet.sample": x, "unet.timesteps": ts, "unet.encoder_hidden_states": ehs, "unet.out": out.contiguous()},
              os.path.join(a.out, "golden.safetensors"))
    meta = {"source": f"diffusers {diffusers.__version__} UNet2DConditionModel (IF stage I layout), torch "
                      f"{torch.__version__}, float32 CPU"}
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
