#include "diffpipe/stages/stages.h"

#include <unicode/locid.h>
#include <unicode/unistr.h>

#include <map>
#include <optional>
#include <tuple>
#include <utility>

#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/philox.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/lora_spec.h"
#include "diffpipe/stages/unclip.h"
#include "nn.h"

namespace diffpipe {

namespace {
// The image size a request asks for: its width/height, or the model's default.
std::pair<int, int> requested_size(const SdModel& model, const GenerationParams& p) {
  const int d = static_cast<int>(model.default_size());
  return {p.width > 0 ? p.width : d, p.height > 0 ? p.height : d};
}

// The request's input image (image_prompt: the x4 upscaler's low-resolution image, image-to-image's start) as
// [3, h, w] float32 in [-1, 1], as diffusers' VaeImageProcessor makes it from a PIL image (x / 255 * 2 - 1).
at::Tensor input_image(const GenerationParams& p) {
  const Image img = read_image_ref(p.image_prompt);
  return image_to_unit_range(at::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, 3}, at::kByte));
}

// An image a request names in `field` (a path or a data URI); errors begin with the field's name.
Image read_field_image(const std::string& ref, const char* field, bool keep_alpha = false) {
  try {
    return read_image_ref(ref, keep_alpha);
  } catch (const std::exception& e) {
    DP_FAIL(field, ": ", e.what());
  }
}

// The request's mask as [1, H, W] float32 of 0 and 1. A mask with fully transparent pixels follows the OpenAI images
// API (those are repainted); any other, diffusers' mask processor: grey (PIL's L from RGB), then >= 0.5 repainted (1),
// below kept (0). Errors name the mask.
at::Tensor input_mask(const GenerationParams& p) {
  Image img = read_field_image(p.mask, "mask", /*keep_alpha=*/true);
  at::Tensor rgb = at::from_blob(img.pixels.data(), {img.height, img.width, img.channels}, at::kByte).to(at::kInt);
  using namespace at::indexing;
  if (img.channels == 4) {
    const at::Tensor clear = rgb.index({Ellipsis, 3}).eq(0);
    if (clear.any().item<bool>()) return clear.to(at::kFloat).unsqueeze(0);
  }
  const at::Tensor l = (rgb.index({Ellipsis, 0}) * 19595 + rgb.index({Ellipsis, 1}) * 38470 +
                        rgb.index({Ellipsis, 2}) * 7471 + 0x8000).floor_divide(65536);
  return (l.to(at::kFloat) / 255.0f).ge(0.5f).to(at::kFloat).unsqueeze(0);
}

// A cascade stage's conditioning image on `s` (IF stage II's enlarged stage-I image, the x4 upscaler's input): the
// image [3, h, w] in [-1, 1] noised to `level` by the model's image-noising schedule (DDPMScheduler.add_noise) with
// `image_noise` or the seed's `stream`, joined to the sample at every step; the level is both rows' class label.
void attach_noised_image(const SdModel& m, DenoiseState& s, const at::Tensor& x, int level, uint64_t stream,
                           const at::Tensor& image_noise) {
  const at::Tensor z = image_noise.defined() ? image_noise.to(at::kCPU, at::kFloat).reshape(x.sizes())
                                             : seeded_noise(s.seed, stream, x.sizes());
  const float a = alphas_cumprod(m.image_noising)[level].item<float>();
  s.concat = (std::sqrt(a) * x + std::sqrt(1.0f - a) * z).to(m.spec.device);
  s.class_labels = s.uncond_class_labels = at::full({1}, static_cast<float>(level), at::kFloat);
}

// DeepFloyd IF stage II's settings against its configs (resolve_params and make_if_sr_state).
void check_sr_settings(const SdModel& stage2, int steps, double guidance, int noise_level) {
  DP_CHECK(steps >= 1 && steps <= stage2.scheduler.num_train_timesteps, "sr_steps: must be in [1, ",
           stage2.scheduler.num_train_timesteps, "], got ", steps);
  DP_CHECK(noise_level >= 0 && noise_level < stage2.image_noising.num_train_timesteps, "sr_noise_level: must be in [0, ",
           stage2.image_noising.num_train_timesteps, "), got ", noise_level);
  DP_CHECK(std::isfinite(guidance) && guidance >= 0, "sr_guidance: must be a finite number >= 0, got ", guidance);
}

// IF's T5 reads this many tokens (IFPipeline.encode_prompt's max_length).
constexpr int kIfTokens = 77;

at::Tensor token_ids(const ClipTokenizer& tok, const std::vector<const std::string*>& texts) {
  const int L = tok.max_length();
  std::vector<int64_t> ids;
  ids.reserve(texts.size() * L);
  for (const std::string* t : texts) {
    auto v = tok.encode(*t);
    ids.insert(ids.end(), v.begin(), v.end());
  }
  return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({static_cast<int64_t>(texts.size()), L});
}

// Per-request LoRA: the row scales of a pass whose rows carry `scales` (each its request's adapter_scales);
// nullopt when no row chose an adapter (the layers then skip their branches).
std::optional<nn::AdapterRows> adapter_rows(const std::vector<const std::vector<float>*>& scales, const at::Device& dev) {
  std::optional<nn::AdapterRows> out;
  size_t n = 0;
  for (const auto* r : scales) n = std::max(n, r->size());
  for (size_t a = 0; a < n; ++a) {
    std::vector<float> col;
    bool any = false;
    for (const auto* r : scales) {
      col.push_back(a < r->size() ? (*r)[a] : 0.0f);
      any = any || col.back() != 0.0f;
    }
    if (!any) continue;
    if (!out) out.emplace().scales.resize(n);
    out->scales[a] = at::tensor(col, at::TensorOptions().dtype(at::kFloat)).to(dev);
  }
  return out;
}

// The adapter rows of a text encoder pass: each row (request, is_uncond) takes its request's adapters.
std::optional<nn::AdapterRows> text_adapter_rows(const SdModel& model, const std::vector<const GenerationParams*>& batch,
                                                 const std::vector<std::pair<size_t, bool>>& rows) {
  if (model.addons.adapters.empty()) return std::nullopt;
  std::vector<std::vector<float>> per_request;
  for (const GenerationParams* p : batch) per_request.push_back(adapter_scales(model, *p));
  std::vector<const std::vector<float>*> per_row;
  for (const auto& r : rows) per_row.push_back(&per_request[r.first]);
  return adapter_rows(per_row, model.spec.device);
}

// SDXL (StableDiffusionXLPipeline.encode_prompt): both encoders' hidden_states[-2] side by side (the refiner: the
// second's alone), the second's projected pooled output, and the size conditioning (the refiner: with the aesthetic
// scores); a guided request without a negative prompt gets zeros for both unconditional parts when the folder says
// force_zeros_for_empty_prompt.
std::vector<Embeddings> encode_sdxl(const SdModel& model, const std::vector<const GenerationParams*>& batch) {
  DP_CHECK(model.text_encoder_2 && model.tokenizer_2, "text encoder stage: SDXL's text_encoder_2 not loaded");
  std::vector<Embeddings> out(batch.size());
  // (request, is_uncond) of each text, grouped by the hidden state it reads: clip_skip k takes hidden_states[-(k + 2)]
  // for the prompt; the negative prompt always hidden_states[-2] (diffusers' encode_prompt)
  std::map<int, std::vector<std::pair<size_t, bool>>> groups;
  for (size_t i = 0; i < batch.size(); ++i) {
    groups[batch[i]->clip_skip].push_back({i, false});
    if (model.uses_cfg(*batch[i]) && !(batch[i]->negative_prompt.empty() && model.force_zeros_for_empty_prompt))
      groups[0].push_back({i, true});
  }
  const at::Device dev = model.spec.device;
  for (const auto& [skip, rows] : groups) {
    std::vector<const std::string*> texts;
    for (const auto& [i, uncond] : rows) texts.push_back(uncond ? &batch[i]->negative_prompt : &batch[i]->prompt);
    const auto lora = text_adapter_rows(model, batch, rows);
    nn::AdapterScope scope(lora ? &*lora : nullptr);
    const ClipTextOutput o2 =
        model.text_encoder_2->forward(token_ids(*model.tokenizer_2, texts).to(dev), 0, at::Tensor(), skip);
    at::Tensor h = o2.penultimate;  // the refiner has the second encoder alone
    if (!model.second_encoder_only) {
      DP_CHECK(model.text_encoder && model.tokenizer, "text encoder stage: SDXL's text_encoder not loaded");
      h = at::cat({model.text_encoder->forward(token_ids(*model.tokenizer, texts).to(dev), 0, at::Tensor(), skip)
                       .penultimate, h}, -1);
    }
    const at::Tensor pooled = model.text_encoder_2->project(o2.pooled).to(at::kFloat);
    for (size_t r = 0; r < rows.size(); ++r) {
      Embeddings& e = out[rows[r].first];
      (rows[r].second ? e.uncond : e.cond) = h[r];
      (rows[r].second ? e.uncond_class_labels : e.class_labels) = pooled[r];
    }
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    Embeddings& e = out[i];
    if (model.uses_cfg(*batch[i]) && !e.uncond.defined()) {
      e.uncond = at::zeros_like(e.cond);
      e.uncond_class_labels = at::zeros_like(e.class_labels);
    }
    const GenerationParams& p = *batch[i];
    const auto [width, height] = requested_size(model, p);
    const float h = static_cast<float>(height), w = static_cast<float>(width);
    const float oh = p.original_height > 0 ? float(p.original_height) : h;
    const float ow = p.original_width > 0 ? float(p.original_width) : w;
    if (model.aesthetic) {  // the refiner: (original size, crop, aesthetic score); the negative score for uncond
      e.time_ids = at::tensor(std::vector<float>{oh, ow, float(p.crop_top), float(p.crop_left),
                                                 static_cast<float>(p.aesthetic_score_or())});
      e.uncond_time_ids = at::tensor(std::vector<float>{oh, ow, float(p.crop_top), float(p.crop_left),
                                                        static_cast<float>(p.negative_aesthetic_score_or())});
    } else {
      e.time_ids = at::tensor(std::vector<float>{oh, ow, float(p.crop_top), float(p.crop_left), h, w});
    }
  }
  return out;
}

