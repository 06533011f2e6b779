#include "diffpipe/stages/model_stages.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <mutex>

#include "diffpipe/runtime/error.h"
#include "diffpipe/scheduler/step_batcher.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/unclip.h"

namespace diffpipe {
namespace {

// prompts -> [cond embedding, (uncond embedding)] per request, one text-encoder call per batch
class EncodeStage : public OneShotStage {
 public:
  EncodeStage(const SdModel& m, const StageConfig& c) : OneShotStage(c), model_(m), enc_(m) {}

 protected:
  std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) override {
    // image-to-image: the input image's latents (its size is the image's: SDXL's size conditioning needs it);
    // inpainting: the mask at the latents' size (and the masked image's latents for an inpainting UNet)
    std::vector<Embeddings> images(batch.size());
    std::vector<GenerationParams> sized(batch.size());
    std::vector<const GenerationParams*> ps;
    for (size_t i = 0; i < batch.size(); ++i) {
      ps.push_back(&batch[i]->params);
      if (!batch[i]->params.ip_adapter_image.empty())  // IP-Adapter: the image prompt's embedding
        images[i].ip_embeds = ip_image_embeds(model_, batch[i]->params);
      if (!model_.starts_from_image(batch[i]->params)) continue;
      const ResolvedParams r = resolve_params(model_, batch[i]->params);  // reads and checks the image (and mask)
      images[i].image_latents = img2img_latents(model_, batch[i]->params, r.image);
      if (r.mask.defined()) inpaint_conditioning(model_, batch[i]->params, r.image, r.mask, images[i]);
      sized[i] = batch[i]->params;
      sized[i].width = r.width;
      sized[i].height = r.height;
      ps.back() = &sized[i];
    }
    if (model_.kandinsky) return prior_text(batch, images);
    auto embs = enc_.run(ps);
    std::vector<StageEvent> out;
    for (size_t i = 0; i < batch.size(); ++i) {
      const Embeddings& e = embs[i];
      std::vector<at::Tensor> t;
      // SDXL: [time_ids, pooled, cond, (uncond pooled, uncond, (the refiner: uncond time_ids))]; SD3: [pooled, cond,
      // (uncond pooled, uncond)]
      if (e.time_ids.defined())
        t = {e.time_ids.contiguous(), e.class_labels.contiguous(), e.cond.contiguous()};
      else if (model_.dit())
        t = {e.class_labels.contiguous(), e.cond.contiguous()};
      else
        t = {e.cond.contiguous()};
      if (e.uncond.defined()) {
        if (e.time_ids.defined() || model_.dit()) t.push_back(e.uncond_class_labels.contiguous());
        t.push_back(e.uncond.contiguous());
        if (e.uncond_time_ids.defined()) t.push_back(e.uncond_time_ids.contiguous());
      }
      // image-to-image: last, in this order
      for (const at::Tensor& x : {images[i].image_latents, images[i].mask, images[i].masked_image_latents})
        if (x.defined()) t.push_back(x.contiguous());
      if (images[i].ip_embeds.defined()) t.push_back(images[i].ip_embeds.contiguous());  // the very last
      out.push_back(StageEvent::finished(batch[i]->id, std::move(t)));
    }
    return out;
  }

