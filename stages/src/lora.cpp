#include "diffpipe/stages/lora.h"

#include <cmath>
#include <functional>
#include <numeric>
#include <optional>
#include <map>
#include <regex>
#include <nlohmann/json.hpp>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/unet.h"
#include "diffpipe/stages/weights.h"

namespace diffpipe {
namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// A component's weight file: its weight names and shapes, from the safetensors header (nothing loaded).
struct WeightFile {
  std::string name, file;
  std::map<std::string, std::vector<int64_t>> shapes;       // weight key -> shape
  std::map<std::string, std::string> by_underscores;          // kohya's module name -> module
};

// A diffusers UNet module path in the original (SGM/LDM) layout's names, as kohya-ss names SDXL LoRAs (and some
// SD 1.x ones): down blocks are input_blocks (conv_in first, then each layer and downsampler), the mid block
// middle_block.0-2, up blocks output_blocks; resnets' parts in_layers/emb_layers/out_layers/skip_connection.
// "" where it has no such name.
std::string sgm_name(const std::string& module, const UNetConfig& c) {
  static const std::map<std::string, std::string> fixed{
      {"conv_in", "input_blocks.0.0"},          {"time_embedding.linear_1", "time_embed.0"},
      {"time_embedding.linear_2", "time_embed.2"}, {"add_embedding.linear_1", "label_emb.0.0"},
      {"add_embedding.linear_2", "label_emb.0.2"}, {"conv_norm_out", "out.0"},
      {"conv_out", "out.2"}};
  static const std::map<std::string, std::string> resnet{
      {"norm1", "in_layers.0"}, {"conv1", "in_layers.2"}, {"time_emb_proj", "emb_layers.1"},
      {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}};
  if (fixed.count(module)) return fixed.at(module);
  std::vector<std::string> p;
  for (size_t s = 0, e; s <= module.size(); s = e + 1) {
    e = module.find('.', s);
    if (e == std::string::npos) e = module.size();
    p.push_back(module.substr(s, e - s));
  }
  auto rest = [&](size_t from, const std::string& kind) -> std::string {  // the part inside a resnet or attention
    if (from >= p.size()) return "";
    std::string first = p[from];
    if (kind == "resnets") {
      if (!resnet.count(first)) return "";
      first = resnet.at(first);
    }
    std::string out = first;
    for (size_t k = from + 1; k < p.size(); ++k) out += "." + p[k];
    return out;
  };
  auto num = [&](size_t k) -> int64_t {  // the index at p[k], or -1
    return k < p.size() && !p[k].empty() && std::isdigit(static_cast<unsigned char>(p[k][0])) ? std::stoll(p[k]) : -1;
  };
  const auto& layers = c.layers_per_block;
  const int64_t n = static_cast<int64_t>(layers.size());
  if (p[0] == "down_blocks" && p.size() >= 4) {
    const int64_t b = num(1);
    if (b < 0 || b >= n) return "";
    int64_t start = 1;
    for (int64_t k = 0; k < b; ++k) start += layers[k] + 1;
    if (p[2] == "downsamplers" && p.back() == "conv") return "input_blocks." + std::to_string(start + layers[b]) + ".0.op";
    const int64_t j = num(3);
    if (j < 0 || (p[2] != "resnets" && p[2] != "attentions")) return "";
    const std::string r = rest(4, p[2]);
    return r.empty() ? "" : "input_blocks." + std::to_string(start + j) + (p[2] == "resnets" ? ".0." : ".1.") + r;
  }
  if (p[0] == "mid_block" && p.size() >= 4) {
    const std::string r = rest(3, p[1]);
    const int idx = p[1] == "resnets" ? (p[2] == "0" ? 0 : 2) : 1;
    return r.empty() ? "" : "middle_block." + std::to_string(idx) + "." + r;
  }
  if (p[0] == "up_blocks" && p.size() >= 4) {
    const int64_t b = num(1);
    if (b < 0 || b >= n) return "";
    auto up_layers = [&](int64_t k) { return layers[n - 1 - k] + 1; };
    int64_t start = 0;
    for (int64_t k = 0; k < b; ++k) start += up_layers(k);
    if (p[2] == "upsamplers" && p.back() == "conv") {
      const bool attn = c.up_block_types[b].find("CrossAttn") != std::string::npos;
      return "output_blocks." + std::to_string(start + up_layers(b) - 1) + (attn ? ".2.conv" : ".1.conv");
    }
    const int64_t j = num(3);
    if (j < 0 || (p[2] != "resnets" && p[2] != "attentions")) return "";
    const std::string r = rest(4, p[2]);
    return r.empty() ? "" : "output_blocks." + std::to_string(start + j) + (p[2] == "resnets" ? ".0." : ".1.") + r;
  }
  return "";
}

std::vector<WeightFile> components_of(const std::string& dir) {
  std::vector<WeightFile> out;
  for (const auto& [name, file] : std::vector<std::pair<std::string, std::string>>{
           {"unet", "unet/diffusion_pytorch_model.safetensors"},
           {"text_encoder", "text_encoder/model.safetensors"},
           {"text_encoder_2", "text_encoder_2/model.safetensors"},
           {"transformer", "transformer/diffusion_pytorch_model.safetensors"}}) {  // SD3, FLUX.1
    const std::string path = path_join(dir, file);
    if (!file_exists(path)) continue;
    WeightFile c{name, path, {}, {}};
    std::optional<UNetConfig> unet;
    if (name == "unet") unet = UNetConfig::load(path_join(dir, "unet/config.json"));
    const auto f = SafetensorsFile::open(path);
    for (const auto& k : f->names()) {
      c.shapes[k] = f->get(k).shape;
      if (!ends_with(k, ".weight")) continue;
      const std::string m = k.substr(0, k.size() - 7);
      auto add = [&](std::string u) {
        for (char& ch : u) ch = ch == '.' ? '_' : ch;
        c.by_underscores[u] = m;
      };
      add(m);
      // CLIP's weights are named with or without "text_model." (transformers 4 / 5); LoRAs either way
      if (name.rfind("text_encoder", 0) == 0) add(m.rfind("text_model.", 0) == 0 ? m.substr(11) : "text_model." + m);
      // UNet layers also by their original-layout (SGM) names, as kohya-ss names SDXL LoRAs
      if (unet)
        if (const std::string s = sgm_name(m, *unet); !s.empty()) add(s);
    }
    out.push_back(std::move(c));
  }
  return out;
}

struct Pair {
  at::Tensor down, up;
  double alpha = -1;  // kohya's .alpha; < 0: from metadata or the rank
  std::string down_key, up_key;
};

// FLUX.1 LoRAs as kohya-ss (sd-scripts) saves them, in the original (BFL) model's layer names
// (lora_unet_double_blocks_3_img_attn_qkv, ..._single_blocks_7_linear1, ...): the diffusers transformer modules each
// names, in order. A fused projection (qkv; a single block's linear1 = q, k, v and the MLP's input) is one LoRA whose
// up rows are split among its modules, the down matrix shared -- exactly the fused update (diffusers'
// _convert_kohya_flux_lora_to_diffusers splits them so too, or block-wise when the file is block-sparse: the same
// product). The final layer's modulation stores (shift, scale) where diffusers' norm_out has (scale, shift): its up
// rows swap halves. Alphas apply everywhere, as kohya-ss means them (diffusers 0.42's converter drops the embedders'
// and the final layer's LoRAs: it names them without the "transformer." prefix its loader filters on).
struct FluxKohyaTarget {
  std::vector<std::string> modules;
  bool swap_halves = false;
};
std::optional<FluxKohyaTarget> flux_kohya_target(const std::string& name) {
  static const std::regex dbl(R"(double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin))");
  static const std::regex sgl(R"(single_blocks_(\d+)_(linear1|linear2|modulation_lin|attn_qkv))");
  std::smatch m;
  if (std::regex_match(name, m, dbl)) {
    const std::string b = "transformer_blocks." + m[1].str() + ".", part = m[3].str();
    const bool img = m[2].str() == "img";
    if (part == "attn_qkv")
      return img ? FluxKohyaTarget{{b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"}}
                 : FluxKohyaTarget{{b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj"}};
    if (part == "attn_proj") return FluxKohyaTarget{{b + (img ? "attn.to_out.0" : "attn.to_add_out")}};
    if (part == "mlp_0") return FluxKohyaTarget{{b + (img ? "ff.net.0.proj" : "ff_context.net.0.proj")}};
    if (part == "mlp_2") return FluxKohyaTarget{{b + (img ? "ff.net.2" : "ff_context.net.2")}};
    return FluxKohyaTarget{{b + (img ? "norm1.linear" : "norm1_context.linear")}};
  }
  if (std::regex_match(name, m, sgl)) {
    const std::string b = "single_transformer_blocks." + m[1].str() + ".", part = m[2].str();
    if (part == "linear1") return FluxKohyaTarget{{b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"}};
    if (part == "attn_qkv") return FluxKohyaTarget{{b + "attn.to_q", b + "attn.to_k", b + "attn.to_v"}};  // XLabs
    return FluxKohyaTarget{{b + (part == "linear2" ? "proj_out" : "norm.linear")}};
  }
  static const std::map<std::string, std::string> fixed{
      {"img_in", "x_embedder"},
      {"txt_in", "context_embedder"},
      {"time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"},
      {"time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"},
      {"vector_in_in_layer", "time_text_embed.text_embedder.linear_1"},
      {"vector_in_out_layer", "time_text_embed.text_embedder.linear_2"},
      {"guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"},
      {"guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2"}};
  if (fixed.count(name)) return FluxKohyaTarget{{fixed.at(name)}};
  if (name == "final_layer_linear") return FluxKohyaTarget{{"proj_out"}};
  if (name == "final_layer_adaLN_modulation_1") return FluxKohyaTarget{{"norm_out.linear"}, true};
  return std::nullopt;
}

// FLUX.1 LoRAs as XLabs-AI's x-flux trainer saves them: its attention processors' layers
// ([diffusion_model.]double_blocks.N.processor.{qkv_lora1,qkv_lora2,proj_lora1,proj_lora2}.{down,up}.weight,
// single_blocks.N.processor.qkv_lora...), no alphas (its lora_weight 1). Each is a kohya-style fused LoRA: `key`'s
// name in flux_kohya_target's terms ("double_blocks_N_img_attn_qkv", ...; a single block's qkv is q, k and v alone),
// and *kind "down"/"up"; nullopt when `key` is not an XLabs key. A single block's proj_lora is refused: x-flux adds
// it to linear2's output (proj_lora(linear2(h))), which no change of a weight expresses (diffusers 0.42's converter
// maps it onto proj_out, whose input is 5x wider).
std::optional<std::string> flux_xlabs_name(const std::string& key, std::string* kind, const std::string& file) {
  static const std::regex re(
      R"((?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight)");
  std::smatch m;
  if (!std::regex_match(key, m, re)) return std::nullopt;
  const std::string n = m[2].str(), layer = m[3].str();
  *kind = m[4].str();
  if (m[1].str() == "single") {
    DP_CHECK(layer == "qkv_lora" || layer == "proj_lora", file, ": key '", key, "': a single block has qkv_lora and ",
             "proj_lora (XLabs' names)");
    DP_CHECK(layer == "qkv_lora", file, ": key '", key, "': XLabs' single-block proj_lora acts on linear2's output ",
             "(added after it), not on a weight: no LoRA of the model's layers expresses it");
    return "single_blocks_" + n + "_attn_qkv";
  }
  static const std::map<std::string, std::string> part{{"qkv_lora1", "img_attn_qkv"}, {"qkv_lora2", "txt_attn_qkv"},
                                                       {"proj_lora1", "img_attn_proj"}, {"proj_lora2", "txt_attn_proj"}};
  DP_CHECK(part.count(layer), file, ": key '", key, "': a double block has qkv_lora1/2 and proj_lora1/2 (XLabs' names)");
  return "double_blocks_" + n + "_" + part.at(layer);
}

}  // namespace

LoraSpec parse_lora_spec(const std::string& text) {
  LoraSpec s;
  s.path = text;
  const size_t colon = text.rfind(':');
  if (colon != std::string::npos && colon + 1 < text.size()) {
    const std::string tail = text.substr(colon + 1);
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(tail, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == tail.size() && used > 0) {
      DP_CHECK(std::isfinite(v), "lora: the scale in \"", text, "\" is not a finite number");
      s.path = text.substr(0, colon);
      s.scale = v;
    }
  }
  DP_CHECK(!s.path.empty(), "lora: no file in \"", text, "\"");
  return s;
}

std::vector<std::string> parse_path_list(const std::string& text, const std::string& what, const std::string& form) {
  std::vector<std::string> out;
  for (size_t start = 0, comma; !text.empty() && start <= text.size(); start = comma + 1) {
    comma = std::min(text.find(',', start), text.size());
    out.push_back(text.substr(start, comma - start));
    DP_CHECK(!out.back().empty(), what, ": an empty entry in \"", text, "\" (", form, ")");
  }
  return out;
}

std::vector<LoraAdapter> parse_lora_adapters(const std::string& text) {
  std::vector<LoraAdapter> out;
  for (const std::string& item : parse_path_list(text, "lora-adapters", "NAME=FILE,NAME=FILE...")) {
    const size_t eq = item.find('=');
    LoraAdapter a;
    if (eq == std::string::npos) {
      a.path = item;
      a.name = item.substr(item.rfind('/') == std::string::npos ? 0 : item.rfind('/') + 1);
      if (ends_with(a.name, ".safetensors")) a.name.resize(a.name.size() - 12);
    } else {
      a.name = item.substr(0, eq);
      a.path = item.substr(eq + 1);
    }
    DP_CHECK(!a.name.empty() && !a.path.empty() && a.name.find(':') == std::string::npos, "lora-adapters: '", item,
             "' is not NAME=FILE (a name without ':' and a file)");
    for (const auto& b : out) DP_CHECK(b.name != a.name, "lora-adapters: the name '", a.name, "' is given twice");
    out.push_back(a);
  }
  return out;
}

std::vector<LoraSpec> parse_lora_list(const std::string& text) {
  std::vector<LoraSpec> out;
  for (const std::string& item : parse_path_list(text, "lora", "FILE[:SCALE],FILE[:SCALE]..."))
    out.push_back(parse_lora_spec(item));
  return out;
}

std::vector<LoraLayer> read_lora(const LoraSpec& spec, const std::string& model_dir) {
  const std::string& file = spec.path;
  DP_CHECK(file_exists(file), file, ": LoRA file not found");
  const auto f = SafetensorsFile::open(file);
  const std::vector<WeightFile> comps = components_of(model_dir);
  auto component = [&](const std::string& name) -> const WeightFile* {
    for (const auto& c : comps)
      if (c.name == name) return &c;
    return nullptr;
  };
  // peft metadata: "<component>.lora_alpha", ".r", ".use_rslora", ".use_dora", ".alpha_pattern"
  nlohmann::json meta = nlohmann::json::object();
  if (f->metadata().count("lora_adapter_metadata")) {
    try {
      meta = nlohmann::json::parse(f->metadata().at("lora_adapter_metadata"));
    } catch (const std::exception& e) {
      DP_FAIL(file, ": header metadata lora_adapter_metadata is not JSON: ", e.what());
    }
  }
  std::map<std::pair<std::string, std::string>, Pair> pairs;  // (component, module) -> down/up
  std::map<std::string, Pair> flux_kohya;  // FLUX.1 kohya name -> its (possibly fused) LoRA, split below
  // a FLUX.1 folder: its transformer takes kohya's lora_unet_ keys, in the original model's names
  const bool flux = SdModel::is_flux(model_dir);
  for (const auto& key : f->names()) {
    std::string comp, module, kind;
    Pair* fused = nullptr;  // a FLUX.1 kohya (or XLabs) key's entry in flux_kohya (not yet a module's)
    std::optional<std::string> xlabs;
    if (flux && (xlabs = flux_xlabs_name(key, &kind, file))) {  // XLabs-AI's x-flux
      fused = &flux_kohya[*xlabs];
    } else if (key.rfind("lora_unet_", 0) == 0 || key.rfind("lora_te", 0) == 0) {  // kohya-ss
      const size_t dot = key.find('.');
      DP_CHECK(dot != std::string::npos, file, ": key '", key, "' has no .lora_down/.lora_up/.alpha suffix");
      const std::string name = key.substr(0, dot), suffix = key.substr(dot + 1);
      if (suffix == "lora_down.weight") kind = "down";
      else if (suffix == "lora_up.weight") kind = "up";
      else if (suffix == "alpha") kind = "alpha";
      else DP_FAIL(file, ": key '", key, "': unsupported suffix '", suffix, "' (lora_down.weight, lora_up.weight, alpha)");
      std::string under;
      if (name.rfind("lora_unet_", 0) == 0) comp = "unet", under = name.substr(10);
      else if (name.rfind("lora_te1_", 0) == 0) comp = "text_encoder", under = name.substr(9);
      else if (name.rfind("lora_te2_", 0) == 0) comp = "text_encoder_2", under = name.substr(9);
      else if (name.rfind("lora_te_", 0) == 0) comp = "text_encoder", under = name.substr(8);
      else DP_FAIL(file, ": key '", key, "': unknown kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)");
      if (comp == "unet" && flux) {
        DP_CHECK(flux_kohya_target(under), file, ": key '", key, "' names no layer of the FLUX.1 transformer (kohya's ",
                 "names of the original model: double_blocks_N_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}, ",
                 "single_blocks_N_{linear1,linear2,modulation_lin}, img_in, txt_in, {time,vector,guidance}_in_",
                 "{in,out}_layer, final_layer_linear, final_layer_adaLN_modulation_1)");
        fused = &flux_kohya[under];
      } else {
        const WeightFile* c = component(comp);
        DP_CHECK(c, file, ": key '", key, "' is for ", comp, ", which ", model_dir, " does not have");
        const auto it = c->by_underscores.find(under);
        DP_CHECK(it != c->by_underscores.end(), file, ": key '", key, "' names no layer of ", c->file,
                 " (kohya names are the folder's module paths, in diffusers' or the original layout's names, with '_' ",
                 "for '.')");
        module = it->second;
      }
    } else {  // diffusers / peft: <component>.<module>.lora_A.weight
      const size_t dot = key.find('.');
      comp = key.substr(0, dot);
      DP_CHECK(comp == "unet" || comp == "text_encoder" || comp == "text_encoder_2" || comp == "transformer", file,
               ": key '", key, "': unknown LoRA format (diffusers' unet./transformer./text_encoder./text_encoder_2. ",
               "keys, kohya's lora_unet_/lora_te_, or on FLUX.1 folders XLabs' double_blocks.N.processor.*_lora*)");
      if (ends_with(key, ".lora_A.weight")) kind = "down";
      else if (ends_with(key, ".lora_B.weight")) kind = "up";
      else DP_FAIL(file, ": key '", key, "': expected .lora_A.weight or .lora_B.weight (biases and DoRA magnitudes are not supported)");
      module = key.substr(dot + 1, key.size() - dot - 1 - 14);
      const WeightFile* c = component(comp);
      DP_CHECK(c, file, ": key '", key, "' is for ", comp, ", which ", model_dir, " does not have");
      // transformers 5 names CLIP's modules without "text_model."; the weight files (and older LoRAs) with it
      if (!c->shapes.count(module + ".weight") && c->shapes.count("text_model." + module + ".weight"))
        module = "text_model." + module;
      else if (!c->shapes.count(module + ".weight") && module.rfind("text_model.", 0) == 0 &&
               c->shapes.count(module.substr(11) + ".weight"))
        module = module.substr(11);
      DP_CHECK(c->shapes.count(module + ".weight"), file, ": key '", key, "' names no layer of ", c->file);
    }
    Pair& p = fused ? *fused : pairs[{comp, module}];
    const at::Tensor t = tensor_from_view(f, f->get(key));  // mapped, as stored: converted where it is applied
    if (kind == "alpha") {
      DP_CHECK(t.numel() == 1, file, ": key '", key, "' must be a scalar");
      p.alpha = t.to(at::kDouble).item<double>();
    } else if (kind == "down") {
      DP_CHECK(!p.down.defined(), file, ": keys '", p.down_key, "' and '", key, "' name the same layer");
      p.down = t;
      p.down_key = key;
    } else {
      DP_CHECK(!p.up.defined(), file, ": keys '", p.up_key, "' and '", key, "' name the same layer");
      p.up = t;
      p.up_key = key;
    }
  }
  for (auto& [name, p] : flux_kohya) {  // each FLUX.1 kohya LoRA onto its modules, up rows split in order
    const FluxKohyaTarget t = *flux_kohya_target(name);
    const std::string what = p.down.defined() ? p.down_key : p.up_key;  // kohya's or XLabs' key
    DP_CHECK(p.down.defined() && p.up.defined(), file, ": ", what, " has no ",
             p.down.defined() ? "up (lora_up / .up)" : "down (lora_down / .down)", " partner");
    const WeightFile* c = component("transformer");
    std::vector<int64_t> rows;
    for (const std::string& m : t.modules) {
      DP_CHECK(c->shapes.count(m + ".weight"), file, ": ", what, " is for ", m, ", which ", c->file, " does not have");
      rows.push_back(c->shapes.at(m + ".weight")[0]);
    }
    const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t(0));
    DP_CHECK(p.up.dim() >= 1 && p.up.size(0) == total, file, ": ", p.up_key, " has ", p.up.dim() ? p.up.size(0) : 0,
             " rows; ", what, " is ", t.modules.size() == 1 ? "" : "the fused ", t.modules.front(),
             t.modules.size() == 1 ? "" : "...", " with ", total, " outputs");
    int64_t at_row = 0;
    for (size_t k = 0; k < t.modules.size(); ++k) {
      Pair q = p;
      q.up = p.up.narrow(0, at_row, rows[k]);
      if (t.swap_halves) {
        const int64_t h = rows[k] / 2;
        q.up = at::cat({q.up.narrow(0, h, rows[k] - h), q.up.narrow(0, 0, h)}, 0);
      }
      at_row += rows[k];
      DP_CHECK(pairs.emplace(std::make_pair(std::string("transformer"), t.modules[k]), q).second, file, ": ",
               t.modules[k], " is named twice (", what, " and a diffusers key)");
    }
  }
  DP_CHECK(!pairs.empty(), file, ": no LoRA layers in it");
  std::vector<LoraLayer> out;
  for (auto& [where, p] : pairs) {
    const auto& [comp, module] = where;
    const std::string wk = module + ".weight";
    DP_CHECK(p.down.defined() && p.up.defined(), file, ": ", p.down.defined() ? p.down_key : p.up_key,
             " has no ", p.down.defined() ? "up (lora_B / lora_up)" : "down (lora_A / lora_down)", " partner");
    const std::vector<int64_t>& ws = component(comp)->shapes.at(wk);
    const int64_t r = p.down.size(0);
    const int64_t in = std::accumulate(ws.begin() + 1, ws.end(), int64_t(1), std::multiplies<int64_t>());
    DP_CHECK(p.up.dim() >= 2 && p.up.size(1) == r && p.up.size(0) == ws[0] && p.up.numel() == ws[0] * r &&
                 p.down.numel() == r * in,
             file, ": ", p.down_key, " ", shape_str(p.down.sizes()), " and ", p.up_key, " ", shape_str(p.up.sizes()),
             " do not fit ", comp, "'s ", wk, " ", shape_str(ws), " (rank ", r, ")");
    double alpha = p.alpha;
    bool rslora = false;
    if (alpha < 0 && meta.contains(comp + ".lora_alpha")) {
      DP_CHECK(!meta.value(comp + ".use_dora", false), file, ": DoRA (", comp, ".use_dora) is not supported");
      const auto pat = meta.value(comp + ".alpha_pattern", nlohmann::json::object());
      DP_CHECK(pat.is_null() || pat.empty(), file, ": per-module alphas (", comp, ".alpha_pattern) are not supported");
      alpha = meta.at(comp + ".lora_alpha").get<double>();
      rslora = meta.value(comp + ".use_rslora", false);
    }
    if (alpha < 0) alpha = static_cast<double>(r);  // no alpha anywhere: the update as stored
    LoraLayer l;
    l.component = comp;
    l.weight_key = wk;
    l.down = p.down.reshape({r, in});
    l.up = p.up.reshape({ws[0], r});
    l.factor = spec.scale * alpha / (rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r));
    out.push_back(std::move(l));
  }
  return out;
}

size_t apply_lora(Weights& w, const std::vector<LoraLayer>& layers, const std::string& component) {
  size_t n = 0;
  for (const LoraLayer& l : layers) {
    if (l.component != component) continue;
    ++n;
    if (l.adapter >= 0) {  // a per-request adapter: a branch beside the weight (converted where the layer is built)
      w.add_branch(l.weight_key, LoraBranch{l.adapter, l.down, l.up, l.factor});
      continue;
    }
    w.update(l.weight_key, [&](const at::Tensor& old) {
      // float32 where the weight lives (a GPU's weights never round-trip through the host)
      const at::Tensor delta =
          at::matmul(l.up.to(old.device(), at::kFloat), l.down.to(old.device(), at::kFloat)).mul_(l.factor);
      return (old.to(at::kFloat) + delta.reshape(old.sizes())).to(old.scalar_type());
    });
  }
  return n;
}

}  // namespace diffpipe