// T5's last hidden state of `texts` at `length` tokens each (</s> then <pad>), without an attention mask, as the SD3
// and Flux pipelines call text_encoder_3 / text_encoder_2: [n, length, d_model]
at::Tensor t5_states_unmasked(const SdModel& model, const std::vector<const std::string*>& texts, int64_t length) {
  std::vector<int64_t> ids;
  for (const std::string* t : texts) {
    const T5Tokenizer::Encoded e = model.t5_tokenizer->encode(*t, static_cast<int>(length));
    ids.insert(ids.end(), e.ids.begin(), e.ids.end());
  }
  const auto n = static_cast<int64_t>(texts.size());
  const at::Tensor id = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({n, length}).to(model.spec.device);
  return model.t5->forward(id, at::ones_like(id));
}

// Stable Diffusion 3 (StableDiffusion3Pipeline.encode_prompt): both CLIP encoders' hidden_states[-2] (clip_skip k:
// [-(k + 2)] for the prompt; the negative prompt always [-2]) side by side, zero-padded to the transformer's
// joint_attention_dim, then T5's max_sequence_length tokens (no attention mask, as the pipeline; zeros without
// text_encoder_3) after them; the pooled embedding is both encoders' projected ones side by side. A guided request
// without a negative prompt encodes "".
std::vector<Embeddings> encode_sd3(const SdModel& model, const std::vector<const GenerationParams*>& batch) {
  DP_CHECK(model.text_encoder && model.text_encoder_2 && model.tokenizer && model.tokenizer_2,
           "text encoder stage: SD3's CLIP text encoders are not loaded");
  DP_CHECK(!model.sd3_t5 || (model.t5 && model.t5_tokenizer), "text encoder stage: SD3's T5 encoder is not loaded");
  std::vector<Embeddings> out(batch.size());
  std::map<int, std::vector<std::pair<size_t, bool>>> groups;  // clip_skip -> (request, is_uncond)
  for (size_t i = 0; i < batch.size(); ++i) {
    groups[batch[i]->clip_skip].push_back({i, false});
    if (model.uses_cfg(*batch[i])) groups[0].push_back({i, true});
  }
  const at::Device dev = model.spec.device;
  const int64_t joint = model.transformer_config.joint_attention_dim, L = model.max_sequence_length;
  for (const auto& [skip, rows] : groups) {
    std::vector<const std::string*> texts;
    for (const auto& [i, uncond] : rows) texts.push_back(uncond ? &batch[i]->negative_prompt : &batch[i]->prompt);
    const auto lora = text_adapter_rows(model, batch, rows);  // per-request LoRA adapters of the CLIP encoders
    nn::AdapterScope scope(lora ? &*lora : nullptr);
    const ClipTextOutput o1 = model.text_encoder->forward(token_ids(*model.tokenizer, texts).to(dev), 0, at::Tensor(), skip);
    const ClipTextOutput o2 =
        model.text_encoder_2->forward(token_ids(*model.tokenizer_2, texts).to(dev), 0, at::Tensor(), skip);
    at::Tensor clip = at::cat({o1.penultimate, o2.penultimate}, -1);
    clip = at::constant_pad_nd(clip, {0, joint - clip.size(-1)}, 0.0);
    const auto n = static_cast<int64_t>(texts.size());
    at::Tensor t5;
    if (model.sd3_t5) {
      t5 = t5_states_unmasked(model, texts, L).to(clip.scalar_type());
    } else {
      t5 = at::zeros({n, L, joint}, clip.options());
    }
    const at::Tensor h = at::cat({clip, t5}, 1);
    const at::Tensor pooled = at::cat({model.text_encoder->project(o1.pooled), model.text_encoder_2->project(o2.pooled)},
                                      -1).to(at::kFloat);
    for (size_t r = 0; r < rows.size(); ++r) {
      Embeddings& e = out[rows[r].first];
      (rows[r].second ? e.uncond : e.cond) = h[static_cast<int64_t>(r)];
      (rows[r].second ? e.uncond_class_labels : e.class_labels) = pooled[static_cast<int64_t>(r)];
    }
  }
  return out;
}

// FLUX.1 (FluxPipeline.encode_prompt): CLIP's pooled output (the final layer norm's end-of-text token) and T5's
// max_sequence_length tokens without a mask; the negative prompt likewise for a request with true CFG (the [dev]
// transformer embeds the guidance: no unconditional row otherwise).
std::vector<Embeddings> encode_flux(const SdModel& model, const std::vector<const GenerationParams*>& batch) {
  DP_CHECK(model.text_encoder && model.tokenizer && model.t5 && model.t5_tokenizer,
           "text encoder stage: Flux's text encoders are not loaded");
  std::vector<const std::string*> texts;
  std::vector<std::pair<size_t, bool>> rows;
  for (size_t i = 0; i < batch.size(); ++i) {
    texts.push_back(&batch[i]->prompt);
    rows.push_back({i, false});
    if (model.uses_cfg(*batch[i])) {
      texts.push_back(&batch[i]->negative_prompt);
      rows.push_back({i, true});
    }
  }
  const at::Device dev = model.spec.device;
  at::Tensor pooled;
  {
    const auto lora = text_adapter_rows(model, batch, rows);  // per-request LoRA adapters of CLIP
    nn::AdapterScope scope(lora ? &*lora : nullptr);
    pooled = model.text_encoder->forward(token_ids(*model.tokenizer, texts).to(dev)).pooled.to(at::kFloat);
  }
  const at::Tensor h = t5_states_unmasked(model, texts, model.max_sequence_length);
  std::vector<Embeddings> out(batch.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    Embeddings& e = out[rows[r].first];
    const auto k = static_cast<int64_t>(r);
    (rows[r].second ? e.uncond : e.cond) = h[k];
    (rows[r].second ? e.uncond_class_labels : e.class_labels) = pooled[k];
  }
  return out;
}

// IFPipeline._text_preprocessing without clean_caption (which needs bs4 and ftfy): lower case, surrounding white
// space removed (Python's str.lower and str.strip).
std::string if_preprocess(const std::string& text) {
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(text);
  u.toLower(icu::Locale::getRoot());
  std::string s;
  u.toUTF8String(s);
  const char* ws = " \t\n\r\f\v";
  const size_t a = s.find_first_not_of(ws), b = s.find_last_not_of(ws);
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

// DeepFloyd IF (IFPipeline.encode_prompt): T5's last hidden state with the padding mask, at the tokenizer's 77
// tokens; the negative prompt ("" by default) likewise.
std::vector<Embeddings> encode_if(const SdModel& model, const std::vector<const GenerationParams*>& batch) {
  DP_CHECK(model.t5 && model.t5_tokenizer, "text encoder stage: the T5 encoder is not loaded");
  std::vector<Embeddings> out(batch.size());
  std::vector<int64_t> ids, mask;
  std::vector<std::pair<size_t, bool>> rows;
  auto add = [&](size_t i, bool uncond, const std::string& text) {
    const T5Tokenizer::Encoded e = model.t5_tokenizer->encode(if_preprocess(text), kIfTokens);
    ids.insert(ids.end(), e.ids.begin(), e.ids.end());
    mask.insert(mask.end(), e.mask.begin(), e.mask.end());
    rows.push_back({i, uncond});
  };
  for (size_t i = 0; i < batch.size(); ++i) {
    add(i, false, batch[i]->prompt);
    if (model.uses_cfg(*batch[i])) add(i, true, batch[i]->negative_prompt);
  }
  const auto n = static_cast<int64_t>(rows.size());
  const auto opt = at::TensorOptions().dtype(at::kLong);
  const at::Tensor h = model.t5->forward(at::tensor(ids, opt).view({n, kIfTokens}).to(model.spec.device),
                                         at::tensor(mask, opt).view({n, kIfTokens}).to(model.spec.device));
  for (int64_t r = 0; r < n; ++r) (rows[r].second ? out[rows[r].first].uncond : out[rows[r].first].cond) = h[r];
  return out;
}
}  // namespace

std::vector<Embeddings> TextEncodeStage::run(const std::vector<const GenerationParams*>& batch) const {
  if (model_.deepfloyd_if) {
    if (batch.empty()) return {};
    profile::Scope prof(profile::Section::TextEncoder);
    return encode_if(model_, batch);
  }
  if (model_.sdxl) {
    if (batch.empty()) return {};
    profile::Scope prof(profile::Section::TextEncoder);
    return encode_sdxl(model_, batch);
  }
  if (model_.dit()) {
    if (batch.empty()) return {};
    profile::Scope prof(profile::Section::TextEncoder);
    return model_.flux ? encode_flux(model_, batch) : encode_sd3(model_, batch);
  }
  DP_CHECK(model_.text_encoder && model_.tokenizer, "text encoder stage: text encoder not loaded");
  std::vector<Embeddings> out(batch.size());
  if (batch.empty()) return out;
  profile::Scope prof(profile::Section::TextEncoder);
  // Rows: cond prompts, then negative prompts of the guided requests. clip_skip groups run separately.
  std::map<int, std::vector<std::pair<size_t, bool>>> groups;  // clip_skip -> (request, is_uncond)
  for (size_t i = 0; i < batch.size(); ++i) {
    groups[batch[i]->clip_skip].push_back({i, false});
    if (model_.uses_cfg(*batch[i])) groups[batch[i]->clip_skip].push_back({i, true});
  }
  for (const auto& [skip, rows] : groups) {
    std::vector<const std::string*> texts;
    for (const auto& [i, uncond] : rows) texts.push_back(uncond ? &batch[i]->negative_prompt : &batch[i]->prompt);
    const at::Tensor input = token_ids(*model_.tokenizer, texts);
    const auto lora = text_adapter_rows(model_, batch, rows);
    nn::AdapterScope scope(lora ? &*lora : nullptr);
    at::Tensor h = model_.text_encoder->forward(input.to(model_.spec.device), skip).last_hidden_state;
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto& [i, uncond] = rows[r];
      (uncond ? out[i].uncond : out[i].cond) = h[r];
    }
  }
  return out;
}