 private:
  // Kandinsky 2.2: the prior's text encoder, one call: per request [text_embeds, last_hidden_state, mask (float32)],
  // then the same of its unconditional text (the negative prompt) where the prior needs it; image-to-image: the
  // starting image's MoVQ latents (`images`, made as for the other folders) last, which the prior stage passes on
  std::vector<StageEvent> prior_text(const std::vector<const StageRequest*>& batch,
                                     const std::vector<Embeddings>& images) const {
    DP_CHECK(model_.unclip, "encode: ", model_.dir, "'s prior text encoder was not loaded");
    const PriorRunner runner(*model_.unclip, model_.spec);
    std::vector<PriorState> states(batch.size());
    std::vector<PriorState*> ptrs;
    for (size_t i = 0; i < batch.size(); ++i) {
      states[i].id = batch[i]->id;
      states[i].prompt = batch[i]->params.prompt;
      states[i].negative_prompt = batch[i]->params.negative_prompt;
      states[i].guidance = batch[i]->params.prior_guidance;
      ptrs.push_back(&states[i]);
    }
    runner.encode(ptrs);
    std::vector<StageEvent> out;
    for (size_t i = 0; i < batch.size(); ++i) {
      const PriorState& s = states[i];
      std::vector<at::Tensor> t{s.embeds.contiguous(), s.hidden.contiguous(), s.mask.to(at::kFloat).contiguous()};
      if (s.needs_uncond())
        t.insert(t.end(), {s.u_embeds.contiguous(), s.u_hidden.contiguous(), s.u_mask.to(at::kFloat).contiguous()});
      if (images[i].image_latents.defined()) t.push_back(images[i].image_latents.contiguous());
      out.push_back(StageEvent::finished(s.id, std::move(t)));
    }
    return out;
  }

  const SdModel& model_;
  TextEncodeStage enc_;
};

// A multi-step stage's bookkeeping: its requests' states by id, the step batcher that picks each iteration's
// requests, and the iteration in progress.
template <class State>
class SteppedStage : public Stage {
 public:
  explicit SteppedStage(const StageConfig& c) : batcher_(sched::parse_batch_mode(c.batching), c.max_batch) {}
  void cancel(uint64_t id) override {
    if (held_.erase(id)) batcher_.cancel(id);
  }
  size_t held() const override { return held_.size(); }
  std::vector<uint64_t> current_batch() const override { return current_; }

 protected:
  void hold(uint64_t id, State s, int priority, double now) {
    held_.emplace(id, std::move(s));
    batcher_.add(id, priority, now);
  }
  const std::vector<uint64_t>& plan(double now) { return current_ = batcher_.plan(now); }
  void release(uint64_t id) {
    batcher_.finished(id);
    held_.erase(id);
  }
  std::map<uint64_t, State> held_;

 private:
  sched::StepBatcher batcher_;
  std::vector<uint64_t> current_;
};

// text embeddings -> [the UNet's class labels (noise-augmented image embedding), the text embeddings]: the
// Stable unCLIP prior, step-level batched like the denoiser (requests at different prior steps share one
// PriorTransformer call); its text encoder runs once per request, batched over the requests that arrived.
class PriorStageImpl : public SteppedStage<std::pair<PriorState, std::vector<at::Tensor>>> {
 public:
  PriorStageImpl(const SdModel& m, const StageConfig& c) : SteppedStage(c), model_(m) {
    DP_CHECK(m.unclip && (m.unclip->prior || m.unclip->image_encoder), "prior stage: ", m.dir, " is not a Stable ",
             "unCLIP or Kandinsky 2.2 folder (or its prior was not loaded)");
    runner_ = std::make_unique<PriorRunner>(*m.unclip, m.spec);
  }

  void add(StageRequest r, double now) override {
    DP_CHECK(!r.inputs.empty(), "prior: no text embeddings received");
    if (model_.kandinsky) {  // the encode stage's prior text embeddings (EncodeStage::prior_text)
      PriorState s = runner_->make_state(r.params, r.id);
      std::vector<at::Tensor> onward;  // image-to-image: the starting image's latents, for the denoiser
      if (!s.image_mode()) {  // (an image prompt alone: the image encoder's embedding replaces the prior's, no text)
        const size_t n = s.needs_uncond() ? 6 : 3;
        const size_t want = n + (model_.starts_from_image(r.params) ? 1 : 0);
        DP_CHECK(r.inputs.size() == want, "prior: request ", r.id, " needs ", want, " tensors, got ", r.inputs.size());
        const DeviceSpec& spec = model_.spec;
        auto take = [&](size_t k, at::Tensor& embeds, at::Tensor& hidden, at::Tensor& mask) {
          embeds = r.inputs[k].to(spec.device, spec.dtype);
          hidden = r.inputs[k + 1].to(spec.device, spec.dtype);
          mask = r.inputs[k + 2].to(spec.device, at::kLong);
        };
        take(0, s.embeds, s.hidden, s.mask);
        if (n == 6) take(3, s.u_embeds, s.u_hidden, s.u_mask);
        s.encoded = true;
        onward.assign(r.inputs.begin() + n, r.inputs.end());
      }
      hold(r.id, std::make_pair(std::move(s), std::move(onward)), r.priority, now);
      return;
    }
    // the state, and the text embeddings passed on to the denoiser
    hold(r.id, {runner_->make_state(r.params, r.id), std::move(r.inputs)}, r.priority, now);
  }

