#include "diffpipe/stages/memory.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/stages/ip_adapter.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/unclip.h"

namespace diffpipe {
namespace {

// A component's weights in `dtype` (the file may store another one); with `prefixes`, only tensors named so.
double weight_bytes(const std::string& file, c10::ScalarType dtype, const std::vector<std::string>& prefixes = {}) {
  if (!file_exists(file)) return 0;
  auto f = SafetensorsFile::open(file);
  double elems = 0;
  for (const auto& n : f->names())
    if (prefixes.empty() || std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) {
          return n.rfind(p, 0) == 0;
        }))
      elems += static_cast<double>(f->get(n).numel());
  return elems * static_cast<double>(c10::elementSize(dtype));
}

}  // namespace

MemoryNeed estimate_rank_memory(const std::string& dir, const std::vector<std::string>& stages, int width, int height,
                                int max_batch, bool guidance, c10::ScalarType dtype, const ModelAddons& addons) {
  const std::vector<std::string>& controlnets = addons.controlnets;
  // per-request LoRA adapters stay beside the weights of the UNet and text encoders (the whole file on each such
  // rank: an upper bound); fused ones change weights in place
  double adapter_bytes = 0;
  for (const LoraAdapter& a : addons.adapters) adapter_bytes += weight_bytes(a.path, dtype);
  const bool ip = !addons.ip_adapter.empty();  // IP-Adapter: its layers beside the UNet, its image encoder on encode
  const bool sd3 = SdModel::is_sd3(dir);  // Stable Diffusion 3: the MMDiT transformer instead of a UNet
  const bool flux = SdModel::is_flux(dir);  // FLUX.1: its transformer on 2x2-packed latents and 512 T5 tokens
  Sd3TransformerConfig tr;
  UNetConfig u;
  if (sd3) {
    tr = Sd3TransformerConfig::load(path_join(dir, "transformer/config.json"));
    u.sample_size = tr.sample_size;
  } else if (flux) {
    const FluxTransformerConfig fc = FluxTransformerConfig::load(path_join(dir, "transformer/config.json"));
    tr.patch_size = 2;  // the packing
    tr.num_attention_heads = fc.num_attention_heads;
    tr.attention_head_dim = fc.attention_head_dim;
    u.sample_size = 128;
  } else {
    u = UNetConfig::load(path_join(dir, "unet/config.json"));
  }
  const bool pixel = SdModel::is_if(dir);  // DeepFloyd IF: no VAE, the UNet works on pixels
  const bool kandinsky = SdModel::is_kandinsky(dir);  // Kandinsky 2.2: the prior's text encoder, MoVQ for the VAE
  const std::string vae_dir = path_join(dir, kandinsky ? "movq" : "vae");
  VaeConfig v;
  if (!pixel) v = VaeConfig::load(path_join(vae_dir, "config.json"));
  else v.block_out_channels = {u.block_out_channels[0]};
  const int64_t factor = pixel ? 1 : int64_t(1) << (v.block_out_channels.size() - 1);
  const double W = width > 0 ? width : static_cast<double>(u.sample_size * factor);
  const double H = height > 0 ? height : static_cast<double>(u.sample_size * factor);
  const double bytes = static_cast<double>(c10::elementSize(dtype));
  const c10::ScalarType vae_dtype = v.force_upcast && dtype == c10::kHalf ? c10::kFloat : dtype;
  const double vbytes = static_cast<double>(c10::elementSize(vae_dtype));
  MemoryNeed m;
  for (const auto& s : stages) {
    if (s == "encode") {
      m.weights += adapter_bytes;
      m.weights += weight_bytes(path_join(dir, "text_encoder/model.safetensors"), dtype);
      m.weights += weight_bytes(path_join(dir, "text_encoder_2/model.safetensors"), dtype);  // SDXL (0 if absent)
      m.weights += weight_bytes(path_join(dir, "text_encoder_3/model.safetensors"), dtype);  // SD3's T5 (0 if absent)
      if (kandinsky) {  // MoVQ's encoder (image-to-image) and the prior's text encoder
        m.weights += weight_bytes(path_join(vae_dir, "diffusion_pytorch_model.safetensors"), vae_dtype,
                                  {"encoder.", "quant_conv."});
        m.weights += weight_bytes(UnclipParts::kandinsky_part(dir, addons.prior, "text_encoder") + "/model.safetensors",
                                  dtype);
      }
      if (ip) m.weights += weight_bytes(path_join(ip_image_encoder_dir(addons), "model.safetensors"), dtype);
      if (SdModel::is_img2img_folder(dir)) {  // image-to-image: the VAE's encoder, one image at a time
        m.weights += weight_bytes(path_join(dir, "vae/diffusion_pytorch_model.safetensors"), vae_dtype,
                                  {"encoder.", "quant_conv."});
        const auto& c = v.block_out_channels;
        m.activations += W * H * (3.0 * static_cast<double>(c[0]) + 3.0) * vbytes;
      }
    } else if (s == "denoise" && (sd3 || flux)) {
      m.weights += weight_bytes(path_join(dir, "transformer/diffusion_pytorch_model.safetensors"), dtype);
      // per row: the image's patches and the text tokens (SD3 333, Flux 512), each about 14 x the inner width alive at once (the
      // residual streams, adaLN-modulated copies, q/k/v, the 4x-wide feed forward); attention keeps no L x L scores
      const double tokens = (W / factor / static_cast<double>(tr.patch_size)) *
                                (H / factor / static_cast<double>(tr.patch_size)) + (flux ? 512.0 : 333.0);
      const double rows = guidance && !flux ? 2.0 : 1.0;  // Flux embeds the guidance: one row
      m.activations += max_batch * rows * tokens * 14.0 * static_cast<double>(tr.inner_dim()) * bytes;
    } else if (s == "denoise") {
      m.weights += adapter_bytes;
      m.weights += weight_bytes(path_join(dir, "unet/diffusion_pytorch_model.safetensors"), dtype);
      if (ip) m.weights += weight_bytes(addons.ip_adapter, dtype);
      // per UNet row at h x w latents: the skip connections of every level (layers + 1 maps of C_l at hw / 4^l)
      // and a working set of about 12 maps of C_0 at the top level (GEGLU's 8 C_0, residual, norm, concat)
      const double hw = (W / factor) * (H / factor);
      double per_px = 12.0 * static_cast<double>(u.block_out_channels[0]);
      for (size_t l = 0; l < u.block_out_channels.size(); ++l)
        per_px += static_cast<double>(u.layers_per_block[l] + 1) * static_cast<double>(u.block_out_channels[l]) /
                  static_cast<double>(int64_t(1) << (2 * l));
      // (an LCM UNet, time_cond_proj_dim, embeds the guidance: one row)
      const double act = max_batch * (guidance && u.time_cond_proj_dim == 0 ? 2.0 : 1.0) * hw * per_px * bytes;
      m.activations += act;
      for (const std::string& cn : controlnets)  // each encoder half's weights
        m.weights += weight_bytes(path_join(cn, "diffusion_pytorch_model.safetensors"), dtype);
      if (!controlnets.empty()) m.activations += act / 2;  // their summed skips alive beside the UNet's
    } else if (s == "prior" && kandinsky) {  // the diffusion prior and its image encoder
      m.weights += weight_bytes(UnclipParts::kandinsky_part(dir, addons.prior, "prior") +
                                "/diffusion_pytorch_model.safetensors", dtype);
      m.weights += weight_bytes(UnclipParts::kandinsky_part(dir, addons.prior, "image_encoder") + "/model.safetensors",
                                dtype);
    } else if (s == "prior") {  // Stable unCLIP: the prior, its text encoder and the image encoder
      for (const char* f : {"prior/diffusion_pytorch_model.safetensors", "image_encoder/model.safetensors",
                            "prior_text_encoder/model.safetensors"})
        m.weights += weight_bytes(path_join(dir, f), dtype);
    } else if (s == "decode") {
      m.weights += weight_bytes(path_join(vae_dir, "diffusion_pytorch_model.safetensors"), vae_dtype);
      // the decoder's last levels at full resolution: about 2 maps of C_1 and 4 of C_0
      const auto& c = v.block_out_channels;
      const double top = 4.0 * static_cast<double>(c[0]) + 2.0 * static_cast<double>(c.size() > 1 ? c[1] : c[0]);
      m.activations += max_batch * W * H * top * vbytes;
    } else if (s == "upscale") {
      const std::string cfg = path_join(dir, "super_resolution/config.json");
      if (!file_exists(cfg)) continue;
      const SuperResConfig sr = SuperResConfig::load(cfg);
      m.weights += weight_bytes(path_join(dir, "super_resolution/diffusion_pytorch_model.safetensors"), vae_dtype);
      m.activations += max_batch * W * H * sr.scale * sr.scale * 4.0 * static_cast<double>(sr.channels) * vbytes;
    } else if (s == "refine") {  // the SDXL refiner: its text encoder(s) and UNet on the base's latents
      if (addons.refiner.empty()) continue;
      for (const char* te : {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors"})
        m.weights += weight_bytes(path_join(addons.refiner, te), dtype);
      const MemoryNeed n = estimate_rank_memory(addons.refiner, {"denoise"}, static_cast<int>(W), static_cast<int>(H),
                                                max_batch, guidance, dtype);
      m.weights += n.weights;
      m.activations += n.activations / 1.3;  // the slack is added once, below
    } else if (s == "x4") {  // DeepFloyd IF stage III: the upscaler folder's text encoder, UNet and VAE on stage II's
                              // images (stage I's size times stage II's factor), made 4x larger
      const std::string x4 = path_join(dir, "upscaler");
      if (!dir_exists(x4)) continue;
      double f2 = 1;
      if (SdModel::has_if_stage2(dir))
        f2 = static_cast<double>(UNetConfig::load(path_join(dir, "super_resolution/unet/config.json")).sample_size) /
             static_cast<double>(u.sample_size);
      const int64_t f3 = int64_t(1) << (VaeConfig::load(path_join(x4, "vae/config.json")).block_out_channels.size() - 1);
      const MemoryNeed n = estimate_rank_memory(x4, {"encode", "denoise", "decode"}, static_cast<int>(W * f2 * f3),
                                                static_cast<int>(H * f2 * f3), max_batch, true, dtype);
      m.weights += n.weights;
      m.activations += n.activations / 1.3;  // the slack is added once, below
    }
  }
  m.activations *= 1.3;  // allocator slack and short-lived temporaries
  return m;
}

double available_host_memory() {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::string key;
    double kb = 0;
    if (is >> key >> kb && key == "MemAvailable:") return kb * 1024.0;
  }
  return 0;
}

}  // namespace diffpipe