std::vector<float> adapter_scales(const SdModel& model, const GenerationParams& p) {
  const auto& adapters = model.addons.adapters;
  std::vector<float> out(adapters.size(), 0.0f);
  if (p.lora.empty()) return out;
  std::string names;
  for (const auto& a : adapters) names += (names.empty() ? "" : ", ") + a.name;
  std::vector<bool> seen(adapters.size(), false);
  for (const LoraSpec& l : parse_lora_list(p.lora)) {  // NAME[:SCALE]: path holds the name
    DP_CHECK(l.path.find(':') == std::string::npos, "lora: '", l.path, "' is not NAME[:SCALE] (a number after ':')");
    const auto it = std::find_if(adapters.begin(), adapters.end(), [&](const LoraAdapter& a) { return a.name == l.path; });
    DP_CHECK(it != adapters.end(), "lora: no adapter '", l.path, "' in this run (", adapters.empty()
             ? std::string("it has none: start it with --lora-adapters NAME=FILE,...") : "its adapters: " + names, ")");
    const size_t i = static_cast<size_t>(it - adapters.begin());
    DP_CHECK(!seen[i], "lora: the adapter '", l.path, "' is named twice");
    seen[i] = true;
    out[i] = static_cast<float>(l.scale);
  }
  return out;
}

at::Tensor ip_image_embeds(const SdModel& model, const GenerationParams& p) {
  DP_CHECK(model.ip_image_encoder, "ip_adapter_image: the IP-Adapter's image encoder is not loaded here");
  const at::Tensor px = preprocess_clip_image(model.ip_image_processor,
                                              read_field_image(p.ip_adapter_image, "ip_adapter_image"));
  const at::Tensor x = px.to(model.spec.device, model.spec.dtype);
  if (!model.ip_plus) return model.ip_image_encoder->image_embeds(x).to(at::kCPU, at::kFloat)[0];
  // Plus: [the zero image's, the image's] penultimate hidden states (diffusers' encode_image, output_hidden_states)
  return at::stack({model.ip_image_encoder->zero_image_hidden_states(),
                    model.ip_image_encoder->penultimate_hidden_states(x).to(at::kCPU, at::kFloat)[0]});
}