  std::vector<StageEvent> step(double now) override {
    const std::vector<uint64_t> ids = plan(now);
    std::vector<StageEvent> out;
    if (ids.empty()) return out;
    std::vector<PriorState*> batch;
    for (uint64_t id : ids) batch.push_back(&held_.at(id).first);
    runner_->step(batch);
    for (uint64_t id : ids) {
      auto& [state, passthrough] = held_.at(id);
      out.push_back(StageEvent::progress(id, state.step, state.total_steps()));
      if (!state.done()) continue;
      // Kandinsky 2.2: [image embedding, negative image embedding]; Stable unCLIP: the class labels, then the text
      const bool kandinsky = model_.kandinsky;
      const at::Tensor labels = (kandinsky ? runner_->image_embeds(state) : runner_->class_labels(state)).contiguous();
      if (!at::isfinite(labels).all().item<bool>()) {
        out.push_back(StageEvent::failed(id, detail::cat("request ", id, ": non-finite values (NaN or Inf) in the ",
                                                         "prior's image embedding (the prior's weights or settings)")));
      } else {
        std::vector<at::Tensor> next;
        if (kandinsky) next = {labels[0].cpu(), labels[1].cpu()};
        else next.push_back(labels.cpu());
        for (auto& t : passthrough) next.push_back(t);
        out.push_back(StageEvent::finished(id, std::move(next)));
      }
      release(id);
    }
    return out;
  }

 private:
  const SdModel& model_;
  std::unique_ptr<PriorRunner> runner_;
};

// embeddings -> final latents [C, h, w]: step-level batching over requests at different steps, one UNet call
// per iteration; a request whose latents go non-finite fails alone.
class DenoiseStageImpl : public SteppedStage<DenoiseState> {
 public:
  DenoiseStageImpl(const SdModel& m, const StageConfig& c)
      : SteppedStage(c), model_(m), den_(m) {}

