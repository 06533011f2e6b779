// What per-request LoRA adapters (--lora-adapters) cost in the denoising loop, against the same LoRA fused into the
// weights (--lora) and against no LoRA, in one run on one model folder:
//   plain:    the adapters' model, no request choosing one (the layers skip their branches)
//   adapter:  the same model, every request choosing the adapter at scale 1 (branches on every adapted layer)
//   half:     the same, half of the requests choosing it (a mixed batch; the others at scale 0)
//   fused:    the file fused into the weights at load (no per-step cost)
// The LoRA is made here: rank R on every attention projection and feed-forward layer of the folder's UNet (peft
// keys, random), the text embeddings are random (the UNet's loop alone is timed). Checks first: adapter's final
// latents equal fused's within float rounding (relative 1e-4), plain's differ from them. Prints one JSON object.
//   bench_lora --model DIR [--size PX] [--steps K] [--images N] [--rank R] [--rounds R] [--threads T]
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <iostream>

#include "cli.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/philox.h"
#include "diffpipe/runtime/safetensors.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/stages/stages.h"

using namespace diffpipe;

namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// A peft-format LoRA of rank `r` on the UNet's attention projections and feed-forward layers (alpha = rank).
std::string make_lora(const std::string& model, int64_t r, const std::string& path) {
  const auto f = SafetensorsFile::open(model + "/unet/diffusion_pytorch_model.safetensors");
  std::map<std::string, at::Tensor> t;
  uint64_t stream = 1;
  for (const auto& k : f->names()) {
    const bool target = ends_with(k, "to_q.weight") || ends_with(k, "to_k.weight") || ends_with(k, "to_v.weight") ||
                        ends_with(k, "to_out.0.weight") || ends_with(k, "ff.net.0.proj.weight") ||
                        ends_with(k, "ff.net.2.weight");
    if (!target) continue;
    const auto shape = f->get(k).shape;
    const std::string m = "unet." + k.substr(0, k.size() - 7);
    at::Tensor down = at::empty({r, shape[1]}), up = at::empty({shape[0], r});
    philox_normal(7, stream++, down.data_ptr<float>(), down.numel());
    philox_normal(7, stream++, up.data_ptr<float>(), up.numel());
    t[m + ".lora_A.weight"] = down / std::sqrt(static_cast<double>(shape[1]));
    t[m + ".lora_B.weight"] = up * 0.02;
  }
  DP_CHECK(!t.empty(), "bench_lora: no attention layers in ", model, "/unet");
  save_safetensors(path, t, {});
  return path;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cli::Args a("bench_lora", "bench_lora --model DIR [options]",
                {{"model", "DIR", "model folder (Stable Diffusion or SDXL)"},
                 {"size", "PX", "image size (default: the model's)"},
                 {"steps", "N", "steps (default 4)"},
                 {"images", "N", "requests in the batch (default 2)"},
                 {"rank", "R", "the LoRA's rank (default 16)"},
                 {"rounds", "N", "timed rounds after one warm-up (default 2)"},
                 {"threads", "N", "CPU threads (default: all cores)"},
                 {"work", "DIR", "where the LoRA file goes (default /tmp)"}},
                argc - 1, argv + 1, "prints one JSON object: loop times with adapters, fused and without");
    if (a.help_requested()) {
      std::fputs(a.help_text().c_str(), stdout);
      return 0;
    }
    const std::string model = a.str("model");
    DP_CHECK(!model.empty(), "bench_lora: --model DIR is required");
    const int steps = static_cast<int>(a.integer("steps", 4)), images = static_cast<int>(a.integer("images", 2));
    const int rounds = static_cast<int>(a.integer("rounds", 2)), size = static_cast<int>(a.integer("size", 0));
    DP_CHECK(steps >= 1 && images >= 1 && rounds >= 1, "bench_lora: --steps, --images, --rounds must be >= 1");
    if (a.has("threads")) at::set_num_threads(static_cast<int>(a.integer("threads", 1)));
    const std::string lora = make_lora(model, a.integer("rank", 16), a.str("work", "/tmp") + "/bench_lora.safetensors");

    ModelAddons with_adapter;
    with_adapter.adapters = {{"a", lora}};
    const SdModel am = SdModel::load(model, DeviceSpec{}, kUNet, with_adapter);
    const SdModel fm = SdModel::load(model, DeviceSpec{}, kUNet, ModelAddons{{{lora, 1.0}}, {}});
    const UNetConfig& u = am.unet_config;
    DP_CHECK(!am.sdxl, "bench_lora: SD 1.x/2.x folders (SDXL's pooled conditioning is not made up here)");
    const int64_t ctx_dim = u.cross_attention_dim.at(0);
    std::vector<Embeddings> embs(static_cast<size_t>(images));
    for (size_t i = 0; i < embs.size(); ++i) {
      embs[i].cond = seeded_noise(11, 2 * i, {77, ctx_dim});
      embs[i].uncond = seeded_noise(11, 2 * i + 1, {77, ctx_dim});
    }
    // one loop over the batch; `chosen` requests take the adapter
    auto loop = [&](const SdModel& m, int chosen) {
      std::vector<DenoiseState> ds;
      for (int i = 0; i < images; ++i) {
        GenerationParams p;
        p.prompt = "x";
        p.steps = steps;
        p.width = p.height = size;
        p.seed = static_cast<uint64_t>(i);
        p.lora = i < chosen ? "a" : "";
        ds.push_back(make_denoise_state(m, p, embs[static_cast<size_t>(i)], static_cast<uint64_t>(i)));
      }
      const DenoiseStage den(m);
      std::vector<DenoiseState*> batch;
      for (auto& s : ds) batch.push_back(&s);
      while (!ds[0].done()) den.step(batch);
      std::vector<at::Tensor> out;
      for (auto& s : ds) out.push_back(s.latents);
      return at::stack(out);
    };
    const at::Tensor adapted = loop(am, images), fused = loop(fm, 0), plain = loop(am, 0);
    const double diff = (adapted - fused).abs().max().item<double>() / fused.abs().max().item<double>();
    const double moved = (plain - fused).abs().max().item<double>() / fused.abs().max().item<double>();
    DP_CHECK(diff <= 1e-4, "bench_lora: adapters differ from the fused LoRA by ", diff, " (relative)");
    DP_CHECK(moved > 1e-3, "bench_lora: the LoRA changed nothing (", moved, ")");
    auto time = [&](const SdModel& m, int chosen) {
      (void)loop(m, chosen);  // warm-up
      double best = 1e30;
      for (int r = 0; r < rounds; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        (void)loop(m, chosen);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      return best;
    };
    const double t_plain = time(am, 0), t_adapter = time(am, images), t_half = time(am, images / 2),
                 t_fused = time(fm, 0);
    std::printf("{\"model\": \"%s\", \"images\": %d, \"steps\": %d, \"rank\": %lld, \"threads\": %d, "
                "\"adapter_vs_fused_max_rel\": %.2e, \"lora_effect_rel\": %.2e, \"loop_s\": {\"plain\": %.3f, "
                "\"adapter\": %.3f, \"half\": %.3f, \"fused\": %.3f}, \"adapter_over_fused\": %.3f, "
                "\"half_over_fused\": %.3f, \"plain_over_fused\": %.3f}\n",
                model.c_str(), images, steps, static_cast<long long>(a.integer("rank", 16)), at::get_num_threads(), diff,
                moved, t_plain, t_adapter, t_half, t_fused, t_adapter / t_fused, t_half / t_fused, t_plain / t_fused);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_lora: %s\n", e.what());
    return 1;
  }
}