ResolvedParams resolve_params(const SdModel& model, const GenerationParams& p, const at::Tensor& image_latents) {
  ResolvedParams r;
  if (p.sampler.empty()) {
    try {
      r.kind = sampler_kind_of_class(model.scheduler.class_name, model.scheduler.algorithm_type);
    } catch (const Error& e) {
      DP_FAIL("sampler: ", path_join(model.dir, "scheduler/scheduler_config.json"), " names ", e.what());
    }
  } else {
    r.kind = parse_sampler_name(p.sampler, &r.karras);
  }
  DP_CHECK(p.steps >= 1 && p.steps <= model.scheduler.num_train_timesteps, "steps: must be in [1, ",
           model.scheduler.num_train_timesteps, "], got ", p.steps);
  DP_CHECK(!model.scheduler.thresholding || r.kind == SamplerKind::DDPM, "sampler: ", sampler_kind_name(r.kind),
           " does not apply the dynamic thresholding that ", model.dir,
           "'s scheduler uses (DDPMScheduler with thresholding): use ddpm (the default)");
  const bool flow = model.scheduler.flow_matching();
  DP_CHECK(flow == (r.kind == SamplerKind::FlowMatchEuler), "sampler: ", sampler_kind_name(r.kind),
           flow ? " does not apply to " : " applies to flow-matching models only, not ", model.dir,
           flow ? "'s flow-matching model (FlowMatchEulerDiscreteScheduler): use flow_euler (the default)"
                : " (its scheduler is a diffusion one)");
  std::tie(r.width, r.height) = requested_size(model, p);
  // the image's tokens, for a schedule shifted by resolution (use_dynamic_shifting)
  auto tokens = [&](int64_t w, int64_t h) {
    const int64_t f = model.latent_factor() * model.denoiser_downscale();
    return (w / f) * (h / f);
  };
  // checks the schedule itself
  r.sampler = Sampler::create(r.kind, model.scheduler, p.steps, r.karras, 1.0, tokens(r.width, r.height));
  DP_CHECK(std::isfinite(p.guidance) && p.guidance >= 0, "guidance: must be a finite number >= 0, got ", p.guidance);
  DP_CHECK(std::isfinite(p.guidance_rescale) && p.guidance_rescale >= 0 && p.guidance_rescale <= 1,
           "guidance_rescale: must be in [0, 1], got ", p.guidance_rescale);
  DP_CHECK(p.guidance_rescale == 0 || (model.uses_cfg(p) && model.img2img() && !model.dit()),
           "guidance_rescale: only a guided request (guidance > 1, an unconditional row) of a Stable Diffusion or ",
           "SDXL folder uses it",
           model.unet_config.time_cond_proj_dim > 0 ? " (this LCM-distilled UNet embeds the guidance instead)" : "");
  DP_CHECK(p.clip_skip >= 0 && p.clip_skip < model.text_config.num_hidden_layers, "clip_skip: must be in [0, ",
           model.text_config.num_hidden_layers, "), got ", p.clip_skip);
  const bool img2img = model.starts_from_image(p);
  DP_CHECK(p.mask.empty() || !model.kandinsky, "mask: inpainting needs a Kandinsky 2.2 inpainting folder, which ",
           "diffpipe does not load; ", model.dir, " takes no mask");
  DP_CHECK(p.mask.empty() || img2img, "mask: inpainting needs an image to paint into (image_prompt) and a Stable ",
           "Diffusion folder; ", model.dir, p.image_prompt.empty() ? " got no image" : " takes its image otherwise");
  DP_CHECK(!model.inpaint_unet || (img2img && !p.mask.empty()), "mask: ", model.dir, " is an inpainting folder (its ",
           "UNet takes a mask and the masked image): every request needs an image and a mask");
  if (img2img) {  // the output has the input image's size; the schedule starts at int(steps x strength) from its end
    DP_CHECK(p.strength < 0 || (std::isfinite(p.strength) && p.strength <= 1), "strength: must be in [0, 1], got ",
             p.strength);
    int64_t W = 0, H = 0;
    if (image_latents.defined()) {
      W = image_latents.size(-1) * model.latent_factor();
      H = image_latents.size(-2) * model.latent_factor();
    } else {
      r.image = input_image(p);
      W = r.image.size(2);
      H = r.image.size(1);
    }
    DP_CHECK((p.width == 0 || p.width == W) && (p.height == 0 || p.height == H), "width/height: image-to-image makes ",
             "an image of its input's size, ", W, "x", H, " (", describe_image_ref(p.image_prompt), "), not ", r.width,
             "x", r.height, " (leave width and height out)");
    const int64_t m = model.size_multiple();
    DP_CHECK(W % m == 0 && H % m == 0, "image_prompt: ", describe_image_ref(p.image_prompt), " is ", W, "x", H,
             "; image-to-image needs sides that are multiples of ", m, " (the latent factor ", model.latent_factor(),
             " x the UNet's downsampling)");
    r.width = static_cast<int>(W);
    r.height = static_cast<int>(H);
    const double strength = model.strength(p);
    if (model.lcm_pipeline && r.kind == SamplerKind::LCM && p.mask.empty()) {
      // LatentConsistencyModelImg2ImgPipeline: every step runs, over the strength's share of the LCM schedule
      r.sampler = Sampler::create(r.kind, model.scheduler, p.steps, false, strength);
    } else {
      // diffusers' get_timesteps: int(steps x strength) run; SD3's and Flux's pipelines skip
      // int(steps - steps x strength)
      const bool dit = model.dit();
      const int init = dit ? p.steps - static_cast<int>(std::max(p.steps - p.steps * strength, 0.0))
                           : std::min(static_cast<int>(p.steps * strength), p.steps);
      DP_CHECK(init >= 1, "strength: ", strength, " x ", p.steps, " steps leaves no denoising step (int(steps x ",
               "strength) must be at least 1); raise strength or steps");
      r.begin = (p.steps - init) * r.sampler->order();  // timesteps[t_start * order:]
      if (model.scheduler.use_dynamic_shifting)  // the schedule shifted for the image's size, not the default's
        r.sampler = Sampler::create(r.kind, model.scheduler, p.steps, r.karras, 1.0, tokens(W, H));
    }
    if (!p.mask.empty() && !image_latents.defined()) {
      r.mask = input_mask(p);
      DP_CHECK(r.mask.size(1) == H && r.mask.size(2) == W, "mask: ", describe_image_ref(p.mask), " is ", r.mask.size(2),
               "x", r.mask.size(1), ", the image ", W, "x", H, " (a mask covers its image pixel for pixel)");
    }
  } else {
    DP_CHECK(p.strength < 0, "strength: only image-to-image uses it (an image_prompt with a Stable Diffusion, SDXL, ",
             "SD3 or Flux folder); ", model.dir, " ", p.image_prompt.empty() ? "got no image" : "is not one");
  }
  if (model.upscaler) {  // the output is the image enlarged by the VAE's factor
    DP_CHECK(!p.image_prompt.empty(), "image_prompt: the x4 upscaler needs the low-resolution image to enlarge ",
             "(--image FILE, or \"image_prompt\" in a JSONL line)");
    r.image = input_image(p);
    const at::Tensor& img = r.image;
    const int64_t f = model.latent_factor(), W = img.size(2) * f, H = img.size(1) * f;
    DP_CHECK((p.width == 0 || p.width == W) && (p.height == 0 || p.height == H), "width/height: the x4 upscaler makes ",
             W, "x", H, " from ", p.image_prompt, " (", img.size(2), "x", img.size(1), " times ", f, "), not ",
             r.width, "x", r.height, " (leave width and height out)");
    r.width = static_cast<int>(W);
    r.height = static_cast<int>(H);
    DP_CHECK(p.noise_level >= 0 && p.noise_level <= model.max_noise_level, "noise_level: must be in [0, ",
             model.max_noise_level, "] (the folder's max_noise_level), got ", p.noise_level);
  }
  r.adapter_scales = adapter_scales(model, p);
  DP_CHECK(!p.guess_mode || std::any_of(p.controls.begin(), p.controls.end(), [](const ControlInput& c) {
             return !c.image.empty();
           }), "guess_mode: only a request with a control_image uses it");
  // ControlNets: each entry's image of the output's size, as [0, 1] RGB
  const size_t nets = model.addons.controlnets.size();
  for (size_t k = 0; k < p.controls.size(); ++k) {
    const ControlInput& c = p.controls[k];
    const std::string which = p.controls.size() > 1 ? detail::cat(" (entry ", k + 1, ")") : std::string();
    if (c.image.empty()) {
      const ControlInput d;
      DP_CHECK(c.scale == d.scale && c.start == d.start && c.end == d.end, "control_scale", which,
               ": only a request with a control_image uses it (and control_start/control_end)");
      r.controls.emplace_back();
      continue;
    }
    DP_CHECK(k < nets, "control_image", which, ": ", model.dir, nets == 0
             ? std::string(" runs without a ControlNet (start the run with --controlnet DIR)")
             : detail::cat(" runs with ", nets, " ControlNet", nets > 1 ? "s" : "", " (--controlnet), not ", k + 1));
    DP_CHECK(std::isfinite(c.scale), "control_scale", which, ": must be a finite number, got ", c.scale);
    DP_CHECK(c.start >= 0 && c.start < c.end && c.end <= 1, "control_start/control_end", which,
             ": need 0 <= start < end <= 1, got ", c.start, " and ", c.end);
    Image img = read_field_image(c.image, "control_image");
    DP_CHECK(img.width == r.width && img.height == r.height, "control_image", which, ": ", describe_image_ref(c.image),
             " is ", img.width, "x", img.height, "; the image is ", r.width, "x", r.height,
             " (a ControlNet's image has the output's size)");
    r.controls.push_back(at::from_blob(img.pixels.data(), {img.height, img.width, 3}, at::kByte)
                             .permute({2, 0, 1})
                             .to(at::kFloat)
                             .div(255.0)
                             .contiguous());
  }
  const int64_t m = model.size_multiple();
  DP_CHECK(p.width >= 0 && r.width % m == 0, "width: ", r.width, " is not a positive multiple of ", m,
           " (the latent factor ", model.latent_factor(), " x the UNet's downsampling)");
  DP_CHECK(p.height >= 0 && r.height % m == 0, "height: ", r.height, " is not a positive multiple of ", m,
           " (the latent factor ", model.latent_factor(), " x the UNet's downsampling)");
  DP_CHECK(r.width <= 8192 && r.height <= 8192, "width/height: at most 8192");

  DP_CHECK(std::isfinite(p.true_cfg_scale) && p.true_cfg_scale >= 1.0 && p.true_cfg_scale <= 100.0,
           "true_cfg_scale: must be in [1, 100], got ", p.true_cfg_scale);
  DP_CHECK(model.flux || p.true_cfg_scale == 1.0, "true_cfg_scale: FLUX.1 folders only (their classifier-free ",
           "guidance beside the embedded guidance scale); ", model.dir, " mixes its rows with the guidance scale");
  if (!p.skip_guidance_layers.empty()) {  // StableDiffusion3Pipeline's skip-layer guidance
    DP_CHECK(model.sd3, "skip_guidance_layers: SD3 folders only (StableDiffusion3Pipeline's skip-layer guidance); ",
             model.dir, " is not one");
    DP_CHECK(!img2img, "skip_guidance_layers: text-to-image only (StableDiffusion3Pipeline's; ",
             "its image-to-image and inpainting pipelines have none)");
    DP_CHECK(model.uses_cfg(p), "skip_guidance_layers: needs classifier-free guidance (guidance above 1): it acts ",
             "on the guided prediction, as StableDiffusion3Pipeline does only then");
    for (int l : p.skip_guidance_layers)
      DP_CHECK(l >= 0 && l < model.transformer_config.num_layers, "skip_guidance_layers: block ", l, " is not in [0, ",
               model.transformer_config.num_layers, ") (the transformer's num_layers, ", model.dir, ")");
    DP_CHECK(std::isfinite(p.skip_layer_guidance_scale) && p.skip_layer_guidance_scale >= 0 &&
                 p.skip_layer_guidance_scale <= 100,
             "skip_layer_guidance_scale: must be in [0, 100], got ", p.skip_layer_guidance_scale);
    DP_CHECK(p.skip_layer_guidance_start >= 0 && p.skip_layer_guidance_start <= p.skip_layer_guidance_stop &&
                 p.skip_layer_guidance_stop <= 1,
             "skip_layer_guidance_start/stop: need 0 <= start <= stop <= 1, got ", p.skip_layer_guidance_start, " and ",
             p.skip_layer_guidance_stop);
  }
  if (model.flux) {  // FluxPipeline: one row per request, CLIP's pooled output; true CFG adds the negative prompt's
    DP_CHECK(p.negative_prompt.empty() || model.uses_cfg(p), "negative_prompt: ", model.dir, " is a FLUX.1 folder: ",
             "without true CFG it runs no unconditional row (the guidance scale is embedded), so a negative prompt ",
             "would go unused; set true_cfg_scale above 1 (FluxPipeline's true_cfg_scale)");
    DP_CHECK(p.clip_skip == 0, "clip_skip: not supported for FLUX.1 folders (CLIP's pooled output only; ", model.dir,
             ")");
  }
  if (model.sd3) {  // the transformer's position table covers pos_embed_max_size patches a side
    const int64_t most = model.transformer_config.pos_embed_max_size * model.denoiser_downscale() * model.latent_factor();
    DP_CHECK(r.width <= most && r.height <= most, "width/height: ", r.width, "x", r.height, " exceeds ", most,
             " pixels a side, the most ", model.dir, "'s transformer covers (pos_embed_max_size ",
             model.transformer_config.pos_embed_max_size, " patches)");
  }
  DP_CHECK(p.image_prompt.empty() || model.image_variations || model.upscaler || model.img2img(), "image_prompt: ",
           model.dir, " takes no input image (", model.deepfloyd_if ? "DeepFloyd IF starts from noise" :
           "image variations need a StableUnCLIPImg2ImgPipeline folder, with image_encoder/", ")");
  // Kandinsky 2.2: an image prompt without a prompt is a variation (the decoder sees the image's embedding alone,
  // diffusers' interpolate of one image), where a negative prompt would be silently unused; with a prompt it is the
  // starting image (image-to-image)
  DP_CHECK(!model.kandinsky || p.image_prompt.empty() || !p.prompt.empty() || p.negative_prompt.empty(),
           "negative_prompt: a Kandinsky 2.2 image variation (an image prompt without a prompt) takes its embedding from ",
           "the image alone; leave the negative prompt empty (or give a prompt: image-to-image)");
  DP_CHECK(!model.kandinsky || p.clip_skip == 0, "clip_skip: not supported for Kandinsky 2.2 folders (its prior ",
           "reads the text encoder's last layer; ", model.dir, ")");
  if (model.sdxl || model.sd3) {  // hidden_states[-(clip_skip + 2)] of each encoder (indexed from the penultimate)
    int64_t layers = model.text_config_2.num_hidden_layers;
    if (!model.second_encoder_only) layers = std::min(layers, model.text_config.num_hidden_layers);
    DP_CHECK(p.clip_skip < layers, "clip_skip: ", model.sd3 ? "SD3" : "SDXL",
             " reads hidden_states[-(clip_skip + 2)]; must be in [0, ", layers,
             "), got ", p.clip_skip);
  }
  DP_CHECK(!model.deepfloyd_if || p.clip_skip == 0, "clip_skip: not supported for DeepFloyd IF folders (T5; ",
           model.dir, ")");
  DP_CHECK(p.original_width >= 0 && p.original_height >= 0 && p.crop_top >= 0 && p.crop_left >= 0,
           "original_width/original_height/crop_top/crop_left: must be at least 0");
  DP_CHECK(std::isfinite(p.ip_adapter_scale), "ip_adapter_scale: must be a finite number, got ", p.ip_adapter_scale);
  if (p.ip_adapter_image.empty()) {
    DP_CHECK(p.ip_adapter_scale == 1.0, "ip_adapter_scale: only a request with an ip_adapter_image uses it");
  } else {
    DP_CHECK(model.ip_adapter, "ip_adapter_image: ", model.dir, " runs without an IP-Adapter (start the run with ",
             "--ip-adapter FILE)");
    (void)read_field_image(p.ip_adapter_image, "ip_adapter_image");  // readable, here and now
  }
  const bool aesthetic = model.aesthetic || (model.refiner && model.refiner->aesthetic);
  for (const auto& [name, v] : {std::pair<const char*, double>{"aesthetic_score", p.aesthetic_score},
                                {"negative_aesthetic_score", p.negative_aesthetic_score}}) {
    DP_CHECK(std::isfinite(v), name, ": must be a finite number, got ", v);
    DP_CHECK(v < 0 || aesthetic, name, ": only an SDXL refiner folder (model_index.json's ",
             "requires_aesthetics_score) is conditioned on it; ", model.dir, " is not one",
             model.refiner ? detail::cat(", nor is the refiner ", model.refiner->dir) : std::string());
  }
  const GenerationParams dflt;  // which of the refiner's settings the request sets (the first, for messages)
  const char* refiner_set = p.denoising_end != dflt.denoising_end       ? "denoising_end"
                            : p.refiner_steps != dflt.refiner_steps       ? "refiner_steps"
                            : p.refiner_strength != dflt.refiner_strength ? "refiner_strength"
                                                                          : nullptr;
  if (model.refiner && p.skip_refiner) {  // the base alone: the refine stage passes its latents on
    DP_CHECK(!refiner_set, "refiner: a request that skips the refiner (\"refiner\": false) takes no denoising_end, ",
             "refiner_steps or refiner_strength");
  } else if (model.refiner) {  // the base hands its latents over part-way (denoising_end < 1) or when done
    const double d = p.denoising_end_or();
    DP_CHECK(std::isfinite(d) && d > 0 && d <= 1, "denoising_end: must be in (0, 1] (the share of the base's schedule ",
             "before the refiner takes over), got ", p.denoising_end);
    DP_CHECK(p.mask.empty(), "mask: a run with a refiner does not inpaint (the refiner would repaint the whole image)");
    if (d < 1) {
      r.end = handover_call(*r.sampler, model.scheduler.num_train_timesteps, d);
      DP_CHECK(r.end > r.begin, "denoising_end: ", d, " leaves the base no step (its first timestep that runs, ",
               r.sampler->timestep(r.begin), ", is already below the cutoff ",
               std::nearbyint(model.scheduler.num_train_timesteps * (1 - d)), "); raise denoising_end or steps");
    }
    (void)plan_refine(*model.refiner, p, r.width, r.height);
  } else {
    DP_CHECK(!p.skip_refiner, "refiner: only a run with an SDXL refiner (--refiner DIR) can skip it");
    DP_CHECK(!refiner_set, refiner_set ? refiner_set : "",
             ": only a run with an SDXL refiner uses it (start the run with --refiner DIR)");
  }
  if (model.stage2) check_sr_settings(*model.stage2, p.sr_steps, p.sr_guidance, p.sr_noise_level);
  if (model.stage3) check_x4_settings(*model.stage3, {p.x4_steps, p.x4_guidance, p.x4_noise_level});
  if (model.noise_levels > 0 || model.kandinsky)  // Stable unCLIP, Kandinsky 2.2: the prior's settings
    check_prior_params(p, model.prior_train_timesteps, model.noise_levels, model.dir);
  return r;
}