  void add(StageRequest r, double now) override {
    DP_CHECK(!r.inputs.empty(), "denoise: no embeddings received");
    Embeddings e;
    if (!r.params.ip_adapter_image.empty()) {  // IP-Adapter: the image prompt's embedding is the very last
      DP_CHECK(r.inputs.size() >= 2, "denoise: request ", r.id, " has an image prompt, but its embedding did not arrive");
      e.ip_embeds = r.inputs.back().to(at::kCPU, at::kFloat);
      r.inputs.pop_back();
    }
    if (model_.starts_from_image(r.params)) {  // image-to-image: the image's latents come last
      const bool inpaint = !r.params.mask.empty();  // then the mask (and the masked image's latents)
      const size_t n = 1 + (inpaint ? 1 : 0) + (inpaint && model_.inpaint_unet ? 1 : 0);
      DP_CHECK(r.inputs.size() >= n + 1, "denoise: request ", r.id, " starts from an image, but its latents",
               inpaint ? " and mask" : "", " did not arrive");
      auto take = [&] {
        at::Tensor x = r.inputs.back().to(at::kCPU, at::kFloat);
        r.inputs.pop_back();
        return x;
      };
      if (inpaint && model_.inpaint_unet) e.masked_image_latents = take();
      if (inpaint) e.mask = take();
      e.image_latents = take();
    }
    size_t k = 0;  // Stable unCLIP: the prior's class labels come first
    // SDXL: [time_ids, pooled, cond, (uncond pooled, uncond, (the refiner: uncond time_ids))]
    if (model_.unet_config.text_time()) {
      const size_t n = model_.aesthetic ? 6 : 5;
      DP_CHECK(r.inputs.size() == 3 || r.inputs.size() == n, "denoise: an SDXL request needs 3 or ", n, " tensors (size "
               "conditioning, pooled and full text embeddings, and their unconditional ones), got ", r.inputs.size());
      e.time_ids = r.inputs[0].to(at::kCPU, at::kFloat);
      e.class_labels = r.inputs[1].to(model_.spec.device, at::kFloat);
      e.cond = r.inputs[2].to(model_.spec.device, model_.spec.dtype);
      if (r.inputs.size() >= 5) {
        e.uncond_class_labels = r.inputs[3].to(model_.spec.device, at::kFloat);
        e.uncond = r.inputs[4].to(model_.spec.device, model_.spec.dtype);
      }
      if (r.inputs.size() == 6) e.uncond_time_ids = r.inputs[5].to(at::kCPU, at::kFloat);
      hold(r.id, make_denoise_state(model_, r.params, e, r.id), r.priority, now);
      return;
    }
    if (model_.dit()) {  // [pooled, cond, (uncond pooled, uncond)]
      DP_CHECK(r.inputs.size() == 2 || r.inputs.size() == 4, "denoise: an SD3 or Flux request needs 2 or 4 tensors (pooled ",
               "and full text embeddings, and their unconditional ones), got ", r.inputs.size());
      e.class_labels = r.inputs[0].to(model_.spec.device, at::kFloat);
      e.cond = r.inputs[1].to(model_.spec.device, model_.spec.dtype);
      if (r.inputs.size() == 4) {
        e.uncond_class_labels = r.inputs[2].to(model_.spec.device, at::kFloat);
        e.uncond = r.inputs[3].to(model_.spec.device, model_.spec.dtype);
      }
      hold(r.id, make_denoise_state(model_, r.params, e, r.id), r.priority, now);
      return;
    }
    if (model_.unet_config.class_embed_type == "projection") {
      DP_CHECK(r.inputs.size() >= 2, "denoise: no image embedding received (this UNet is conditioned on one; the "
                                     "prior stage must run before denoise)");
      e.class_labels = r.inputs[k++].to(model_.spec.device, at::kFloat);
    }
    e.cond = r.inputs[k].to(model_.spec.device, model_.spec.dtype);
    if (r.inputs.size() > k + 1) e.uncond = r.inputs[k + 1].to(model_.spec.device, model_.spec.dtype);
    hold(r.id, make_denoise_state(model_, r.params, e, r.id), r.priority, now);
  }

  std::vector<StageEvent> step(double now) override {
    const std::vector<uint64_t> ids = plan(now);
    std::vector<StageEvent> out;
    if (ids.empty()) return out;
    // one UNet call per latent size: requests of different sizes share an iteration, not a tensor
    std::map<std::vector<int64_t>, std::vector<DenoiseState*>> by_shape;
    for (uint64_t id : ids) {
      DenoiseState& st = held_.at(id);
      by_shape[st.latents.sizes().vec()].push_back(&st);
    }
    for (auto& [shape, batch] : by_shape) den_.step(batch, /*throw_on_failure=*/false);
    for (uint64_t id : ids) {
      DenoiseState& s = held_.at(id);
      out.push_back(StageEvent::progress(id, s.steps_done(), s.total_steps()));
      if (s.preview.defined() && s.failure.empty()) out.push_back(StageEvent::preview(id, s.preview_index, {s.preview}));
      if (!s.done()) continue;
      if (!s.failure.empty()) {
        out.push_back(StageEvent::failed(id, s.failure));
      } else {
        std::vector<at::Tensor> t{s.latents.contiguous()};
        if (model_.stage2) {  // DeepFloyd IF: stage II (the superres stage) conditions on the same text
          t.push_back(s.cond.contiguous());
          if (s.uncond.defined()) t.push_back(s.uncond.contiguous());
        }
        out.push_back(StageEvent::finished(id, std::move(t)));
      }
      release(id);
    }
    return out;
  }

