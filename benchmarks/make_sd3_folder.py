#!/usr/bin/env python3
"""Writes a Stable Diffusion 3 (or, with --flux, a FLUX.1) architecture folder with random weights, for benchmarks
(vs_diffusers.py, bench_sd):

    python3 benchmarks/make_sd3_folder.py --out DIR [--layers 8] [--heads 12] [--flux] [--vocab ../shared/golden/tiny-sd]

The parts keep SD3's real shapes where the cost lies per token: CLIP ViT-L/14's text encoder (hidden 768, 12 layers,
projection 768) and a shortened OpenCLIP bigG (hidden 1280, 8 layers, projection 1280), so the joint width is SD3's
2048; no T5 (as stable-diffusion-3 runs with text_encoder_3=None: 256 zero tokens still enter the transformer); an
MMDiT of `layers` SD3.5-style blocks (dual attention in the first half, RMS qk norm) of `heads` x 64 channels, patch 2,
16 latent channels; SD3's VAE config (16 latent channels, 128/256/512/512, scaling 1.5305, shift 0.0609);
FlowMatchEulerDiscreteScheduler with shift 3. The tokenizers are the CLIP BPE files of a tiny-sd folder.
--flux: CLIP ViT-L/14 (its pooled output), a 2-layer T5 of width 1024 (a Unigram vocabulary trained on captions, as
tests/stages/make_t5_golden.py makes it), a FluxTransformer2DModel of `layers` double-stream and 2 x `layers`
single-stream blocks of `heads` x 128 channels with the guidance embedding (FLUX.1-dev's form), Flux's VAE config
(scaling 0.3611, shift 0.1159) and its scheduler (shift 3, dynamic shifting).
"""
import argparse
import json
import os
import shutil

import torch


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", default=os.path.join(here, "..", "..", "shared", "golden", "tiny-sd"))
    ap.add_argument("--flux", action="store_true", help="a FLUX.1 folder instead")
    a = ap.parse_args()
    if a.flux:
        return make_flux(a)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok_src = os.path.join(a.vocab, "model", "tokenizer")
    tmp = a.out + ".tok"
    toks = []
    for pad in ("<|endoftext|>", "!"):
        d = os.path.join(tmp, pad.strip("<|>"))
        os.makedirs(d, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tok_src, f), d)
        cfg = json.load(open(os.path.join(tok_src, "tokenizer_config.json")))
        cfg["pad_token"] = pad
        json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
        toks.append(CLIPTokenizer.from_pretrained(d))
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                                                    pad_token_id=1, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=8,
                                                     num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                     pad_token_id=0, **common)).eval()
    tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=a.layers,
                               attention_head_dim=64, num_attention_heads=a.heads, joint_attention_dim=2048,
                               caption_projection_dim=64 * a.heads, pooled_projection_dim=2048, out_channels=16,
                               pos_embed_max_size=96, dual_attention_layers=tuple(range(a.layers // 2)),
                               qk_norm="rms_norm").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=toks[0], text_encoder_2=te2, tokenizer_2=toks[1],
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(a.out)
    for t, pad in (("tokenizer", "endoftext"), ("tokenizer_2", "!")):  # the slow tokenizer's files, as CLIP ships them
        for f in os.listdir(os.path.join(a.out, t)):
            os.remove(os.path.join(a.out, t, f))
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(os.path.join(tmp, pad, f), os.path.join(a.out, t, f))
    shutil.rmtree(tmp)
    n = sum(p.numel() for p in tr.parameters())
    print(f"wrote {a.out}: transformer {n / 1e6:.0f}M parameters ({a.layers} blocks of {64 * a.heads} channels)")


def make_flux(a):
    import sys
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "stages"))
    from make_t5_golden import make_t5

    tok_src = os.path.join(a.vocab, "model", "tokenizer")
    tmp = a.out + ".tmp"
    os.makedirs(os.path.join(tmp, "clip"), exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_src, f), os.path.join(tmp, "clip", f))
    tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "clip"))
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408,
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=1)).eval()
    tok2, _ = make_t5(os.path.join(tmp, "t5tok"), os.path.join(tmp, "t5small"), 0, os.path.join(tok_src, "vocab.json"))
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=1024, d_kv=64, d_ff=2816, num_layers=2, num_heads=16,
                                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                  pad_token_id=0, eos_token_id=1)).eval()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=a.layers, num_single_layers=2 * a.layers,
                                attention_head_dim=128, num_attention_heads=a.heads // 2, joint_attention_dim=1024,
                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                 transformer=tr).save_pretrained(a.out)
    for f in os.listdir(os.path.join(a.out, "tokenizer")):  # the slow tokenizer's files, as CLIP ships them
        os.remove(os.path.join(a.out, "tokenizer", f))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tmp, "clip", f), os.path.join(a.out, "tokenizer", f))
    shutil.rmtree(tmp)
    n = sum(p.numel() for p in tr.parameters())
    print(f"wrote {a.out}: Flux transformer {n / 1e6:.0f}M parameters ({a.layers} + {2 * a.layers} blocks of "
          f"{128 * (a.heads // 2)} channels)")


if __name__ == "__main__":
    main()
