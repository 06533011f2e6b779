// diffpipe's half of the side-by-side benchmark against diffusers (benchmarks/vs_diffusers.py drives both and
// compares): one process, model loaded once, then timed rounds of
//   e2e:  N prompts through the product pipeline (run_pipeline, stages on threads, in-process transport),
//   e2e_threads: the same with each CPU stage computing on its own thread (RunOptions::cpu_lane off), images
//         checked equal to e2e's,
//   loop: the denoising loop of one batch alone (DenoiseStage::step calls: UNet + guidance + sampler),
//   unet: one UNet forward on a fixed [2N, C, h, w] batch (guidance doubles the rows),
//   vae:  one VAE decode of a fixed [N, C, h, w] batch.
// Every input a reference needs (each request's initial noise, the UNet and VAE inputs) and every output
// (8-bit images, UNet and VAE outputs) go to --out (safetensors), so the driver checks numbers before it
// compares times. Prints one JSON object on stdout: times per round, the profile of one more e2e round (profiled
// apart: on a GPU the profile sections synchronise the stream), peak memory.
//   bench_sd --model DIR [--size PX] [--steps K] [--images N] [--guidance G] [--sampler ddim] [--rounds R]
//            [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--threads T] [--parts e2e,loop,unet,vae]
//            [--cpu-cache-mb N] [--out FILE] [--trace PREFIX]
#include <ATen/Parallel.h>
#include <sys/resource.h>

#include <torch/csrc/autograd/profiler_kineto.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <set>
#include <sstream>

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/cpu_allocator.h"
#include "diffpipe/runtime/error.h"
#include "cli.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/runtime/transport.h"
#include "diffpipe/stages/stages.h"

#ifdef DIFFPIPE_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

using namespace diffpipe;

namespace {

struct Options {
  std::string model, device = "cpu", dtype = "float32", sampler = "ddim", out, parts = "e2e,loop,unet,vae", trace;
  int size = 0, steps = 6, images = 2, rounds = 2, threads = 0;
  int64_t cpu_cache_mb = -1;  // -1: diffpipe's default (as `diffpipe generate`); 0: no caching
  double guidance = 7.5;
};

Options parse(int argc, char** argv, bool* help) {
  Options o;
  cli::Args a("bench_sd", "bench_sd --model DIR [options]",
              {{"model", "DIR", "model folder"},
               {"device", "cpu|cuda", "device (default cpu)"},
               {"dtype", "TYPE", "float32 | float16 | bfloat16 (default float32)"},
               {"sampler", "NAME", "sampler (default ddim)"},
               {"out", "DIR", "save inputs and outputs as safetensors there (for vs_diffusers.py)"},
               {"parts", "LIST", "comma-separated: e2e, e2e_threads, loop, unet, vae (default e2e,loop,unet,vae)"},
               {"size", "PX", "image size (default: the model's)"},
               {"steps", "N", "steps (default 6)"},
               {"images", "N", "images per batch (default 2)"},
               {"rounds", "N", "timed rounds after one warm-up (default 2)"},
               {"threads", "N", "CPU threads (default: all cores)"},
               {"guidance", "G", "guidance scale (default 7.5)"},
               {"cpu-cache-mb", "N", "CPU block cache (default: as diffpipe generate; 0: none)"},
               {"trace", "PREFIX", "profile one more UNet / VAE call each (CPU ops and GPU kernels) into "
                                   "PREFIX.unet.json / PREFIX.vae.json (Chrome trace; benchmarks/kernel_breakdown.py)"}},
              argc - 1, argv + 1, "prints one JSON object: times, profile and peak memory of diffpipe's side");
  *help = a.help_requested();
  if (*help) {
    std::fputs(a.help_text().c_str(), stdout);
    return o;
  }
  o.model = a.str("model");
  o.device = a.str("device", o.device);
  o.dtype = a.str("dtype", o.dtype);
  o.sampler = a.str("sampler", o.sampler);
  o.out = a.str("out");
  o.parts = a.str("parts", o.parts);
  o.size = static_cast<int>(a.integer("size", o.size));
  o.steps = static_cast<int>(a.integer("steps", o.steps));
  o.images = static_cast<int>(a.integer("images", o.images));
  o.rounds = static_cast<int>(a.integer("rounds", o.rounds));
  o.threads = static_cast<int>(a.integer("threads", o.threads));
  o.guidance = a.number("guidance", o.guidance);
  o.cpu_cache_mb = a.integer("cpu-cache-mb", o.cpu_cache_mb);
  o.trace = a.str("trace");
  DP_CHECK(!o.model.empty(), "bench_sd: --model DIR is required");
  DP_CHECK(o.images >= 1 && o.rounds >= 1 && o.steps >= 1, "bench_sd: --images, --rounds, --steps must be >= 1");
  return o;
}

void sync(const at::Device& d) {
  if (d.is_cuda()) at::detail::getCUDAHooks().deviceSynchronize(d.index() < 0 ? 0 : d.index());
}

double peak_bytes(const at::Device& d) {
#ifdef DIFFPIPE_BENCH_CUDA
  if (d.is_cuda()) return static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(d.index())
                                                  .allocated_bytes[0].peak);
#endif
  (void)d;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss * 1024.0;  // process peak resident set
}