 protected:
  const SdModel& model_;
  DenoiseStage den_;
};

// A cascade stage (IF stages II and III): a denoiser of its own, through which partial images (previews) of the
// stages before pass as they are.
class CascadeStageImpl : public DenoiseStageImpl {
 public:
  using DenoiseStageImpl::DenoiseStageImpl;
  size_t held() const override { return DenoiseStageImpl::held() + passing_.size(); }
  void cancel(uint64_t id) override {
    passing_.erase(std::remove_if(passing_.begin(), passing_.end(), [id](const auto& p) { return p.first == id; }),
                   passing_.end());
    DenoiseStageImpl::cancel(id);
  }

 protected:
  void pass(uint64_t id, at::Tensor image) { passing_.emplace_back(id, std::move(image)); }
  // What passes through as finished events (taken), for the start of a step; with `onward`, previews go on as
  // previews for the next stage to make into images (the refiner's: latents that decode shows).
  std::vector<StageEvent> take_passing(bool onward = false) {
    std::vector<StageEvent> out;
    for (auto& [id, img] : passing_)
      out.push_back(onward && preview_number(id) > 0 ? StageEvent::preview(id, preview_number(id), {img})
                                                     : StageEvent::finished(id, {img}));
    passing_.clear();
    return out;
  }

 private:
  std::vector<std::pair<uint64_t, at::Tensor>> passing_;
};

const SdModel& stage2_of(const SdModel& m) {
  DP_CHECK(m.stage2 && m.stage2->unet, "superres stage: ", m.dir, " has no DeepFloyd IF stage II (super_resolution/) ",
           "loaded");
  return *m.stage2;
}

// DeepFloyd IF stage II: [stage-I pixels, text embeddings (cond, uncond)] -> pixels enlarged by the stage-II model
// (its own DDPM loop, step-level batched like the denoiser; make_if_sr_state).
class SuperResStageImpl : public CascadeStageImpl {
 public:
  SuperResStageImpl(const SdModel& m, const StageConfig& c) : CascadeStageImpl(stage2_of(m), c), stage1_(m) {}

  void add(StageRequest r, double now) override {
    if (r.inputs.size() == 1) {  // a preview of stage I (the denoised estimate alone): shown as it is, in 8 bits
      pass(r.id, DecodeStage(stage1_).run_uint8({r.inputs[0].to(at::kFloat)})[0].contiguous());
      return;
    }
    DP_CHECK(r.inputs.size() >= 2, "superres: needs the stage-I image and its text embeddings, got ", r.inputs.size(),
             " tensors");
    Embeddings e;
    e.cond = r.inputs[1].to(model_.spec.device, model_.spec.dtype);
    if (r.inputs.size() > 2) e.uncond = r.inputs[2].to(model_.spec.device, model_.spec.dtype);
    const GenerationParams& p = r.params;
    IfSuperResSettings st;
    st.steps = p.sr_steps;
    st.guidance = p.sr_guidance;
    st.noise_level = p.sr_noise_level;
    const int64_t f = stage1_.sr_factor();
    st.height = static_cast<int>(r.inputs[0].size(1) * f);
    st.width = static_cast<int>(r.inputs[0].size(2) * f);
    hold(r.id, make_if_sr_state(model_, st, r.inputs[0], e, p.seed, r.id), r.priority, now);
  }

  std::vector<StageEvent> step(double now) override {
    std::vector<StageEvent> out = take_passing();
    if (DenoiseStageImpl::held() == 0) return out;
    for (auto& ev : DenoiseStageImpl::step(now)) out.push_back(std::move(ev));
    return out;
  }