at::Tensor seeded_noise(uint64_t seed, uint64_t stream, at::IntArrayRef shape) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  philox_normal(seed, stream, t.data_ptr<float>(), t.numel());
  return t;
}

namespace {
// An image [3, H, W] in [-1, 1] through the VAE encoder, its posterior sampled with `sample_noise` or the seed's
// `stream` (diffusers: latent_dist.sample(generator) = mean + exp(0.5 logvar) * noise), times scaling_factor.
at::Tensor sampled_latents(const SdModel& model, const at::Tensor& image, uint64_t seed, uint64_t stream,
                           const at::Tensor& sample_noise) {
  DP_CHECK(model.vae && model.vae->has_encoder(), "image-to-image: ", model.dir, "'s VAE encoder is not loaded here");
  DP_CHECK(image.dim() == 3 && image.size(0) == 3, "image-to-image: the image must be [3, H, W], got ", image.sizes());
  const GaussianLatent g = model.vae->encode(image.unsqueeze(0).to(model.spec.device, model.vae_dtype));
  if (model.vae_config.vq) return g.mean[0].to(at::kCPU, at::kFloat);  // MoVQ (Kandinsky 2.2): the latents as they are
  const at::Tensor mean = g.mean[0].to(at::kCPU, at::kFloat), logvar = g.logvar[0].to(at::kCPU, at::kFloat);
  const at::Tensor z = sample_noise.defined() ? sample_noise.to(at::kCPU, at::kFloat).reshape(mean.sizes())
                                              : seeded_noise(seed, stream, mean.sizes());
  // (SD3's VAE: the latents shifted first, (sample - shift_factor) x scaling_factor; 0 elsewhere)
  return (mean + at::exp(0.5 * logvar) * z - model.vae_config.shift_factor) * model.vae_config.scaling_factor;
}
}  // namespace

at::Tensor img2img_latents(const SdModel& model, const GenerationParams& p, const at::Tensor& image,
                           const at::Tensor& sample_noise) {
  return sampled_latents(model, image, p.seed, kImg2ImgLatentStream, sample_noise);
}

void inpaint_conditioning(const SdModel& model, const GenerationParams& p, const at::Tensor& image,
                          const at::Tensor& mask, Embeddings& emb, const at::Tensor& sample_noise) {
  DP_CHECK(mask.dim() == 3 && mask.size(0) == 1 && mask.size(1) == image.size(1) && mask.size(2) == image.size(2),
           "inpainting: the mask must be [1, H, W] like the image ", image.sizes(), ", got ", mask.sizes());
  const int64_t f = model.latent_factor();
  emb.mask = at::upsample_nearest2d(mask.unsqueeze(0), {image.size(1) / f, image.size(2) / f})[0].contiguous();
  if (model.inpaint_unet)  // the image with the repainted region zeroed (grey in [-1, 1])
    emb.masked_image_latents = sampled_latents(model, image * mask.lt(0.5f), p.seed, kMaskedLatentStream, sample_noise);
}

DenoiseState make_denoise_state(const SdModel& model, const GenerationParams& p, Embeddings emb, uint64_t id,
                                const at::Tensor& initial_noise, const at::Tensor& image_noise) {
  const bool img2img = model.starts_from_image(p), inpaint = img2img && !p.mask.empty();
  DP_CHECK(!img2img || emb.image_latents.defined(), "denoise: request ", id, " starts from an image, but its latents ",
           "did not arrive (the encode stage makes them)");
  DP_CHECK(!inpaint || (emb.mask.defined() && (!model.inpaint_unet || emb.masked_image_latents.defined())),
           "denoise: request ", id, " inpaints, but its mask", model.inpaint_unet ? " and masked image" : "",
           " did not arrive (the encode stage makes them)");
  ResolvedParams r = resolve_params(model, p, emb.image_latents);
  DenoiseState s;
  s.id = id;
  // an LCM UNet takes the guidance scale as an input (w = guidance - 1, as diffusers' pipelines) instead of an
  // unconditional row
  const int64_t cond_dim = model.unet_config.time_cond_proj_dim;
  s.guidance = model.uses_cfg(p) ? model.cfg_scale(p) : 1.0;  // (LCM and FLUX.1 without true CFG: one row)
  s.guidance_rescale = p.guidance_rescale;
  if (cond_dim > 0) s.timestep_cond = guidance_scale_embedding(p.guidance - 1.0, cond_dim);
  // FLUX.1 [dev]: the guidance scale itself, embedded by the transformer
  if (model.flux && model.flux_config.guidance_embeds) s.timestep_cond = at::full({1}, p.guidance, at::kFloat);
  s.seed = p.seed;
  s.cond = emb.cond;
  s.uncond = emb.uncond;
  s.class_labels = emb.class_labels;
  s.uncond_class_labels = emb.uncond_class_labels;
  s.time_ids = emb.time_ids;
  s.uncond_time_ids = emb.uncond_time_ids;
  if (!p.ip_adapter_image.empty()) {
    DP_CHECK(emb.ip_embeds.defined(), "denoise: request ", id, " has an image prompt, but its embedding did not arrive ",
             "(the encode stage makes it)");
    const at::Tensor e = emb.ip_embeds.to(at::kCPU, at::kFloat);
    DP_CHECK(e.dim() == (model.ip_plus ? 3 : 1) && (!model.ip_plus || e.size(0) == 2), "denoise: request ", id,
             ": the image prompt's embedding is ", e.sizes(), model.ip_plus ? "; IP-Adapter Plus needs [2, tokens, width]"
             " (the zero image's hidden states, then the image's)" : "; the IP-Adapter needs [E]");
    s.ip_embeds = model.ip_plus ? e[1] : e;
    if (model.ip_plus) s.ip_uncond = e[0];
    s.ip_scale = p.ip_adapter_scale;
  }
  DP_CHECK(s.cond.defined(), "denoise: request ", id, " has no text embedding");
  if (model.unet_config.text_time()) {
    DP_CHECK(s.class_labels.defined() && s.time_ids.defined(), "denoise: request ", id,
             " has no pooled text embedding or size conditioning (an SDXL UNet needs both)");
  } else if (model.dit()) {
    DP_CHECK(s.class_labels.defined() && (!model.uses_cfg(p) || s.uncond_class_labels.defined()), "denoise: request ",
             id, " has no pooled text embedding (SD3's transformer needs one per row)");
  } else {
    const bool wants_class = model.unet_config.class_embed_type == "projection";
    DP_CHECK(wants_class == s.class_labels.defined(), "denoise: request ", id,
             wants_class ? " has no image embedding (this UNet is conditioned on one: a Stable unCLIP folder runs the "
                           "prior stage before denoise)"
                         : " carries an image embedding, but the UNet has no class embedding");
  }
  DP_CHECK(!model.uses_cfg(p) || s.uncond.defined(), "denoise: request ", id, " needs an unconditional embedding");
  s.sampler = std::move(r.sampler);  // the one resolve_params built and checked
  s.end = r.end;                     // a run with a refiner: where the base hands over
  if (model.upscaler)  // StableDiffusionUpscalePipeline: the image noised to noise_level by low_res_scheduler
    attach_noised_image(model, s, r.image, p.noise_level, kSrImageNoiseStream, image_noise);
  const int64_t C = model.unet_config.in_channels - (model.upscaler ? 3 : 0) -
                    (model.inpaint_unet ? model.unet_config.in_channels / 2 + 1 : 0),
                f = model.latent_factor();
  at::Tensor noise = initial_noise.defined() ? initial_noise.to(at::kCPU, at::kFloat)
                                             : seeded_noise(p.seed, 0, {C, r.height / f, r.width / f});
  DP_CHECK(noise.dim() == 3 && noise.size(0) == C, "denoise: initial noise must be [", C, ", h, w]");
  if (img2img) {  // the image's latents noised to the first timestep that runs (diffusers' add_noise)
    const at::Tensor image = emb.image_latents.to(at::kCPU, at::kFloat);
    DP_CHECK(noise.sizes() == image.sizes(), "denoise: initial noise ", noise.sizes(),
             " does not match the image's latents ", image.sizes());
    s.begin = s.step = r.begin;
    // inpainting at strength 1 starts from pure noise (diffusers' is_strength_max); image-to-image never does
    s.latents = (inpaint && model.strength(p) == 1.0 ? noise * s.sampler->init_noise_sigma()
                                                          : s.sampler->add_noise(image, noise, r.begin))
                    .to(model.spec.device);
    if (inpaint && model.inpaint_unet) {  // [mask, masked image latents] after the latents at every call
      s.concat = at::cat({emb.mask.to(at::kFloat), emb.masked_image_latents.to(at::kFloat)}, 0).to(model.spec.device);
    } else if (inpaint) {
      s.blend_mask = emb.mask.to(model.spec.device, at::kFloat);
      s.blend_image = image.to(model.spec.device);
      s.blend_noise = noise.to(model.spec.device);
    }
  } else {
    s.latents = (noise * s.sampler->init_noise_sigma()).to(model.spec.device);
  }
  s.adapter_scales = r.adapter_scales;
  s.skip_layers.assign(p.skip_guidance_layers.begin(), p.skip_guidance_layers.end());
  s.skip_scale = p.skip_layer_guidance_scale;
  s.skip_start = p.skip_layer_guidance_start;
  s.skip_stop = p.skip_layer_guidance_stop;
  s.guess_mode = p.guess_mode;
  for (size_t k = 0; k < r.controls.size(); ++k) {
    DenoiseState::Control c;
    if (r.controls[k].defined()) {
      c.image = r.controls[k].to(model.spec.device);
      c.scale = p.controls[k].scale;
      c.start = p.controls[k].start;
      c.end = p.controls[k].end;
    }
    s.controls.push_back(c);
  }
  DP_CHECK(p.previews >= 0 && p.previews <= 3, "previews: must be in [0, 3], got ", p.previews);
  for (int k = 1; k <= p.previews; ++k)  // evenly spaced, never after the last call (that is the image itself)
    s.preview_at.push_back(s.begin + std::max(0, s.total_steps() * k / (p.previews + 1) - 1));
  return s;
}