// One more call of f under LibTorch's Kineto profiler (the CPU ops and, on CUDA, every kernel with its duration),
// saved as a Chrome trace: what benchmarks/kernel_breakdown.py reads, from both sides of vs_diffusers.py.
void trace_call(const std::string& file, const at::Device& dev, const std::function<void()>& f) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const prof::ProfilerConfig cfg(prof::ProfilerState::KINETO);
  std::set<ActivityType> acts{ActivityType::CPU};
  if (dev.is_cuda()) acts.insert(ActivityType::CUDA);
  sync(dev);
  prof::prepareProfiler(cfg, acts);
  prof::enableProfiler(cfg, acts);
  f();
  sync(dev);
  prof::disableProfiler()->save(file);
  std::fprintf(stderr, "bench_sd: trace of one call in %s\n", file.c_str());
}

template <typename F>
std::vector<double> timed(int rounds, const at::Device& dev, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r) {
    sync(dev);
    const auto t0 = std::chrono::steady_clock::now();
    f();
    sync(dev);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const Options o = parse(argc, argv, &help);
    if (help) return 0;
    std::set<std::string> parts;
    {
      std::stringstream ss(o.parts);
      for (std::string p; std::getline(ss, p, ',');) parts.insert(p);
    }
    if (o.threads > 0) at::set_num_threads(o.threads);
    cpu_allocator::install(o.cpu_cache_mb < 0 ? cpu_allocator::default_bound() : size_t(o.cpu_cache_mb) << 20);
    DeviceSpec spec;
    if (o.device == "cuda") spec.device = at::Device(at::kCUDA, 0);
    else DP_CHECK(o.device == "cpu", "bench_sd: --device must be cpu or cuda");
    spec.dtype = o.dtype == "float16" ? at::kHalf : o.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    DP_CHECK(o.dtype == "float32" || o.dtype == "float16" || o.dtype == "bfloat16", "bench_sd: unknown --dtype ", o.dtype);
    const auto t_load = std::chrono::steady_clock::now();
    const SdModel model = SdModel::load(o.model, spec);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();

    std::vector<GenerationParams> reqs(o.images);
    for (int i = 0; i < o.images; ++i) {
      reqs[i].prompt = "a photograph of an astronaut riding a horse, number " + std::to_string(i);
      reqs[i].steps = o.steps;
      reqs[i].guidance = o.guidance;
      reqs[i].sampler = o.sampler;
      reqs[i].seed = 1000 + i;
      reqs[i].width = reqs[i].height = o.size;
    }
    const ResolvedParams rp = resolve_params(model, reqs[0]);
    const int64_t C = model.unet_config.in_channels, f = model.latent_factor();
    const int64_t h = rp.height / f, w = rp.width / f;
    std::map<std::string, at::Tensor> saved;
    {
      std::vector<at::Tensor> noise;
      for (const auto& p : reqs) noise.push_back(seeded_noise(p.seed, 0, {C, h, w}));
      saved["noise"] = at::stack(noise);
    }
    nlohmann::json res = {{"device", o.device}, {"dtype", o.dtype}, {"threads", at::get_num_threads()},
                          {"size", rp.width}, {"steps", o.steps}, {"images", o.images}, {"guidance", o.guidance},
                          {"load_s", load_s}};

    RunOptions ro;  // e2e: one rank, every stage, all images in one batch
    ro.model_dir = o.model;
    RankSpec rs;
    rs.device = o.device;
    rs.dtype = o.dtype;
    ro.placement = Placement::derive(1, rs);
    for (auto& s : ro.placement.stages) s.spec.max_batch = std::max(8, o.images);
    std::vector<Image> images(o.images);
    if (parts.count("e2e")) {
      std::vector<double> times;
      profile::Totals best_prof;
      double best_wall = 1e30;
      // round 0 warms up (allocator, kernel selection); the timed rounds run as a user's run does, without the
      // profile sections (on a GPU each section boundary synchronises the stream, so the host's launches of the
      // next section no longer overlap the kernels still queued); one last round is profiled for the breakdown
      for (int r = 0; r < o.rounds + 2; ++r) {
        const bool profiled = r == o.rounds + 1;
        auto t = make_inproc_world(1)[0];
        profile::reset();
        profile::set_enabled(profiled);
        const RunStats st = run_pipeline(ro, *t, model, reqs, [&](GeneratedImage&& g) {
          DP_CHECK(g.status == "done", "bench_sd: request ", g.index, " ", g.status, ": ", g.reason);
          images[g.index] = std::move(g.image);
        });
        profile::set_enabled(false);
        if (r == 0) continue;
        if (profiled) {
          best_prof = profile::totals();
          res["e2e_profiled_s"] = st.wall_s;
          continue;
        }
        times.push_back(st.wall_s);
        if (st.wall_s < best_wall) {
          best_wall = st.wall_s;
          nlohmann::json busy;
          const auto names = ro.placement.stage_names();
          for (size_t k = 0; k < names.size() && k < st.busy_s.size(); ++k) busy[names[k]] = st.busy_s[k];
          res["e2e_busy_s"] = busy;
        }
      }
      res["e2e_s"] = times;
      nlohmann::json prof, calls, longest;
      for (int k = 0; k < profile::kSections; ++k) {
        const char* name = profile::section_name(static_cast<profile::Section>(k));
        prof[name] = best_prof.seconds[k];
        calls[name] = best_prof.calls[k];
        longest[name] = best_prof.max_seconds[k];
      }
      res["e2e_profile_s"] = prof;
      res["e2e_profile_calls"] = calls;
      res["e2e_profile_longest_s"] = longest;
      std::vector<at::Tensor> u8;
      for (const auto& im : images)
        u8.push_back(at::from_blob(const_cast<uint8_t*>(im.pixels.data()), {im.height, im.width, 3}, at::kByte).clone());
      saved["images"] = at::stack(u8);
    }
    if (parts.count("e2e_threads")) {  // e2e with each CPU stage computing on its own thread (no compute lane)
      RunOptions rt = ro;
      rt.cpu_lane = false;
      std::vector<double> times;
      for (int r = 0; r < o.rounds + 1; ++r) {
        auto t = make_inproc_world(1)[0];
        const RunStats st = run_pipeline(rt, *t, model, reqs, [&](GeneratedImage&& g) {
          DP_CHECK(g.status == "done", "bench_sd: request ", g.index, " ", g.status, ": ", g.reason);
          if (parts.count("e2e"))
            DP_CHECK(g.image.pixels == images[g.index].pixels, "bench_sd: request ", g.index,
                     ": the image differs between the lane and stage threads");
        });
        if (r > 0) times.push_back(st.wall_s);
      }
      res["e2e_threads_s"] = times;
    }
    if (parts.count("loop")) {  // the denoising loop of all requests in one batch (diffusers' progress-bar rate)
      TextEncodeStage enc(model);
      DenoiseStage den(model);
      std::vector<const GenerationParams*> ptrs;
      for (const auto& p : reqs) ptrs.push_back(&p);
      const auto embs = enc.run(ptrs);
      auto run = [&] {
        std::vector<DenoiseState> states;
        for (int i = 0; i < o.images; ++i) states.push_back(make_denoise_state(model, reqs[i], embs[i], i));
        std::vector<DenoiseState*> batch;
        for (auto& s : states) batch.push_back(&s);
        while (!states[0].done()) den.step(batch);
      };
      run();  // warm-up
      const std::vector<double> t = timed(o.rounds, spec.device, run);
      nlohmann::json steps_per_s = nlohmann::json::array();
      for (double s : t) steps_per_s.push_back(o.steps / s);
      res["loop_s"] = t;
      res["loop_steps_per_s"] = steps_per_s;
    }
    const int64_t rows = model.uses_cfg(reqs[0]) ? 2 * o.images : o.images;  // (Flux: one row, the guidance embedded)
    std::function<at::Tensor()> unet_call;  // the denoiser's forward on fixed inputs (UNet or transformer)
    if (parts.count("unet") && model.sd3) {  // SD3: the transformer on CLIP + T5 tokens and the pooled embedding
      const Sd3TransformerConfig& tc = model.transformer_config;
      const int64_t L = model.tokenizer->max_length() + model.max_sequence_length;
      at::Tensor x = seeded_noise(7, 0, {rows, C, h, w}), ctx = seeded_noise(7, 1, {rows, L, tc.joint_attention_dim});
      at::Tensor pooled = seeded_noise(7, 2, {rows, tc.pooled_projection_dim});
      at::Tensor ts = at::full({rows}, 500.0, at::kFloat);
      saved["unet.sample"] = x;
      saved["unet.encoder_hidden_states"] = ctx;
      saved["unet.timesteps"] = ts;
      saved["unet.text_embeds"] = pooled;
      const at::Tensor xd = x.to(spec.device, spec.dtype), cd = ctx.to(spec.device, spec.dtype);
      const at::Tensor pd = pooled.to(spec.device, spec.dtype);
      unet_call = [&model, xd, ts, cd, pd] { return model.transformer->forward(xd, ts, cd, pd); };
    } else if (parts.count("unet") && model.flux) {  // Flux: the transformer on T5 tokens, CLIP's pooled, the guidance
      const FluxTransformerConfig& fc = model.flux_config;
      at::Tensor x = seeded_noise(7, 0, {rows, C, h, w}), ctx = seeded_noise(7, 1, {rows, model.max_sequence_length,
                                                                                     fc.joint_attention_dim});
      at::Tensor pooled = seeded_noise(7, 2, {rows, fc.pooled_projection_dim});
      at::Tensor ts = at::full({rows}, 0.5, at::kFloat), gs = at::full({rows}, o.guidance, at::kFloat);
      saved["unet.sample"] = x;
      saved["unet.encoder_hidden_states"] = ctx;
      saved["unet.timesteps"] = ts;
      saved["unet.text_embeds"] = pooled;
      saved["unet.guidance"] = gs;
      const at::Tensor xd = x.to(spec.device, spec.dtype), cd = ctx.to(spec.device, spec.dtype);
      const at::Tensor pd = pooled.to(spec.device, spec.dtype), g = fc.guidance_embeds ? gs : at::Tensor();
      unet_call = [&model, xd, ts, cd, pd, g] { return model.flux_transformer->forward(xd, ts, cd, pd, g); };
    } else if (parts.count("unet")) {
      const UNetConfig& uc = model.unet_config;
      const int64_t L = model.tokenizer->max_length(), D = uc.cross_attention_dim[0];
      at::Tensor x = seeded_noise(7, 0, {rows, C, h, w}), ctx = seeded_noise(7, 1, {rows, L, D});
      at::Tensor ts = at::full({rows}, 500.0, at::kFloat);
      saved["unet.sample"] = x;
      saved["unet.encoder_hidden_states"] = ctx;
      saved["unet.timesteps"] = ts;
      at::Tensor pooled, time_ids;  // SDXL: pooled text embedding and the size ids of this image size
      if (uc.text_time()) {
        pooled = seeded_noise(7, 2, {rows, uc.projection_class_embeddings_input_dim - 6 * uc.addition_time_embed_dim})
                     .to(spec.device);
        const float H = static_cast<float>(h * model.latent_factor()), W = static_cast<float>(w * model.latent_factor());
        time_ids = at::tensor(std::vector<float>{H, W, 0.f, 0.f, H, W}).repeat({rows, 1});
        saved["unet.text_embeds"] = pooled.cpu();
        saved["unet.time_ids"] = time_ids;
      }
      const at::Tensor xd = x.to(spec.device, spec.dtype), cd = ctx.to(spec.device, spec.dtype);
      unet_call = [&model, xd, ts, cd, pooled, time_ids] { return model.unet->forward(xd, ts, cd, pooled, time_ids); };
    }
    if (unet_call) {
      at::Tensor out = unet_call();  // warm-up
      res["unet_s"] = timed(o.rounds, spec.device, [&] { out = unet_call(); });
      if (!o.trace.empty()) trace_call(o.trace + ".unet.json", spec.device, [&] { out = unet_call(); });
      saved["unet.out"] = out.to(at::kCPU, at::kFloat);
    }
    if (parts.count("vae")) {
      at::Tensor z = seeded_noise(8, 0, {static_cast<int64_t>(o.images), C, h, w});
      saved["vae.latents"] = z;
      const at::Tensor zd = z.to(spec.device, model.vae_dtype);
      at::Tensor out = model.vae->decode(zd);
      res["vae_s"] = timed(o.rounds, spec.device, [&] { out = model.vae->decode(zd); });
      if (!o.trace.empty()) trace_call(o.trace + ".vae.json", spec.device, [&] { out = model.vae->decode(zd); });
      saved["vae.out"] = out.to(at::kCPU, at::kFloat);
    }
    res["peak_bytes"] = peak_bytes(spec.device);
    const auto cs = cpu_allocator::stats();
    res["cpu_cache"] = {{"hits", cs.hits}, {"misses", cs.misses}, {"cached_bytes", cs.cached_bytes}};
    res["peak_kind"] = spec.device.is_cuda() ? "cuda allocated" : "process max rss";
    if (!o.out.empty()) save_safetensors(o.out, saved);
    std::cout << res.dump() << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_sd: %s\n", e.what());
    return 1;
  }
  return 0;
}