 private:
  const SdModel& stage1_;
};

const SdModel& stage3_of(const SdModel& m) {
  DP_CHECK(m.stage3 && m.stage3->unet && m.stage3->vae && m.stage3->text_encoder, "x4 stage: ", m.dir,
           " has no DeepFloyd IF stage III (upscaler/) loaded");
  return *m.stage3;
}

// DeepFloyd IF stage III: 8-bit stage-II images -> 8-bit images 4x larger, by the SD x4 upscaler in upscaler/ (its
// text encoder on the request's prompt, its own DDIM loop step-level batched like the denoiser, its VAE on the
// requests that finish an iteration together). Partial images (previews) pass through as they are.
class X4StageImpl : public CascadeStageImpl {
 public:
  X4StageImpl(const SdModel& m, const StageConfig& c) : CascadeStageImpl(stage3_of(m), c), enc_(model_), dec_(model_) {}

  void add(StageRequest r, double now) override {
    DP_CHECK(!r.inputs.empty(), "x4: no image received");
    if (preview_number(r.id) > 0) return pass(r.id, r.inputs[0]);
    const GenerationParams& p = r.params;
    GenerationParams q = p;  // its own CLIP text encoder (not stage I's T5), its own guidance
    q.guidance = p.x4_guidance;
    q.clip_skip = 0;
    const Embeddings e = enc_.run({&q}).at(0);
    hold(r.id, make_x4_state(model_, {p.x4_steps, p.x4_guidance, p.x4_noise_level}, image_to_unit_range(r.inputs[0]),
                             e, p.seed, r.id),
         r.priority, now);
  }

  std::vector<StageEvent> step(double now) override {
    std::vector<StageEvent> out = take_passing();
    if (DenoiseStageImpl::held() == 0) return out;
    std::vector<StageEvent> events = DenoiseStageImpl::step(now);
    std::map<std::vector<int64_t>, std::vector<size_t>> by_shape;  // finished latents: one VAE call per size
    for (size_t i = 0; i < events.size(); ++i)
      if (events[i].kind == StageEvent::Kind::Finished) by_shape[events[i].outputs[0].sizes().vec()].push_back(i);
    for (auto& [shape, idx] : by_shape) {
      std::vector<at::Tensor> lat;
      for (size_t i : idx) lat.push_back(events[i].outputs[0]);
      std::vector<std::string> failures;
      const at::Tensor img = dec_.run_uint8(lat, &failures);
      for (size_t k = 0; k < idx.size(); ++k) {
        StageEvent& ev = events[idx[k]];
        ev = failures[k].empty() ? StageEvent::finished(ev.id, {img[static_cast<int64_t>(k)].contiguous()})
                                 : StageEvent::failed(ev.id, failures[k]);
      }
    }
    for (auto& ev : events) out.push_back(std::move(ev));
    return out;
  }

 private:
  TextEncodeStage enc_;
  DecodeStage dec_;
};

const SdModel& refiner_of(const SdModel& m) {
  DP_CHECK(m.refiner && m.refiner->unet && (m.refiner->text_encoder_2 || m.refiner->text_encoder), "refine stage: ",
           m.dir, " runs without an SDXL refiner loaded (--refiner DIR)");
  return *m.refiner;
}

// The SDXL refiner: the base's latents -> latents, by the refiner's UNet (its text encoder on the request's prompts at
// `add`, its own loop from denoising_end on, step-level batched like the denoiser; make_refine_state). The base's
// previews (denoised estimates) pass through to decode as they are.
class RefineStageImpl : public CascadeStageImpl {
 public:
  RefineStageImpl(const SdModel& m, const StageConfig& c) : CascadeStageImpl(refiner_of(m), c), enc_(model_) {}