int handover_call(const Sampler& s, int64_t num_train_timesteps, double denoising_end) {
  // diffusers: discrete_timestep_cutoff = int(round(T - denoising_end x T)) (round half to even, as nearbyint)
  const double cutoff = std::nearbyint(static_cast<double>(num_train_timesteps) * (1.0 - denoising_end));
  int i = 0;
  while (i < s.num_calls() && s.timestep(i) >= cutoff) ++i;  // the timesteps fall: those >= the cutoff come first
  return i;
}

GenerationParams refiner_request(const GenerationParams& p, int width, int height) {
  GenerationParams q = p;
  const GenerationParams d;
  q.steps = p.refiner_steps_or();
  q.width = width;
  q.height = height;
  q.image_prompt.clear();  // it starts from the base's latents, not from a picture
  q.mask.clear();
  q.strength = d.strength;
  q.controls.clear();  // the base's ControlNets, adapters and image prompts stay with the base
  q.guess_mode = false;
  q.lora.clear();
  q.ip_adapter_image.clear();
  q.ip_adapter_scale = d.ip_adapter_scale;
  q.previews = 0;  // previews are the base's
  q.denoising_end = d.denoising_end;
  q.refiner_steps = d.refiner_steps;
  q.refiner_strength = d.refiner_strength;
  return q;
}

namespace {
// Where the refiner's loop on `s` (its schedule for the request's refiner_steps) starts, and whether the latents are
// noised there; checks the settings that decide it (errors name the field).
RefinePlan refine_start(const SdModel& refiner, const GenerationParams& p, const Sampler& s) {
  RefinePlan plan;
  const int n = s.num_calls(), steps = p.refiner_steps_or();
  const double d = p.denoising_end_or();
  if (d < 1) {  // diffusers' get_timesteps with denoising_start: the calls whose timestep is below the cutoff
    DP_CHECK(p.refiner_strength < 0, "refiner_strength: only with denoising_end 1 (the refiner then refines the base's ",
             "finished latents); with denoising_end ", d, " it continues the base's schedule");
    plan.begin = handover_call(s, refiner.scheduler.num_train_timesteps, d);
    // a second-order sampler starts on a first-order call: diffusers adds one call when the count is even
    if (s.order() == 2 && (n - plan.begin) % 2 == 0 && plan.begin > 0) --plan.begin;
    DP_CHECK(plan.begin < n, "denoising_end: ", d, " leaves the refiner no step of its ", steps, " (its last timestep ",
             s.timestep(n - 1), " is not below the cutoff); lower denoising_end or raise refiner_steps");
  } else {  // image-to-image on the finished latents
    const double strength = p.refiner_strength_or();
    DP_CHECK(std::isfinite(strength) && strength > 0 && strength <= 1, "refiner_strength: must be in (0, 1], got ",
             p.refiner_strength);
    const int init = std::min(static_cast<int>(steps * strength), steps);
    DP_CHECK(init >= 1, "refiner_strength: ", strength, " x ", steps, " refiner steps leaves no step (int(steps x ",
             "strength) must be at least 1); raise refiner_strength or refiner_steps");
    plan.begin = (steps - init) * s.order();
    plan.add_noise = true;
  }
  return plan;
}
}  // namespace

RefinePlan plan_refine(const SdModel& refiner, const GenerationParams& p, int width, int height) {
  DP_CHECK(p.refiner_steps >= 0, "refiner_steps: must be at least 0 (0: steps), got ", p.refiner_steps);
  ResolvedParams r;
  try {
    r = resolve_params(refiner, refiner_request(p, width, height));
  } catch (const Error& e) {  // the field first (as every request error), then which model refused it
    const std::string m = e.what();
    DP_FAIL(p.refiner_steps > 0 && m.rfind("steps:", 0) == 0 ? "refiner_" + m : m, " (the refiner, ", refiner.dir, ")");
  }
  RefinePlan plan = refine_start(refiner, p, *r.sampler);
  plan.sampler = std::move(r.sampler);
  return plan;
}

DenoiseState make_refine_state(const SdModel& refiner, const GenerationParams& p, const at::Tensor& latents,
                               Embeddings emb, uint64_t id, const at::Tensor& noise) {
  DP_CHECK(latents.dim() == 3, "refine: request ", id, ": the base's latents must be [C, h, w], got ", latents.sizes());
  const int64_t f = refiner.latent_factor();
  const int w = static_cast<int>(latents.size(2) * f), h = static_cast<int>(latents.size(1) * f);
  // the refiner's request resolved once (its sampler is the state's), then where its loop starts on that sampler
  DenoiseState s = make_denoise_state(refiner, refiner_request(p, w, h), std::move(emb), id);
  const RefinePlan plan = refine_start(refiner, p, *s.sampler);
  s.begin = s.step = plan.begin;
  const at::Tensor x = latents.to(at::kCPU, at::kFloat);
  if (plan.add_noise) {
    const at::Tensor z = noise.defined() ? noise.to(at::kCPU, at::kFloat).reshape(x.sizes())
                                         : seeded_noise(p.seed, kRefinerNoiseStream, x.sizes());
    s.latents = s.sampler->add_noise(x, z, plan.begin).to(refiner.spec.device);
  } else {
    s.latents = x.to(refiner.spec.device);
  }
  return s;
}

namespace {
// A cascade stage's state (IF stage II, stage III): its id, seed, guidance and the text embeddings it conditions on.
DenoiseState cascade_state(uint64_t id, uint64_t seed, double guidance, const Embeddings& emb, const char* what) {
  DenoiseState s;
  s.id = id;
  s.seed = seed;
  s.guidance = guidance;
  s.cond = emb.cond;
  s.uncond = emb.uncond;
  DP_CHECK(s.cond.defined() && (guidance <= 1 || s.uncond.defined()), what, ": text embeddings needed");
  return s;
}

// Initial latents of `shape` [C, H, W]: `initial_noise`, or the seed's `stream`, times the sampler's initial sigma.
void init_latents(const SdModel& m, DenoiseState& s, const std::vector<int64_t>& shape, uint64_t stream,
                  const at::Tensor& initial_noise, const char* what) {
  const at::Tensor noise = initial_noise.defined() ? initial_noise.to(at::kCPU, at::kFloat)
                                                   : seeded_noise(s.seed, stream, shape);
  DP_CHECK(noise.sizes().vec() == shape, what, ": initial noise must be ", shape_str(shape), ", got ",
           shape_str(noise.sizes()));
  s.latents = (noise * s.sampler->init_noise_sigma()).to(m.spec.device);
}
}  // namespace

DenoiseState make_if_sr_state(const SdModel& m, const IfSuperResSettings& st, const at::Tensor& image,
                              const Embeddings& emb, uint64_t seed, uint64_t id, const at::Tensor& initial_noise,
                              const at::Tensor& image_noise) {
  DP_CHECK(m.unet && m.unet_config.class_embed_type == "timestep", "super-resolution: not a DeepFloyd IF stage-II model");
  DP_CHECK(image.dim() == 3 && image.size(0) * 2 == m.unet_config.in_channels, "super-resolution: the stage-I image ",
           "must be [", m.unet_config.in_channels / 2, ", h, w], got ", image.sizes());
  check_sr_settings(m, st.steps, st.guidance, st.noise_level);
  const int64_t C = image.size(0);
  const int64_t H = st.height > 0 ? st.height : m.unet_config.sample_size;
  const int64_t W = st.width > 0 ? st.width : m.unet_config.sample_size;
  DenoiseState s = cascade_state(id, seed, st.guidance, emb, "super-resolution");
  const at::Tensor up = at::upsample_bilinear2d(image.to(at::kCPU, at::kFloat).unsqueeze(0), {H, W}, /*align_corners=*/true);
  attach_noised_image(m, s, up.squeeze(0), st.noise_level, kSrImageNoiseStream, image_noise);
  s.sampler = Sampler::create(SamplerKind::DDPM, m.scheduler, st.steps);
  init_latents(m, s, {C, H, W}, kSrInitialStream, initial_noise, "super-resolution");
  return s;
}

at::Tensor image_to_unit_range(const at::Tensor& rgb_u8) {
  DP_CHECK(rgb_u8.dim() == 3 && rgb_u8.size(2) == 3, "image: must be [H, W, 3], got ", rgb_u8.sizes());
  return rgb_u8.to(at::kCPU).permute({2, 0, 1}).to(at::kFloat).div(255.0f).mul(2.0f).sub(1.0f).contiguous();
}

void check_x4_settings(const SdModel& x4, const UpscaleSettings& s) {
  DP_CHECK(x4.upscaler, x4.dir, ": not an x4 upscaler folder");
  DP_CHECK(s.steps >= 1 && s.steps <= x4.scheduler.num_train_timesteps, "x4_steps: must be in [1, ",
           x4.scheduler.num_train_timesteps, "], got ", s.steps);
  DP_CHECK(std::isfinite(s.guidance) && s.guidance >= 0, "x4_guidance: must be a finite number >= 0, got ", s.guidance);
  DP_CHECK(s.noise_level >= 0 && s.noise_level <= x4.max_noise_level, "x4_noise_level: must be in [0, ",
           x4.max_noise_level, "] (the upscaler's max_noise_level), got ", s.noise_level);
}

