#include "diffpipe/stages/ip_adapter.h"

#include <set>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/unet.h"

namespace diffpipe {

std::vector<std::string> cross_attention_layers(const UNetConfig& c) {
  std::vector<std::string> out;
  auto add = [&](const std::string& block, int64_t attentions, int64_t depth) {
    for (int64_t a = 0; a < attentions; ++a)
      for (int64_t t = 0; t < depth; ++t)
        out.push_back(block + ".attentions." + std::to_string(a) + ".transformer_blocks." + std::to_string(t) + ".attn2");
  };
  const size_t n = c.block_out_channels.size();
  for (size_t i = 0; i < n; ++i)
    if (c.down_block_types[i] == "CrossAttnDownBlock2D")
      add("down_blocks." + std::to_string(i), c.layers_per_block[i], c.transformer_layers_per_block[i]);
  for (size_t i = 0; i < n; ++i)  // up block i mirrors down block n - 1 - i (one more layer)
    if (c.up_block_types[i] == "CrossAttnUpBlock2D")
      add("up_blocks." + std::to_string(i), c.layers_per_block[n - 1 - i] + 1, c.transformer_layers_per_block[n - 1 - i]);
  if (c.mid_block_type == "UNetMidBlock2DCrossAttn") add("mid_block", 1, c.transformer_layers_per_block[n - 1]);
  return out;
}

namespace {
// IP-Adapter Plus's image_proj (diffusers' IPAdapterPlusImageProjection, as _convert_ip_adapter_image_proj_to_diffusers
// reads it): learned queries `latents` [1, Q, H], proj_in (the image encoder's width E -> H), blocks of
// (norm1, norm2, to_q, to_kv, to_out; then a LayerNorm and a GELU feed-forward 1.1 / 1.3, no biases), proj_out
// (H -> the UNet's width D) and norm_out; heads are to_q's rows / 64.
template <class Has, class Take>
void read_resampler(const std::string& path, const Has& has, Take& take, int64_t D, IpAdapterFile& f) {
  const at::Tensor latents = take("image_proj.latents", 3);
  const int64_t H = latents.size(2);
  DP_CHECK(latents.size(0) == 1, path, ": image_proj.latents must be [1, queries, width], got ",
           shape_str(latents.sizes()));
  f.plus = true;
  f.tokens = latents.size(1);
  auto put = [&](const std::string& from, const std::string& to, int dim, std::vector<int64_t> shape) {
    const at::Tensor v = take(from, dim);
    DP_CHECK(v.sizes().vec() == shape, path, ": tensor '", from, "' is ", shape_str(v.sizes()), ", expected ",
             shape_str(shape), " (image_proj.latents is ", H, " wide, the UNet's cross_attention_dim ", D, ")");
    f.unet_tensors["ip_image_proj." + to] = v;
    return v;
  };
  f.unet_tensors["ip_image_proj.latents"] = latents;
  const at::Tensor pin = take("image_proj.proj_in.weight", 2);
  DP_CHECK(pin.size(0) == H, path, ": image_proj.proj_in.weight is ", shape_str(pin.sizes()), "; its rows must be ",
           "image_proj.latents' width ", H);
  f.embed_dim = pin.size(1);
  f.unet_tensors["ip_image_proj.proj_in.weight"] = pin;
  put("image_proj.proj_in.bias", "proj_in.bias", 1, {H});
  put("image_proj.proj_out.weight", "proj_out.weight", 2, {D, H});
  put("image_proj.proj_out.bias", "proj_out.bias", 1, {D});
  put("image_proj.norm_out.weight", "norm_out.weight", 1, {D});
  put("image_proj.norm_out.bias", "norm_out.bias", 1, {D});
  int64_t depth = 0;
  while (true) {
    const std::string b = "image_proj.layers." + std::to_string(depth), to = "layers." + std::to_string(depth);
    if (depth > 0 && !has(b + ".0.to_q.weight")) break;
    const at::Tensor q = take(b + ".0.to_q.weight", 2);
    const int64_t inner = q.size(0), ff = 4 * H;
    DP_CHECK(q.size(1) == H && inner % 64 == 0, path, ": ", b, ".0.to_q.weight is ", shape_str(q.sizes()),
             "; expected [heads x 64, ", H, "]");
    f.unet_tensors["ip_image_proj." + to + ".to_q.weight"] = q;
    f.heads = inner / 64;
    put(b + ".0.to_kv.weight", to + ".to_kv.weight", 2, {2 * inner, H});
    put(b + ".0.to_out.weight", to + ".to_out.weight", 2, {H, inner});
    for (const char* n : {"norm1", "norm2"})
      for (const char* p : {"weight", "bias"})
        put(b + ".0." + n + "." + p, to + "." + (n == std::string("norm1") ? "ln0." : "ln1.") + p, 1, {H});
    for (const char* p : {"weight", "bias"}) put(b + ".1.0." + p, to + ".ff_norm." + p, 1, {H});
    put(b + ".1.1.weight", to + ".ff1.weight", 2, {ff, H});
    put(b + ".1.3.weight", to + ".ff2.weight", 2, {H, ff});
    ++depth;
  }
  f.depth = depth;
}
}  // namespace

IpAdapterFile read_ip_adapter(const std::string& path, const UNetConfig& unet) {
  DP_CHECK(file_exists(path), path, ": IP-Adapter file not found");
  DP_CHECK(path.size() > 12 && path.substr(path.size() - 12) == ".safetensors", path,
           ": only .safetensors IP-Adapter files are read (pickled .bin files are not)");
  // checked from the header on every rank; the tensors stay mapped, read only where the UNet loads them
  const auto file = SafetensorsFile::open(path);
  const std::vector<std::string> names = file->names();
  std::set<std::string> left(names.begin(), names.end());
  for (const char* k : {"image_proj.proj.3.weight", "image_proj.perceiver_resampler.proj_in.weight",
                        "image_proj.proj.0.weight"})
    DP_CHECK(!file->has(k), path, ": '", k, "' marks an IP-Adapter Full-face / FaceID file; the plain IP-Adapter ",
             "(image_proj.proj and image_proj.norm: 4 tokens from the image embedding) and IP-Adapter Plus ",
             "(image_proj.latents: a resampler over the image encoder's hidden states) are supported");
  auto take = [&](const std::string& k, int64_t dim) {
    DP_CHECK(file->has(k), path, ": tensor '", k, "' missing (an IP-Adapter file has image_proj.proj, image_proj.norm ",
             "and ip_adapter.K.to_k_ip / to_v_ip)");
    at::Tensor v = tensor_from_view(file, file->get(k));
    DP_CHECK(v.dim() == dim && at::isFloatingType(v.scalar_type()), path, ": tensor '", k, "' must be ", dim,
             "-D floating, got ", shape_str(v.sizes()));
    left.erase(k);
    return v;
  };
  const int64_t D = unet.cross_attention_dim[0];
  IpAdapterFile f;
  if (file->has("image_proj.latents")) {
    read_resampler(path, [&](const std::string& k) { return file->has(k); }, take, D, f);
  } else {
    const at::Tensor pw = take("image_proj.proj.weight", 2), pb = take("image_proj.proj.bias", 1);
    const at::Tensor nw = take("image_proj.norm.weight", 1), nb = take("image_proj.norm.bias", 1);
    DP_CHECK(nw.size(0) == D && nb.size(0) == D, path, ": image_proj.norm is ", nw.size(0), " wide, the UNet's ",
             "cross_attention_dim ", D, " (an adapter for another model family?)");
    DP_CHECK(pw.size(0) % D == 0 && pb.size(0) == pw.size(0), path, ": image_proj.proj.weight ", shape_str(pw.sizes()),
             " must make whole tokens of the UNet's width ", D);
    f.tokens = pw.size(0) / D;
    f.embed_dim = pw.size(1);
    f.unet_tensors = {{"ip_image_proj.proj.weight", pw}, {"ip_image_proj.proj.bias", pb},
                      {"ip_image_proj.norm.weight", nw}, {"ip_image_proj.norm.bias", nb}};
  }
  // each cross-attention's width: its block's channels (heads x head width = channels in SD's blocks)
  const std::vector<std::string> layers = cross_attention_layers(unet);
  const auto& boc = unet.block_out_channels;
  for (size_t k = 0; k < layers.size(); ++k) {
    const std::string& L = layers[k];
    const size_t dot = L.find('.', L.find('.') + 1);
    const int64_t b = L.rfind("mid_block", 0) == 0 ? -1 : std::stoll(L.substr(L.find('.') + 1, dot - L.find('.') - 1));
    const int64_t width = b < 0 ? boc.back() : L.rfind("up_blocks", 0) == 0 ? boc[boc.size() - 1 - b] : boc[b];
    const std::string id = "ip_adapter." + std::to_string(2 * k + 1);
    for (const char* kv : {"to_k_ip", "to_v_ip"}) {
      const at::Tensor w = take(id + "." + kv + ".weight", 2);
      DP_CHECK(w.size(0) == width && w.size(1) == D, path, ": ", id, ".", kv, ".weight is ", shape_str(w.sizes()),
               "; the UNet's cross-attention ", L, " needs [", width, ", ", D, "]");
      f.unet_tensors[L + "." + kv + ".weight"] = w;
    }
  }
  DP_CHECK(left.empty(), path, ": tensor '", *left.begin(), "' is not one of the ", layers.size(), " cross-attentions' ",
           "(ip_adapter.1 to ip_adapter.", 2 * layers.size() - 1, ") or image_proj's (an adapter for another UNet?)");
  return f;
}

std::string ip_image_encoder_dir(const ModelAddons& a) {
  if (!a.ip_image_encoder.empty()) return a.ip_image_encoder;
  const size_t slash = a.ip_adapter.find_last_of('/');
  return path_join(slash == std::string::npos ? "." : a.ip_adapter.substr(0, slash), "image_encoder");
}

}  // namespace diffpipe