  void add(StageRequest r, double now) override {
    DP_CHECK(!r.inputs.empty(), "refine: no latents received");
    if (preview_number(r.id) > 0) return pass(r.id, r.inputs[0]);
    const at::Tensor& lat = r.inputs[0];
    DP_CHECK(lat.dim() == 3, "refine: request ", r.id, ": the base's latents must be [C, h, w], got ", lat.sizes());
    if (r.params.skip_refiner) return pass(r.id, lat);  // finished by the base alone
    const int64_t f = model_.latent_factor();
    const GenerationParams q = refiner_request(r.params, static_cast<int>(lat.size(2) * f),
                                               static_cast<int>(lat.size(1) * f));
    hold(r.id, make_refine_state(model_, r.params, lat, enc_.run({&q}).at(0), r.id), r.priority, now);
  }

  std::vector<StageEvent> step(double now) override {
    // the base's previews (decode shows them) and the requests that skip the refiner
    std::vector<StageEvent> out = take_passing(/*onward=*/true);
    if (DenoiseStageImpl::held() == 0) return out;
    for (auto& ev : DenoiseStageImpl::step(now)) out.push_back(std::move(ev));
    return out;
  }

 private:
  TextEncodeStage enc_;
};

// latents -> 8-bit base images [H, W, 3], one VAE call per same-size batch
class DecodeStageImpl : public OneShotStage {
 public:
  DecodeStageImpl(const SdModel& m, const StageConfig& c) : OneShotStage(c), model_(m), dec_(m) {}

 protected:
  std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) override {
    std::vector<at::Tensor> lat;
    for (const auto* r : batch) {
      DP_CHECK(!r->inputs.empty(), "decode: no latents received");
      lat.push_back(r->inputs[0].to(model_.spec.device, at::kFloat));
    }
    std::vector<std::string> failures;
    at::Tensor img = dec_.run_uint8(lat, &failures);
    std::vector<StageEvent> out;
    for (size_t i = 0; i < batch.size(); ++i)
      out.push_back(failures[i].empty() ? StageEvent::finished(batch[i]->id, {img[static_cast<int64_t>(i)].contiguous()})
                                        : StageEvent::failed(batch[i]->id, failures[i]));
    return out;
  }

 private:
  const SdModel& model_;
  DecodeStage dec_;
};

// 8-bit images -> 8-bit images enlarged by super_resolution/ (cascade models)
class UpscaleStageImpl : public OneShotStage {
 public:
  UpscaleStageImpl(const SdModel& m, const StageConfig& c) : OneShotStage(c), up_(m) {}

 protected:
  std::vector<StageEvent> run(const std::vector<const StageRequest*>& batch) override {
    std::vector<at::Tensor> imgs;
    for (const auto* r : batch) {
      DP_CHECK(!r->inputs.empty(), "upscale: no image received");
      imgs.push_back(r->inputs[0]);
    }
    at::Tensor up = up_.run_uint8(at::stack(imgs));
    std::vector<StageEvent> out;
    for (size_t i = 0; i < batch.size(); ++i)
      out.push_back(StageEvent::finished(batch[i]->id, {up[static_cast<int64_t>(i)].contiguous()}));
    return out;
  }

 private:
  UpscaleStage up_;
};

template <class T>
ModelStage entry(const char* name, const char* consumes, const char* produces, unsigned comps, bool heavy = false) {
  ModelStage s;
  s.def.name = name;
  s.def.consumes = consumes;
  s.def.produces = produces;
  s.def.heavy = heavy;
  s.def.gathers = !heavy;
  // encode (and the prior, before the heavy stage) run ahead; later stages are fed only what the heavy one releases
  s.def.admission_factor = name == std::string("encode") || name == std::string("prior") ? 4 : 0;
  s.components = comps;
  s.make = [](const SdModel& m, const StageConfig& c) -> std::unique_ptr<Stage> { return std::make_unique<T>(m, c); };
  return s;
}