DenoiseState make_x4_state(const SdModel& m, const UpscaleSettings& st, const at::Tensor& image, const Embeddings& emb,
                           uint64_t seed, uint64_t id, const at::Tensor& initial_noise, const at::Tensor& image_noise) {
  check_x4_settings(m, st);
  DP_CHECK(image.dim() == 3 && image.size(0) == 3, "x4 upscaler: the image must be [3, h, w], got ", image.sizes());
  const int64_t down = m.size_multiple() / m.latent_factor();  // the UNet's downsampling
  DP_CHECK(image.size(1) % down == 0 && image.size(2) % down == 0, "x4 upscaler: the image's sides (",
           image.size(2), "x", image.size(1), ") must be multiples of ", down, " (the upscaler UNet's downsampling)");
  DenoiseState s = cascade_state(id, seed, st.guidance, emb, "x4 upscaler");
  attach_noised_image(m, s, image.to(at::kCPU, at::kFloat), st.noise_level, kX4ImageNoiseStream, image_noise);
  s.sampler = Sampler::create(sampler_kind_of_class(m.scheduler.class_name, m.scheduler.algorithm_type), m.scheduler,
                              st.steps);
  init_latents(m, s, {m.unet_config.in_channels - 3, image.size(1), image.size(2)}, kX4InitialStream, initial_noise,
               "x4 upscaler");
  return s;
}

at::Tensor predicted_original(const SdModel& model, const Sampler& sampler, const at::Tensor& output, int i,
                              const at::Tensor& sample) {
  const std::string& pred = model.scheduler.prediction_type;
  if (pred == "sample") return output;
  if (!sampler.sigmas().empty()) {  // k-diffusion parametrisation: sample = x0 + sigma * noise
    const double sigma = sampler.sigmas().at(i);
    if (pred == "v_prediction") return output * (-sigma / std::sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1);
    return sample - sigma * output;
  }
  static thread_local std::map<const SdModel*, at::Tensor> cache;  // alphas_cumprod per model
  at::Tensor& ac = cache[&model];
  if (!ac.defined()) ac = alphas_cumprod(model.scheduler);
  const int64_t t = std::clamp<int64_t>(std::llround(sampler.timestep(i)), 0, ac.size(0) - 1);
  const double a = ac[t].item<double>();
  if (pred == "v_prediction") return std::sqrt(a) * sample - std::sqrt(1 - a) * output;
  return (sample - std::sqrt(1 - a) * output) / std::sqrt(a);
}

