// IP-Adapter (an image prompt beside the text one), in the original h94/IP-Adapter format that diffusers'
// load_ip_adapter reads (ip-adapter_sd15, ip-adapter_sdxl): an image encoder (CLIPVisionModelWithProjection) embeds
// the request's image; image_proj (a Linear to 4 tokens and their LayerNorm) turns the embedding into tokens of the
// UNet's cross-attention width; every cross-attention gets to_k_ip / to_v_ip and adds scale x attention(query, the
// tokens' keys, their values) to its text attention. IP-Adapter Plus (ip-adapter-plus_sd15, ip-adapter-plus_sdxl_vit-h,
// ip-adapter-plus-face_*): the image encoder's penultimate hidden states through a perceiver resampler (learned queries
// attending to them) make the tokens instead. Files of other kinds (Full-face, FaceID) are refused by key.
// Thread-safety: read once at load; immutable after.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "diffpipe/stages/lora_spec.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {

struct UNetConfig;

// The weight prefixes of the UNet's cross-attentions ("down_blocks.0.attentions.0.transformer_blocks.0.attn2", ...)
// in diffusers' attention-processor order (down blocks, up blocks, then the mid block): the file's ip_adapter.K keys
// number them K = 1, 3, 5, ...
std::vector<std::string> cross_attention_layers(const UNetConfig& c);

struct IpAdapterFile {
  int64_t tokens = 0, embed_dim = 0;       // image_proj: embed_dim -> tokens x the cross-attention width
  // IP-Adapter Plus (image_proj.latents): a resampler of `depth` blocks with `heads` heads of 64 turns the image
  // encoder's penultimate hidden states (embed_dim wide) into `tokens` tokens
  bool plus = false;
  int64_t depth = 0, heads = 0;
  // The tensors as the UNet reads them: "ip_image_proj.proj.weight/bias", "ip_image_proj.norm.weight/bias" and, per
  // cross-attention, "<prefix>.to_k_ip.weight" / "<prefix>.to_v_ip.weight" (mapped from the file as stored: the UNet
  // converts them as it loads, other ranks never read them).
  std::map<std::string, at::Tensor> unet_tensors;
};
// Reads and checks `path` against the UNet config (every cross-attention present with its width, no key left over);
// errors name the file and the key.
IpAdapterFile read_ip_adapter(const std::string& path, const UNetConfig& unet);
// The image encoder folder of a run's IP-Adapter: the one given, or image_encoder/ beside the file (h94's layout).
std::string ip_image_encoder_dir(const ModelAddons& addons);

}  // namespace diffpipe