struct Registry {
  std::mutex mu;
  std::map<std::string, ModelStage> stages;
  std::vector<std::string> order;  // registration order, for messages
  Registry() {
    add(entry<EncodeStage>("encode", "prompt (and an image to start from)", "text embeddings (conditional, "
                           "unconditional; image-to-image: the image's latents)", kTextEncoder | kImageLatents));
    add(entry<PriorStageImpl>("prior", "text embeddings", "image embedding (Stable unCLIP: noise-augmented, with the "
                              "text embeddings; Kandinsky 2.2: with the negative one)", kPrior));
    add(entry<DenoiseStageImpl>("denoise", "text embeddings (and an image embedding)", "latents", kUNet,
                                /*heavy=*/true));
    add(entry<DecodeStageImpl>("decode", "latents", "8-bit image", kVae));
    add(entry<UpscaleStageImpl>("upscale", "8-bit image", "8-bit image, enlarged", kSuperRes));
    add(entry<SuperResStageImpl>("superres", "stage-I pixels, text embeddings", "pixels, enlarged (DeepFloyd IF stage II)",
                                 kSuperRes));
    add(entry<X4StageImpl>("x4", "8-bit image (and the prompt)", "8-bit image, 4x (DeepFloyd IF stage III: the SD x4 "
                           "upscaler)", kStage3));
    add(entry<RefineStageImpl>("refine", "latents (and the prompt)", "latents, refined (the SDXL refiner)", kRefiner));
  }
  void add(ModelStage s) {
    if (!stages.count(s.def.name)) order.push_back(s.def.name);
    stages[s.def.name] = std::move(s);
  }
};
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_model_stage(ModelStage s) {
  DP_CHECK(!s.def.name.empty() && s.make, "register_model_stage: a stage needs a name and a factory");
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  r.add(std::move(s));
}

ModelStage find_model_stage(const std::string& name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.stages.find(name);
  if (it == r.stages.end()) {
    std::string known;
    for (const auto& n : r.order) known += (known.empty() ? "" : ", ") + n;
    DP_FAIL("unknown stage '", name, "' (known: ", known, ")");
  }
  return it->second;
}

std::vector<std::string> known_stage_names() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lk(r.mu);
  return r.order;
}

std::vector<PipelineStage> default_pipeline_layout() {
  return {{"encode", false}, {"denoise", true}, {"decode", false}};
}

std::vector<PipelineStage> pipeline_layout(const std::string& model_dir, const ModelAddons& addons) {
  std::vector<PipelineStage> p = pipeline_layout(model_dir);
  // the SDXL refiner: its own loop between the base's and the VAE (SdModel::load checks the folders)
  if (!addons.refiner.empty()) p.insert(p.end() - 1, PipelineStage{"refine", false, /*own_rank=*/true});
  return p;
}

std::vector<PipelineStage> pipeline_layout(const std::string& model_dir) {
  std::vector<PipelineStage> p = default_pipeline_layout();
  if (SdModel::is_unclip(model_dir) || SdModel::is_kandinsky(model_dir))  // the prior: prompt -> image embedding
    p.insert(p.begin() + 1, PipelineStage{"prior", false, /*own_rank=*/true});
  if (SdModel::is_if(model_dir)) {  // DeepFloyd IF: stage II (its own diffusion loop) before the pixels are written
    if (SdModel::has_if_stage2(model_dir)) p.insert(p.end() - 1, PipelineStage{"superres", false, /*own_rank=*/true});
    if (SdModel::has_if_stage3(model_dir)) p.push_back(PipelineStage{"x4", false, /*own_rank=*/true});
  } else if (SdModel::has_super_resolution(model_dir)) {
    p.push_back({"upscale", false});
  }
  return p;
}

unsigned components_for(const std::vector<std::string>& stages) {
  unsigned c = 0;
  for (const auto& s : stages) c |= find_model_stage(s).components;
  return c;
}

PipelineDef model_pipeline(const SdModel& model, const std::vector<std::string>& stages) {
  PipelineDef p;
  for (const auto& name : stages) {
    ModelStage s = find_model_stage(name);
    StageDef d = s.def;
    auto make = s.make;
    d.make = [&model, make](const StageConfig& c) { return make(model, c); };
    p.push_back(std::move(d));
  }
  return p;
}

}  // namespace diffpipe