void DenoiseStage::step(const std::vector<DenoiseState*>& batch, bool throw_on_failure) const {
  DP_CHECK(model_.unet || model_.transformer || model_.flux_transformer, "denoise stage: UNet not loaded");
  if (batch.empty()) return;
  std::optional<profile::Scope> prof(std::in_place, profile::Section::Sampler);  // inputs of the UNet call
  std::vector<at::Tensor> xs, ctx, cls, tids, tconds;
  std::vector<double> ts;
  std::vector<int64_t> cond_row;  // each request's conditional row of the call
  // ControlNets: for each one some request of the batch uses, each row's conditioning image and scale (rows without
  // one: zeros at scale 0, adding nothing)
  std::vector<size_t> nets;
  for (size_t k = 0; k < model_.controlnets.size(); ++k)
    if (std::any_of(batch.begin(), batch.end(), [k](const DenoiseState* s) { return s->has_control(k); }))
      nets.push_back(k);
  std::vector<std::vector<at::Tensor>> conds(nets.size());
  // each row's scale per residual (K skips + the mid block): uniform, or guess mode's ramp (its unconditional row 0)
  std::vector<std::vector<std::vector<float>>> cscales(nets.size());
  // guess mode's ramp per ControlNet: torch.logspace(-1, 0, K + 1) in float32, as diffusers (x the row's scale below)
  std::vector<std::vector<float>> ramps;
  for (size_t k : nets) {
    const at::Tensor r = at::logspace(-1, 0, model_.controlnets[k]->num_skips() + 1, 10.0, at::kFloat).contiguous();
    ramps.emplace_back(r.data_ptr<float>(), r.data_ptr<float>() + r.numel());
  }
  std::vector<const std::vector<float>*> lora_rows;  // per-request LoRA: each UNet row's adapter scales
  std::vector<at::Tensor> ip_rows;  // IP-Adapter: each UNet row's image embedding (the unconditional row: zeros)
  std::vector<float> ip_scales;
  const auto ip_state =
      std::find_if(batch.begin(), batch.end(), [](const DenoiseState* s) { return s->ip_embeds.defined(); });
  const at::Tensor ip_zero = ip_state == batch.end() ? at::Tensor() : at::zeros_like((*ip_state)->ip_embeds);
  for (DenoiseState* s : batch) {
    for (int r = 0; r < (s->guidance > 1.0 ? 2 : 1); ++r) {
      lora_rows.push_back(&s->adapter_scales);
      if (ip_zero.defined()) {  // diffusers: zeros for the unconditional row (IP-Adapter Plus: the zero image's hidden
                                // states), the same scale on both
        const bool cond_row = r == 1 || s->guidance <= 1.0;
        const at::Tensor& uncond = s->ip_uncond.defined() ? s->ip_uncond : ip_zero;
        ip_rows.push_back(!s->ip_embeds.defined() ? ip_zero : cond_row ? s->ip_embeds : uncond);
        ip_scales.push_back(s->ip_embeds.defined() ? static_cast<float>(s->ip_scale) : 0.0f);
      }
    }
    DP_CHECK(!s->done(), "denoise: request ", s->id, " already finished");
    at::Tensor in = s->sampler->scale_model_input(s->latents, s->step);
    if (s->concat.defined()) in = at::cat({in, s->concat}, 0);
    const double t = s->sampler->timestep(s->step);
    for (size_t j = 0; j < nets.size(); ++j)
      for (int r = 0; r < (s->guidance > 1.0 ? 2 : 1); ++r) {  // both guidance rows see the image
        const size_t k = nets[j];
        const bool pooling = model_.controlnets[k]->config().global_pool;
        const int64_t f = model_.latent_factor();
        conds[j].push_back(s->has_control(k) ? s->controls[k].image
                                             : at::zeros({3, in.size(1) * f, in.size(2) * f}, in.options()));
        // guess mode (asked, or a pooling ControlNet's): nothing for the unconditional row; the ramp unless pooling
        const bool guess = s->guess_mode || pooling;
        const float scale = guess && s->guidance > 1.0 && r == 0 ? 0.0f : static_cast<float>(s->control_scale_now(k));
        std::vector<float> per(ramps[j].size(), scale);
        if (guess && !pooling)
          for (size_t b = 0; b < per.size(); ++b) per[b] = ramps[j][b] * scale;
        cscales[j].push_back(per);
      }
    if (s->guidance > 1.0) {
      xs.push_back(in);
      ctx.push_back(s->uncond);
      ts.push_back(t);
      if (s->class_labels.defined())
        cls.push_back(s->uncond_class_labels.defined() ? s->uncond_class_labels : at::zeros_like(s->class_labels));
      if (s->time_ids.defined()) tids.push_back(s->uncond_time_ids.defined() ? s->uncond_time_ids : s->time_ids);
    }
    cond_row.push_back(static_cast<int64_t>(xs.size()));
    xs.push_back(in);
    ctx.push_back(s->cond);
    ts.push_back(t);
    if (s->class_labels.defined()) cls.push_back(s->class_labels);
    if (s->time_ids.defined()) tids.push_back(s->time_ids);
    for (int r = 0; r < (s->guidance > 1.0 ? 2 : 1); ++r)  // both rows of a guided request (FLUX.1's true CFG)
      if (s->timestep_cond.defined()) tconds.push_back(s->timestep_cond);
  }
  const auto dt = model_.spec.dtype;
  at::Tensor x = at::stack(xs).to(dt);
  at::Tensor c = at::stack(ctx).to(dt);
  at::Tensor t = at::tensor(ts, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);  // stays on the CPU
  prof.reset();
  prof.emplace(profile::Section::UNet);
  // levels (IF stage II, the x4 upscaler) stay float32: 16-bit floats round integers above 256 (bfloat16) or 2048
  const UNetConfig& uc = model_.unet_config;
  const bool levels = uc.class_embed_type == "timestep" || uc.num_class_embeds > 0;
  const at::Tensor labels = cls.empty() ? at::Tensor() : at::stack(cls).to(model_.spec.device, levels ? at::kFloat : dt);
  const at::Tensor time_ids = tids.empty() ? at::Tensor() : at::stack(tids);  // stays on the CPU
  DP_CHECK(tconds.empty() || tconds.size() == xs.size(), "denoise: every request or none needs a guidance embedding");
  const at::Tensor timestep_cond = tconds.empty() ? at::Tensor() : at::stack(tconds);
  UNetResiduals residuals;
  // diffusers' StableDiffusionControlNetPipeline: each ControlNet sees the UNet's input rows; several add up in
  // order (MultiControlNetModel). A ControlNet runs only on the rows it acts on (a scale other than 0): not on the
  // unconditional row in guess mode (as diffusers), nor on requests without its image or outside their
  // control_start/end; the other rows get zero residuals.
  for (size_t j = 0; j < nets.size(); ++j) {
    const ControlNetModel& net = *model_.controlnets[nets[j]];
    const auto rows = static_cast<int64_t>(cscales[j].size());
    std::vector<int64_t> used;
    std::vector<float> flat;
    for (int64_t r = 0; r < rows; ++r) {
      const auto& sc = cscales[j][static_cast<size_t>(r)];
      if (std::none_of(sc.begin(), sc.end(), [](float v) { return v != 0.0f; })) continue;
      used.push_back(r);
      flat.insert(flat.end(), sc.begin(), sc.end());
    }
    if (used.empty()) continue;
    const bool all = static_cast<int64_t>(used.size()) == rows;
    const at::Tensor idx = at::tensor(used, at::TensorOptions().dtype(at::kLong));
    auto pick = [&](const at::Tensor& v) { return all || !v.defined() ? v : v.index_select(0, idx.to(v.device())); };
    // the latents alone: an inpainting UNet's mask and masked-image channels are its own (ControlNetInpaintPipeline)
    const int64_t in = net.config().unet.in_channels;
    UNetResiduals rk = net.forward(
        pick(x.size(1) == in ? x : x.slice(1, 0, in)), pick(t), pick(c),
        pick(at::stack(conds[j])).to(model_.spec.device, dt),
        at::tensor(flat, at::TensorOptions().dtype(at::kFloat)).view({static_cast<int64_t>(used.size()), -1}),
        pick(labels), pick(time_ids));
    auto spread = [&](const at::Tensor& v) {  // back to every row, zeros where the ControlNet did not run
      if (all) return v;
      std::vector<int64_t> shape = v.sizes().vec();
      shape[0] = rows;
      return at::zeros(shape, v.options()).index_copy_(0, idx.to(v.device()), v);
    };
    if (!residuals.mid.defined()) {
      for (const at::Tensor& d : rk.down) residuals.down.push_back(spread(d));
      residuals.mid = spread(rk.mid);
      continue;
    }
    for (size_t d = 0; d < residuals.down.size(); ++d) residuals.down[d] = residuals.down[d] + spread(rk.down[d]);
    residuals.mid = residuals.mid + spread(rk.mid);
  }
  const bool control = residuals.mid.defined();
  auto lora = adapter_rows(lora_rows, model_.spec.device);
  if (ip_zero.defined()) {
    if (!lora) lora.emplace();
    lora->ip_embeds = at::stack(ip_rows).to(model_.spec.device);
    lora->ip_scales = at::tensor(ip_scales, at::TensorOptions().dtype(at::kFloat)).to(model_.spec.device);
  }
  nn::AdapterScope lora_scope(lora ? &*lora : nullptr);
  at::Tensor e;  // [rows, C, h, w]
  if (model_.flux_transformer)  // the pipelines pass t / 1000; the guidance scale per row (guidance_embeds)
    e = model_.flux_transformer->forward(x, t / 1000, c, labels,
                                         timestep_cond.defined() ? timestep_cond.flatten() : timestep_cond);
  else if (model_.transformer)
    e = model_.transformer->forward(x, t, c, labels);
  else
    e = model_.unet->forward(x, t, c, labels, time_ids, control ? &residuals : nullptr, timestep_cond);
  e = e.to(at::kFloat);
  // SD3's skip-layer guidance: the requests' conditional rows of this call again, without the chosen blocks (one
  // transformer call per distinct list of blocks)
  std::vector<at::Tensor> skipped(batch.size());
  std::map<std::vector<int64_t>, std::vector<size_t>> skip_groups;
  for (size_t k = 0; k < batch.size(); ++k)
    if (batch[k]->skip_now()) skip_groups[batch[k]->skip_layers].push_back(k);
  DP_CHECK(skip_groups.empty() || model_.transformer, "denoise: skip-layer guidance needs an SD3 transformer");
  for (const auto& [layers, idx] : skip_groups) {
    std::vector<int64_t> pick;
    std::vector<const std::vector<float>*> rows;
    for (size_t k : idx) {
      pick.push_back(cond_row[k]);
      rows.push_back(&batch[k]->adapter_scales);
    }
    const at::Tensor sel = at::tensor(pick, at::TensorOptions().dtype(at::kLong));
    auto adapters = adapter_rows(rows, model_.spec.device);
    nn::AdapterScope scope(adapters ? &*adapters : nullptr);
    const at::Tensor out = model_.transformer
                               ->forward(x.index_select(0, sel.to(x.device())), t.index_select(0, sel),
                                         c.index_select(0, sel.to(c.device())),
                                         labels.index_select(0, sel.to(labels.device())), layers)
                               .to(at::kFloat);
    for (size_t j = 0; j < idx.size(); ++j) skipped[idx[j]] = out[static_cast<int64_t>(j)];
  }
  prof.reset();
  prof.emplace(profile::Section::Sampler);  // guidance and each request's sampler step
  int64_t row = 0;
  for (size_t k = 0; k < batch.size(); ++k) {
    DenoiseState* s = batch[k];
    at::Tensor eps;
    // a UNet that also predicts the variance (DeepFloyd IF: 2C channels): guidance mixes the prediction only, the
    // variance comes from the conditional row (IFPipeline); a sampler without a learned variance drops it
    const int64_t C = s->latents.size(0);
    const bool extra = e.size(1) == 2 * C;
    if (s->guidance > 1.0) {
      at::Tensor eu = e[row], ec = e[row + 1];
      if (extra) {
        const at::Tensor pu = eu.slice(0, 0, C), pc = ec.slice(0, 0, C);
        eps = at::cat({pu + s->guidance * (pc - pu), ec.slice(0, C)}, 0);
      } else {
        eps = eu + s->guidance * (ec - eu);
        if (skipped[k].defined()) eps = eps + (ec - skipped[k]) * s->skip_scale;  // StableDiffusion3Pipeline's order
        if (s->guidance_rescale > 0) {  // diffusers' rescale_noise_cfg: per request, unbiased std over all its values
          const at::Tensor rescaled = eps * (ec.std() / eps.std());
          eps = s->guidance_rescale * rescaled + (1.0 - s->guidance_rescale) * eps;
        }
      }
      row += 2;
    } else {
      eps = e[row];
      row += 1;
    }
    if (extra && !s->sampler->learned_variance()) eps = eps.slice(0, 0, C);
    const at::Tensor prediction = extra ? eps.slice(0, 0, C) : eps;  // what previews read
    s->preview = at::Tensor();
    for (size_t k = 0; k < s->preview_at.size(); ++k)
      if (s->preview_at[k] == s->step) {
        s->preview = predicted_original(model_, *s->sampler, prediction, s->step, s->latents).contiguous();
        s->preview_index = static_cast<int>(k) + 1;
      }
    const uint64_t seed = s->seed;
    StepNoise noise = s->step_noise ? s->step_noise : [seed](int step, const at::Tensor& like) {
      return seeded_noise(seed, 1 + static_cast<uint64_t>(step), like.sizes()).to(like.device());
    };
    // Samplers work on [1, C, h, w] as diffusers does.
    s->latents = s->sampler->step(eps.unsqueeze(0), s->step, s->latents.unsqueeze(0), noise).squeeze(0);
    if (s->blend_mask.defined()) {  // inpainting with a plain UNet: the kept region is the image at the next level
      const at::Tensor kept = s->step + 1 < s->sampler->num_calls()
                                  ? s->sampler->add_noise(s->blend_image, s->blend_noise, s->step + 1)
                                  : s->blend_image;
      s->latents = (1 - s->blend_mask) * kept + s->blend_mask * s->latents;
    }
    if (!s->first_bad.defined()) s->first_bad = at::full({}, -1, s->latents.options().dtype(at::kLong));
    const at::Tensor bad = at::isfinite(s->latents).all().logical_not().logical_and(s->first_bad < 0);
    s->first_bad = at::where(bad, at::full({}, static_cast<int64_t>(s->step), s->first_bad.options()), s->first_bad);
    ++s->step;
    if (s->done()) {
      const int64_t k = s->first_bad.item<int64_t>();
      if (k >= 0)
        s->failure = detail::cat("request ", s->id, ": non-finite values (NaN or Inf) in the latents after step ", k + 1 - s->begin,
                                 " of ", s->total_steps(),
                                 " (the model's weights or settings make the UNet or sampler diverge)");
    }
  }
  if (throw_on_failure)
    for (DenoiseState* s : batch) DP_CHECK(s->failure.empty(), s->failure);
}

at::Tensor DecodeStage::run_uint8(const std::vector<at::Tensor>& latents, std::vector<std::string>* failures) const {
  DP_CHECK(model_.vae || model_.deepfloyd_if, "decode stage: VAE not loaded");
  DP_CHECK(!latents.empty(), "decode stage: empty batch");
  profile::Scope prof(profile::Section::Vae);
  at::Tensor z = at::stack(latents).to(model_.spec.device, model_.vae_dtype);
  // pixel-space models (DeepFloyd IF) denoise the image itself, in [-1, 1]
  at::Tensor img = model_.deepfloyd_if ? z : model_.vae->decode_scaled(z);
  const at::Tensor finite = at::isfinite(img).flatten(1).all(1).cpu();  // one flag per image
  if (failures) failures->assign(static_cast<size_t>(finite.size(0)), std::string());
  for (int64_t i = 0; i < finite.size(0); ++i) {
    if (finite[i].item<bool>()) continue;
    const std::string why = detail::cat("decode: non-finite values (NaN or Inf) in decoded image ", i, " of the batch",
                                        " (the VAE's weights or scaling_factor)");
    DP_CHECK(failures, why);
    (*failures)[static_cast<size_t>(i)] = why;
  }
  return to_uint8_hwc(img);
}

at::Tensor UpscaleStage::run_uint8(const at::Tensor& images) const {
  DP_CHECK(model_.super_res, "upscale stage: super-resolution not loaded (the model has no super_resolution/)");
  DP_CHECK(images.dim() == 4 && images.size(3) == 3 && images.scalar_type() == at::kByte,
           "upscale stage: images must be uint8 [B, H, W, 3], got ", images.sizes());
  profile::Scope prof(profile::Section::Upscale);
  at::Tensor x = images.to(model_.spec.device).permute({0, 3, 1, 2}).to(model_.vae_dtype) / 127.5 - 1.0;
  return to_uint8_hwc(model_.super_res->forward(x));
}

at::Tensor decode_final_uint8(const SdModel& model, const std::vector<at::Tensor>& latents) {
  at::Tensor img = DecodeStage(model).run_uint8(latents);
  return model.super_res ? UpscaleStage(model).run_uint8(img) : img;
}

std::vector<Image> decode_final(const SdModel& model, const std::vector<at::Tensor>& latents) {
  at::Tensor u8 = decode_final_uint8(model, latents).cpu();
  std::vector<Image> out;
  for (int64_t b = 0; b < u8.size(0); ++b) out.push_back(image_from_uint8_hwc(u8[b]));
  return out;
}

}  // namespace diffpipe
