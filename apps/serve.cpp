// `diffpipe serve`: the pipeline as a long-running service. Every rank runs its stages; rank 0 also runs the
// HTTP server (cluster/server.h: OpenAI-compatible images API) whose requests feed the coordinator.
//   [mpirun -np N] diffpipe serve --model DIR [--port 8000] [--host 127.0.0.1] [--queue 64] [--timeout-request S]
// SIGTERM / SIGINT: stop accepting, finish the requests in flight, every rank exits 0.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <thread>

#include "cli.h"
#include "commands.h"
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/cluster/server.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/model_stages.h"
#include "diffpipe/stages/pipeline.h"
#include "diffpipe/stages/stages.h"

namespace diffpipe::apps {
namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_serve_signal(int) { g_stop = true; }
}  // namespace

int serve_main(int argc, char** argv) {
  std::optional<cli::Args> parsed;
  run_on_all_ranks_or_fail([&] {
    parsed.emplace("serve", "[mpirun -np N] diffpipe serve --model DIR [options]",
                   std::vector<cli::Opt>{
                       {"model", "DIR", "model folder"},
                       {"lora", "FILE[:S],...", "LoRA files fused into the model at scale S (default 1); comma-separated"},
                       {"embeddings", "FILE[:TOKEN],...", "textual-inversion embeddings added to the tokenizers and\n"
                                                          "text encoders (prompts use TOKEN)"},
                       {"lora-adapters", "NAME=FILE,...", "LoRA files kept beside the weights, that requests choose by\n"
                                                          "name (field lora: \"NAME[:SCALE],...\" or {\"NAME\": SCALE})"},
                       {"controlnet", "DIR[,DIR...]", "ControlNet folders: requests may bring a control_image (a list: one each)"},
                       {"ip-adapter", "FILE", "an IP-Adapter: requests may bring an ip_adapter_image (and\n"
                                              "ip_adapter_scale)"},
                       {"ip-image-encoder", "DIR", "its image encoder (default: image_encoder/ beside the file)"},
                       {"refiner", "DIR", "SDXL: a refiner folder; the base's latents go on to its UNet (requests:\n"
                                          "denoising_end, refiner_steps, refiner_strength)"},
                       {"prior", "DIR", "Kandinsky 2.2: the prior folder of a decoder folder"},
                       {"max-sequence-length", "N", "SD3 and FLUX.1: T5 tokens per prompt (as generate)"},
                       {"host", "ADDR", "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)"},
                       {"port", "P", "port (default 8000; 0: any free port, printed at start)"},
                       {"name", "NAME", "model id in /v1/models and responses (default: the folder's name)"},
                       {"queue", "N", "admission queue: more waiting images answer 429 (default 64)"},
                       {"max-n", "N", "images per request (default 8)"},
                       {"max-body-mb", "MB", "largest request body; uploaded images travel in it (default 16)"},
                       {"timeout-request", "S", "an image not finished S s after it arrived answers 504 (default: none)"},
                       {"steps", "N", "default num_inference_steps (default 25)"},
                       {"guidance", "G", "default guidance_scale (default: the folder's pipeline's, as generate)"},
                       {"sampler", "NAME", "default sampler (default: the model's)"},
                       {"max-batch", "N", "per-stage batch limit (default 8)"},
                       {"pipeline", "FILE", "placement of stages on ranks (TOML)"},
                       {"device", "cpu|cuda", "device of every rank (default cpu)"},
                       {"dtype", "TYPE", "float32 | float16 | bfloat16"},
                       {"threads", "N", "CPU threads per rank (default: cores / ranks on the node)"},
                       {"batch-invariant", "", "CPU: an image is byte-identical whatever the batch its request joins\n"
                                               "(generate --batch-invariant's image; slower batching)"},
                       {"timeout", "S", "fail when admitted work makes no progress for S s (default 600)"},
                       {"inject-failure", "STAGE:IMAGE", "testing aid: the IMAGE-th image served (from 1) fails in STAGE"}},
                   argc, argv, "POST /v1/images/generations, /v1/images/edits, /v1/images/variations, GET /healthz, /v1/models, /metrics; SIGTERM drains");
    if (parsed->help_requested()) return;
    DP_CHECK(parsed->has("model"), "serve: --model DIR is required");
    const int64_t port = parsed->integer("port", 8000);
    DP_CHECK(port >= 0 && port <= 65535, "serve: --port must be in [0, 65535]");
  });
  const auto& world = mpi::world();
  if (parsed->help_requested()) {
    if (world.rank == 0) std::fputs(parsed->help_text().c_str(), stdout);
    return 0;
  }
  const cli::Args& a = *parsed;
  // rank 0 drains on a signal; the others wait for its shutdown (mpirun forwards signals to every rank)
  std::signal(SIGTERM, world.rank == 0 ? on_serve_signal : SIG_IGN);
  std::signal(SIGINT, world.rank == 0 ? on_serve_signal : SIG_IGN);
  int threads = static_cast<int>(a.integer("threads", 0));
  if (threads <= 0) threads = mpi::threads_per_rank();
  at::set_num_threads(threads);

  const std::string dir = a.str("model");
  RunOptions opts;
  SdModel model;
  GenerationParams defaults;
  run_on_all_ranks_or_fail([&] {
    SdModel::validate(dir);
    opts.addons = model_addons(a);
    const auto layout = pipeline_layout(dir, opts.addons);
    PlacementDefaults pd;
    pd.rank.device = a.str("device", "cpu");
    pd.rank.dtype = a.str("dtype", "float32");
    pd.stage.max_batch = static_cast<int>(a.integer("max-batch", 8));
    pd.batch_invariant = a.flag("batch-invariant");
    if (a.has("pipeline")) {
      opts.placement = Placement::load(a.str("pipeline"), world.size, layout, pd);
    } else {
      opts.placement = Placement::derive(world.size, pd.rank, layout);
      for (auto& s : opts.placement.stages) s.spec.max_batch = pd.stage.max_batch;
      opts.placement.batch_invariant = pd.batch_invariant;
    }
    opts.placement.queue_capacity = static_cast<size_t>(a.integer("queue", 64));
    opts.placement.validate(a.has("pipeline") ? a.str("pipeline") : "command line");
    opts.reject_when_full = true;  // a full queue answers 429 at once
    opts.timeout_s = a.number("timeout", 600);
    opts.inject_failure = a.str("inject-failure");
    opts.model_dir = dir;
    const DeviceSpec spec = device_spec_of(opts.placement.ranks.at(world.rank), opts.placement.batch_invariant);
    unsigned comps = components_for(opts.placement.stages_on(world.rank));
    if (world.rank == 0) comps |= kTextEncoder;  // the tokenizer counts prompt tokens for `usage`
    model = SdModel::load(dir, spec, comps, opts.addons);
    defaults.steps = static_cast<int>(a.integer("steps", 25));
    defaults.guidance = a.number("guidance", SdModel::default_guidance(dir));
    defaults.sampler = a.str("sampler");
    if (defaults.sampler.empty()) {  // the folder's own scheduler answers requests that name none
      try {
        (void)sampler_kind_of_class(model.scheduler.class_name, model.scheduler.algorithm_type);
      } catch (const Error& e) {
        DP_FAIL("serve: ", path_join(dir, "scheduler/scheduler_config.json"), " names ", e.what(),
                "; start the server with --sampler NAME");
      }
    }
    // the x4 upscaler and Stable unCLIP without a prior: each request brings its image ("image"), so the defaults
    // alone cannot be resolved
    if (model.upscaler) defaults.noise_level = 20;  // diffusers' default
    const bool image_per_request = model.upscaler || (model.image_variations && model.prior_train_timesteps == 0);
    if (!image_per_request) (void)resolve_params(model, defaults);
  });

  std::unique_ptr<ImageServer> server;
  if (world.rank == 0) {
    ServerOptions so;
    so.host = a.str("host", "127.0.0.1");
    so.port = static_cast<int>(a.integer("port", 8000));
    std::string name = dir;
    while (!name.empty() && name.back() == '/') name.pop_back();
    so.model_name = a.str("name", name.substr(name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1));
    so.max_n = static_cast<int>(a.integer("max-n", 8));
    const int64_t mb = a.integer("max-body-mb", 16);
    DP_CHECK(mb >= 1 && mb <= 1024, "serve: --max-body-mb must be in [1, 1024], got ", mb);
    so.max_body = static_cast<size_t>(mb) << 20;
    so.request_timeout_s = a.number("timeout-request", 0);
    so.defaults = defaults;
    so.image_variations = model.image_variations;
    for (const LoraAdapter& l : opts.addons.adapters) so.lora_adapters.push_back(l.name);
    so.embedding_tokens = model.embedding_tokens;
    so.controlnets = static_cast<int>(opts.addons.controlnets.size());
    so.ip_adapter = !opts.addons.ip_adapter.empty();
    so.refiner = opts.addons.refiner;
    so.validate = [&model](const GenerationParams& p) { (void)resolve_params(model, p); };
    so.count_tokens = [&model](const std::string& s) {
      // the first tokenizer, or the second where the folder has it alone (the SDXL refiner)
      const ClipTokenizer& tok = model.tokenizer ? *model.tokenizer : *model.tokenizer_2;
      return static_cast<int>(std::min<size_t>(tok.encode_untruncated(s).size(), static_cast<size_t>(tok.max_length())));
    };
    server = std::make_unique<ImageServer>(so);
  }
  run_on_all_ranks_or_fail([&] {
    if (server) server->start();
  });
  if (server) {
    std::fprintf(stderr, "%sdiffpipe: serving %s on http://%s:%d (POST /v1/images/generations, /v1/images/edits, /v1/images/variations)\n",
                 opts.placement.describe().c_str(), dir.c_str(), a.str("host", "127.0.0.1").c_str(), server->port());
    std::fflush(stderr);
  }
  std::thread watcher;
  if (server)
    watcher = std::thread([&] {  // a signal starts the drain
      while (!g_stop && !server->stopping()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (g_stop) std::fprintf(stderr, "diffpipe: stopping: no new requests; finishing the ones in flight\n");
      server->stop();
    });
  std::shared_ptr<Transport> t = world.size == 1 ? make_inproc_world(1)[0] : make_mpi_transport();
  RunStats st;
  try {
    st = run_pipeline(opts, *t, model, server.get());
  } catch (...) {
    if (server) server->stop();
    if (watcher.joinable()) watcher.join();
    throw;
  }
  if (watcher.joinable()) watcher.join();
  t.reset();
  if (server) std::fprintf(stderr, "diffpipe: served %zu image(s); stopped\n", st.images);
  return 0;
}

}  // namespace diffpipe::apps
