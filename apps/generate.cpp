// `diffpipe generate`: prompts -> PNG files + one JSON line per image (out/images.jsonl and stdout).
// Runs as one process (every stage on threads) or under mpirun with a derived or given placement.
#include <ATen/Parallel.h>
#include <mpi.h>
#include <sys/stat.h>

#include <sstream>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <set>
#include <thread>

#include "cli.h"
#include "commands.h"
#include "diffpipe/cluster/offline.h"
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/cpu_allocator.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/json_config.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/runtime/text.h"
#include "diffpipe/stages/model.h"
#include "diffpipe/stages/memory.h"
#include "diffpipe/stages/pipeline.h"
#include "diffpipe/stages/stages.h"
#include "diffpipe/stages/tokenizer.h"

namespace diffpipe::apps {

namespace {

const char* kUsage = "[mpirun -np N] diffpipe generate --model DIR (--prompt TEXT | --prompts FILE) [options]";
const std::vector<cli::Opt> kOptions = {
    {"model", "DIR", "model folder in the diffusers layout: Stable Diffusion 1.x/2.x, SDXL, Stable unCLIP, or\n"
                     "DeepFloyd IF (with its stage II in super_resolution/)"},
    {"lora", "FILE[:S],...", "LoRA files fused into the UNet and text encoders at scale S (default 1): diffusers'\n"
                             "(peft) or kohya-ss's format; comma-separated for several"},
    {"embeddings", "FILE[:TOKEN],...", "textual-inversion embeddings (.safetensors: diffusers', A1111's emb_params,\n"
                                        "SDXL's clip_l/clip_g) added to the tokenizers and text encoders; prompts\n"
                                        "use TOKEN (default: the file's key, or its name)"},
    {"lora-adapters", "NAME=FILE,...", "LoRA files kept beside the weights, that JSONL lines choose by name (key lora:\n"
                                       "\"NAME[:SCALE],...\"); one batch mixes requests with different adapters"},
    {"ip-adapter", "FILE", "an IP-Adapter (h94/IP-Adapter's ip-adapter_sd15 / ip-adapter_sdxl .safetensors): requests\n"
                           "bring an image prompt (--ip-adapter-image, JSONL ip_adapter_image)"},
    {"ip-image-encoder", "DIR", "the IP-Adapter's image encoder (CLIPVisionModelWithProjection; default:\n"
                                "image_encoder/ beside the --ip-adapter file)"},
    {"ip-adapter-image", "FILE", "with --ip-adapter: the image prompt (a PNG, any size)"},
    {"ip-adapter-scale", "S", "with --ip-adapter-image: how strongly it acts (default 1)"},
    {"refiner", "DIR", "SDXL: a refiner folder (stable-diffusion-xl-refiner-1.0's layout, or any SDXL folder);\n"
                       "the base's latents go on to its UNet (stage refine) before the VAE decodes them"},
    {"prior", "DIR", "Kandinsky 2.2: the prior folder (kandinsky-2-2-prior's layout) of a decoder folder\n"
                     "(kandinsky-2-2-decoder's); a combined folder has its own"},
    {"max-sequence-length", "N", "SD3 and FLUX.1: T5 tokens per prompt, in [1, 512] (default: the pipeline's, SD3 256,\n"
                                 "FLUX.1 512; 256 is usual for FLUX.1-schnell and runs a shorter sequence)"},
    {"denoising-end", "F", "with --refiner: the share of the base's schedule before the refiner takes over, in\n"
                           "(0, 1] (default 0.8; 1: the base finishes, the refiner refines at --refiner-strength)"},
    {"refiner-steps", "N", "with --refiner: the refiner's schedule (default: --steps)"},
    {"refiner-strength", "S", "with --refiner and --denoising-end 1: its image-to-image strength (default 0.3)"},
    {"skip-refiner", "", "with --refiner: requests skip it unless their JSONL line says \"refiner\": true"},
    {"controlnet", "DIR[,DIR...]", "ControlNet folders (ControlNetModel, SD 1.x/2.x or SDXL) loaded with the UNet;\n"
                                   "requests bring --control-image (JSONL control_image), one image per ControlNet"},
    {"control-image", "FILE[,FILE...]", "with --controlnet: the conditioning image (edges, depth, pose... as the ControlNet was\n"
                              "trained), a PNG of the output's size"},
    {"control-scale", "S[,S...]", "with --control-image: the ControlNet's conditioning scale (default 1; one value\n"
                                  "for all, or one per ControlNet)"},
    {"control-start", "F[,F...]", "with --control-image: the fraction of the steps before the ControlNet acts (default 0)"},
    {"control-end", "F[,F...]", "with --control-image: the fraction of the steps after which it stops (default 1)"},
    {"guess-mode", "", "with --control-image: diffusers' guess_mode (the ControlNets act on the conditional row\n"
                       "alone, their residuals ramped; JSONL guess_mode)"},
    {"prompt", "TEXT", "a prompt", true},
    {"prompts", "FILE", "one prompt per line ('#' lines and blank lines skipped), or FILE.jsonl: one JSON object\n"
                        "a line with prompt and any of negative_prompt, seed, steps, guidance, sampler,\n"
                        "width, height, clip_skip, images, prior_steps, prior_guidance, noise_level,\n"
                        "image_prompt, original_width, original_height, crop_top, crop_left, sr_steps,\n"
                        "sr_guidance, sr_noise_level, x4_steps, x4_guidance, x4_noise_level, strength, mask,\n"
                        "control_image, control_scale, control_start, control_end, guess_mode, lora,\n"
                        "aesthetic_score, negative_aesthetic_score, ip_adapter_image, ip_adapter_scale,\n"
                        "denoising_end, refiner_steps, refiner_strength, refiner, guidance_rescale,\n"
                        "true_cfg_scale, skip_guidance_layers, skip_layer_guidance_scale,\n"
                        "skip_layer_guidance_start, skip_layer_guidance_stop\n"
                        "(unset keys take the command line's values)"},
    {"negative-prompt", "TEXT", "negative prompt (default: empty)"},
    {"steps", "N", "inference steps (default 25)"},
    {"guidance", "G", "classifier-free guidance scale (default: the folder's diffusers pipeline's, 7.5 for Stable "
                      "Diffusion, 5 SDXL, 7 SD3, 3.5 Flux, 4 Kandinsky; 1 skips the unconditional pass)"},
    {"guidance-rescale", "R", "diffusers' guidance_rescale: the guided prediction rescaled toward the conditional\n"
                              "one's standard deviation, in [0, 1] (default 0; 0.7 for zero-SNR v-prediction models)"},
    {"true-cfg", "S", "FLUX.1 folders: FluxPipeline's true_cfg_scale; above 1 runs an unconditional row on the\n"
                       "negative prompt (empty when none) and mixes the two with S (default 1: off)"},
    {"skip-layers", "L,L,...", "SD3 folders: StableDiffusion3Pipeline's skip-layer guidance (skip_guidance_layers;\n"
                               "SD3.5 Medium: 7,8,9): a third row without these transformer blocks, its difference\n"
                               "from the prompt's row added at --skip-layer-scale (default: off)"},
    {"skip-layer-scale", "S", "with --skip-layers: skip_layer_guidance_scale (default 2.8)"},
    {"skip-layer-start", "F", "with --skip-layers: the loop's share where it starts (skip_layer_guidance_start, 0.01)"},
    {"skip-layer-stop", "F", "with --skip-layers: the loop's share where it stops (skip_layer_guidance_stop, 0.2)"},
    {"sampler", "NAME", "ddim | euler | euler_karras | euler_a | heun | heun_karras | kdpm2 | kdpm2_karras |\n"
                          "lms | lms_karras |\n"
                          "dpmpp_2m | dpmpp_2m_karras | dpmpp_2m_sde | dpmpp_2m_sde_karras | dpmpp_3m_sde |\n"
                          "dpmpp_3m_sde_karras | pndm | ddpm | lcm | unipc | unipc_karras | flow_euler (default: the model's)"},
    {"seed", "S", "base seed: the run's n-th image (input order, a prompt's images together) uses S + n,\n"
                  "unless its JSONL line sets a seed (default 0)"},
    {"width", "W", "image width, a multiple of the model's latent factor x UNet downsampling"},
    {"height", "H", "image height (the same rule)"},
    {"images", "N", "images per prompt (default 1)"},
    {"clip-skip", "K", "use the text encoder's K-th layer from the end (default 0)"},
    {"prior-steps", "N", "Stable unCLIP folders: the prior's DDPM steps (default 25)"},
    {"prior-guidance", "G", "Stable unCLIP folders: the prior's guidance scale (default 4; 1 skips its\n"
                            "unconditional pass)"},
    {"noise-level", "L", "Stable unCLIP folders: noise added to the image embedding, in [0, 1000) (default 0);\n"
                         "x4 upscaler folders: noise added to the low-resolution image, in [0, 350] (default 20)"},
    {"original-width", "W", "SDXL folders: the original width the UNet is told (default: the image's)"},
    {"original-height", "H", "SDXL folders: the original height the UNet is told (default: the image's)"},
    {"crop-top", "Y", "SDXL folders: the crop's top coordinate the UNet is told (default 0)"},
    {"crop-left", "X", "SDXL folders: the crop's left coordinate the UNet is told (default 0)"},
    {"aesthetic-score", "S", "SDXL refiner folders: the aesthetic score the prompt's row is told (default 6)"},
    {"negative-aesthetic-score", "S", "SDXL refiner folders: the unconditional row's aesthetic score (default 2.5)"},
    {"sr-steps", "N", "DeepFloyd IF folders with super_resolution/: stage II's DDPM steps (default 50)"},
    {"sr-guidance", "G", "DeepFloyd IF stage II: classifier-free guidance (default 4)"},
    {"sr-noise-level", "L", "DeepFloyd IF stage II: noise added to the enlarged stage-I image, in [0, 1000) (default 250)"},
    {"x4-steps", "N", "DeepFloyd IF folders with upscaler/ (stage III, an SD x4 upscaler): its steps (default 75)"},
    {"x4-guidance", "G", "DeepFloyd IF stage III: classifier-free guidance (default 9)"},
    {"x4-noise-level", "L", "DeepFloyd IF stage III: noise added to stage II's image, in [0, max_noise_level]\n"
                            "(default 20)"},
    {"image-prompt", "FILE", "Stable unCLIP image variations (a folder with image_encoder/): a PNG whose CLIP image\n"
                             "embedding replaces the prior's; the prompt still guides the UNet"},
    {"image", "FILE", "SD and SDXL folders: image-to-image, the PNG to start from (the output has its size);\n"
                      "x4 upscaler folders (StableDiffusionUpscalePipeline): the PNG to enlarge 4x. Stored as\n"
                      "image_prompt; a data:image/png;base64 URI works too"},
    {"strength", "S", "image-to-image: how much of the schedule runs on the noised image, in [0, 1]: int(steps x S)\n"
                      "steps run (the pipelines' defaults: 0.8, 0.3 on SDXL, 0.6 on SD3/FLUX.1; inpainting 1,\n"
                      "0.9999 on SDXL, 0.6 on SD3/FLUX.1)"},
    {"mask", "FILE", "inpainting (SD 1.x/2.x, SDXL, SD3 and FLUX.1 folders, with --image): a PNG of the image's size;\n"
                     "white repainted, black kept (an inpainting folder's 9-channel UNet, or by blending)"},
    {"previews", "K", "also write K partial images per image (0-3): the denoised estimate decoded on the way,\n"
                      "as IMAGE-preview-k.png (default 0)"},
    {"out", "DIR", "output folder (default out/). A rerun of the same command continues an interrupted run:\n"
                   "what has a line in DIR/images.jsonl is skipped"},
    {"overwrite", "", "replace an earlier run with other settings in --out (else refused)"},
    {"format", "png|webdataset", "png files (default), or webdataset tar shards of KEY.png + KEY.json"},
    {"shard-size", "N", "files per folder / samples per tar shard (default 1000); a run that fits in one\n"
                        "folder writes its PNGs straight into --out"},
    {"placement", "pipeline|replicas", "without --pipeline: stages pipelined over the ranks (default: encode |\n"
                                       "denoise replicas | decode), or every stage on every rank (data-parallel;\n"
                                       "faster on small CPU models, see docs/results.md)"},
    {"pipeline", "FILE", "placement of stages on ranks (TOML; default: derived from the rank count). With a file,\n"
                         "--device/--dtype/--transport/--max-batch/--batching/--batch-invariant are\n"
                         "defaults for what the file does not set"},
    {"device", "cpu|cuda", "default device of every rank (default cpu)"},
    {"dtype", "TYPE", "float32 | float16 | bfloat16 (default float32; float16 on GPUs only; bfloat16 also on\n"
                      "CPUs, fast where they have AMX or AVX-512 BF16)"},
    {"transport", "mpi|nccl", "transport between ranks (default mpi)"},
    {"max-batch", "N", "per-stage batch limit when no pipeline file is given (default 8)"},
    {"batching", "MODE", "denoiser batching without a pipeline file: step (default) | static | single"},
    {"batch-invariant", "", "CPU: a request's image is byte-identical whatever its batch (slower batching;\n"
                            "without it a few 8-bit values may differ by 1)"},
    {"priority", "P", "scheduling priority of these requests (higher first; waiting requests age)"},
    {"deadline", "S", "drop a request not finished S seconds after it arrived (status \"timed out\")"},
    {"threads", "N", "CPU threads per rank (default: cores / ranks on the node)"},
    {"cpu-cache-mb", "N", "free CPU memory kept for reuse between steps, per rank (default: a quarter\n"
                          "of the memory / ranks on the node; 0: none)"},
    {"profile", "", "print where each rank's time went (text encoder, UNet, sampler, VAE, transport, idle)"},
    {"timeout", "S", "fail when nothing progresses for S seconds (default 600)"},
    {"skip-memory-check", "", "run even when the up-front estimate says a rank's memory is too small"},
    {"no-contact-sheet", "", "do not write out/contact_sheet.png"},
    {"quiet", "", "no JSON lines on stdout"},
    {"fail-fast", "", "stop the whole job when one request fails (default: it fails alone, the others\n"
                      "finish, and the run exits non-zero at the end)"},
    {"inject-failure", "STAGE:REQUEST[:crash]", "testing aid: fail (or crash) there"},
    {"cancel-at", "REQUEST:S", "testing aid: cancel request REQUEST S seconds after start", true},
};

// The input line request `i` came from (images of a line are consecutive).
std::string origin_of(const std::vector<offline::JobLine>& jobs, size_t i) {
  for (const auto& j : jobs) {
    if (i < static_cast<size_t>(j.images)) return j.origin;
    i -= static_cast<size_t>(j.images);
  }
  return "?";
}

// What decides the pixels of a run (compared with run.json when a rerun continues it): every request's
// settings in order, and each rank's device and dtype. FNV-1a 64 of their text.
std::string format_number(double v) {  // as people write it: 0.7, 1, 1.25
  std::ostringstream o;
  o << v;
  return o.str();
}

std::string run_identity(const std::vector<GenerationParams>& requests, const Placement& placement,
                         const ModelAddons& addons) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const std::string& s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
  };
  for (const auto& p : requests) mix(params_to_json(p).dump());
  std::set<std::string> kinds;  // not per rank: a rerun on another number of ranks makes the same pixels
  for (const auto& r : placement.ranks) kinds.insert(r.device + "/" + r.dtype);
  for (const auto& k : kinds) mix(k);
  auto size_of = [](const std::string& f) {
    struct stat st{};
    return std::to_string(::stat(f.c_str(), &st) == 0 ? st.st_size : -1);
  };
  for (const LoraSpec& l : addons.loras)  // a file by name, scale and size (another file of the same name: another run)
    mix(l.path + "@" + format_number(l.scale) + "#" + size_of(l.path));
  for (const LoraAdapter& l : addons.adapters)  // requests name them (their choice is in each request's settings)
    mix("adapter:" + l.name + "=" + l.path + "#" + size_of(l.path));
  for (const EmbeddingSpec& e : addons.embeddings) mix("embedding:" + e.path + ":" + e.token + "#" + size_of(e.path));
  for (const std::string& cn : addons.controlnets)
    mix("controlnet:" + cn + "#" + size_of(cn + "/diffusion_pytorch_model.safetensors"));
  if (!addons.ip_adapter.empty()) mix("ip_adapter:" + addons.ip_adapter + "#" + size_of(addons.ip_adapter));
  if (!addons.refiner.empty())
    mix("refiner:" + addons.refiner + "#" + size_of(addons.refiner + "/unet/diffusion_pytorch_model.safetensors"));
  if (!addons.prior.empty())
    mix("prior:" + addons.prior + "#" + size_of(addons.prior + "/prior/diffusion_pytorch_model.safetensors"));
  if (addons.max_sequence_length > 0) mix("max_sequence_length:" + std::to_string(addons.max_sequence_length));
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// `--profile`: every rank's time by part (profile sections) and each of its stage threads' idle time, gathered
// to rank 0 and printed there on stderr.
void print_profile(const RunStats& st, const Placement& placement) {
  const auto& world = mpi::world();
  const profile::Totals t = profile::totals();
  std::vector<double> mine{st.wall_s};
  for (double s : t.seconds) mine.push_back(s);
  for (double b : st.busy_s) mine.push_back(b);
  const size_t n = mine.size();
  std::vector<double> all(n * world.size);
  if (world.active && world.size > 1)
    DP_MPI_CHECK(MPI_Gather(mine.data(), static_cast<int>(n), MPI_DOUBLE, all.data(), static_cast<int>(n), MPI_DOUBLE,
                            0, MPI_COMM_WORLD));
  else
    all = mine;
  if (world.rank != 0) return;
  std::string out = "diffpipe: profile (seconds, % of the rank's wall time; idle = a stage thread waiting for work)\n";
  for (int r = 0; r < world.size; ++r) {
    const double* v = all.data() + r * n;
    const double wall = std::max(v[0], 1e-9);
    char buf[128];
    std::snprintf(buf, sizeof(buf), "  rank %d: wall %.3f", r, wall);
    out += buf;
    for (int k = 0; k < profile::kSections; ++k) {
      if (v[1 + k] <= 0) continue;
      std::snprintf(buf, sizeof(buf), " | %s %.3f (%.1f%%)", profile::section_name(static_cast<profile::Section>(k)),
                    v[1 + k], 100 * v[1 + k] / wall);
      out += buf;
    }
    std::string idle;
    for (size_t k = 0; k < placement.stages.size(); ++k) {
      const auto& ranks = placement.stages[k].spec.ranks;
      if (std::find(ranks.begin(), ranks.end(), r) == ranks.end()) continue;
      const double busy = v[1 + profile::kSections + k];
      std::snprintf(buf, sizeof(buf), "%s%s %.3f (%.1f%%)", idle.empty() ? "" : ", ", placement.stages[k].name.c_str(),
                    std::max(0.0, wall - busy), 100 * std::max(0.0, wall - busy) / wall);
      idle += buf;
    }
    out += " | idle: " + (idle.empty() ? std::string("-") : idle) + "\n";
  }
  std::fputs(out.c_str(), stderr);
}

}  // namespace

ModelAddons model_addons(const cli::Args& a) {
  ModelAddons m;
  m.loras = parse_lora_list(a.str("lora"));
  m.adapters = parse_lora_adapters(a.str("lora-adapters"));
  m.controlnets = parse_path_list(a.str("controlnet"), "controlnet", "DIR,DIR...");
  m.embeddings = parse_embedding_list(a.str("embeddings"));
  m.ip_adapter = a.str("ip-adapter");
  m.ip_image_encoder = a.str("ip-image-encoder");
  DP_CHECK(m.ip_image_encoder.empty() || !m.ip_adapter.empty(), "--ip-image-encoder: only with --ip-adapter FILE");
  m.refiner = a.str("refiner");
  m.prior = a.str("prior");
  m.max_sequence_length = static_cast<int>(a.integer("max-sequence-length", 0));  // checked by the model
  return m;
}

int generate_main(int argc, char** argv) {
  // Parsed under the start-up agreement: a bad option is reported once (by rank 0), not once per rank.
  std::optional<cli::Args> parsed;
  run_on_all_ranks_or_fail([&] {
    parsed.emplace("generate", kUsage, kOptions, argc, argv);
    if (parsed->help_requested()) return;
    DP_CHECK(parsed->has("model"), "generate: --model DIR is required");
    DP_CHECK(parsed->has("prompt") || parsed->has("prompts"), "generate: give --prompt TEXT or --prompts FILE");
    const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    const int64_t th = parsed->integer("threads", 1), mb = parsed->integer("cpu-cache-mb", 0);
    DP_CHECK(th >= 1 && th <= 4 * hw, "generate: --threads must be in [1, ", 4 * hw, "] (4 x the ", hw,
             " cores here), got ", th);
    DP_CHECK(mb >= 0 && mb <= (int64_t(1) << 24), "generate: --cpu-cache-mb must be in [0, 16777216], got ", mb);
  });
  if (parsed->help_requested()) {
    if (mpi::world().rank == 0) std::fputs(parsed->help_text().c_str(), stdout);
    return 0;
  }
  const cli::Args& a = *parsed;
  const auto& world = mpi::world();
  const bool lead = world.rank == 0;

  // Requests (validated on every rank, so a bad file fails all ranks with one message).
  std::vector<GenerationParams> requests;
  std::vector<offline::JobLine> jobs;
  std::optional<offline::OutputSink> sink;  // rank 0: the output folder
  std::vector<uint64_t> pending;            // run-wide indices still to make (rank 0)
  Placement placement;
  RunOptions opts;
  run_on_all_ranks_or_fail([&] {
    std::vector<PromptLine> lines;
    for (const auto& p : a.all("prompt")) lines.push_back({p, detail::cat("--prompt #", lines.size() + 1)});
    for (const auto& l : lines) check_utf8(l.text, "generate: " + l.origin);
    check_utf8(a.str("negative-prompt"), "generate: --negative-prompt");
    const std::string pfile = a.str("prompts");
    const bool jsonl_input = pfile.size() > 6 && pfile.compare(pfile.size() - 6, 6, ".jsonl") == 0;
    if (a.has("prompts"))
      for (auto& l : read_prompts(pfile)) lines.push_back(std::move(l));
    const int64_t images = a.integer("images", 1);
    DP_CHECK(images >= 1 && images <= 100000, "generate: --images must be in [1, 100000]");
    GenerationParams base;
    base.negative_prompt = a.str("negative-prompt");
    base.steps = static_cast<int>(a.integer("steps", 25));
    base.guidance = a.number("guidance", SdModel::default_guidance(a.str("model")));
    base.sampler = a.str("sampler");
    base.width = static_cast<int>(a.integer("width", 0));
    base.height = static_cast<int>(a.integer("height", 0));
    base.clip_skip = static_cast<int>(a.integer("clip-skip", 0));
    base.guidance_rescale = a.number("guidance-rescale", 0);
    base.true_cfg_scale = a.number("true-cfg", 1.0);  // checked by the model (FLUX.1 folders only)
    // SD3's skip-layer guidance (the blocks checked by the model): --skip-layers 7,8,9 ("": off)
    if (!a.str("skip-layers").empty())
      for (int64_t v : a.integers("skip-layers", 0, 1 << 20)) base.skip_guidance_layers.push_back(static_cast<int>(v));
    base.skip_layer_guidance_scale = a.number("skip-layer-scale", base.skip_layer_guidance_scale);
    base.skip_layer_guidance_start = a.number("skip-layer-start", base.skip_layer_guidance_start);
    base.skip_layer_guidance_stop = a.number("skip-layer-stop", base.skip_layer_guidance_stop);
    DP_CHECK(std::isfinite(base.guidance_rescale) && base.guidance_rescale >= 0 && base.guidance_rescale <= 1,
             "generate: --guidance-rescale must be in [0, 1], got ", base.guidance_rescale);
    base.previews = static_cast<int>(a.integer("previews", 0));
    base.prior_steps = static_cast<int>(a.integer("prior-steps", 25));
    base.prior_guidance = a.number("prior-guidance", 4.0);
    const bool upscaler = SdModel::is_upscaler(a.str("model"));
    base.noise_level = static_cast<int>(a.integer("noise-level", upscaler ? 20 : 0));  // diffusers' defaults
    DP_CHECK(!(a.has("image") && a.has("image-prompt")), "generate: give --image or --image-prompt, not both");
    base.image_prompt = a.has("image") ? a.str("image") : a.str("image-prompt");
    if (a.has("strength")) {
      base.strength = a.number("strength", 0);
      DP_CHECK(std::isfinite(base.strength) && base.strength >= 0 && base.strength <= 1,
               "generate: --strength must be in [0, 1], got ", base.strength);
    }
    base.mask = a.str("mask");
    {  // one value, or a comma-separated list with one per ControlNet (--controlnet order)
      std::map<std::string, nlohmann::json> v;
      for (const char* flag : {"control-image", "control-scale", "control-start", "control-end"}) {
        if (!a.has(flag)) continue;
        const bool image = std::string(flag) == "control-image";
        std::vector<nlohmann::json> items;
        const std::string text = a.str(flag);
        for (size_t start = 0, comma; start <= text.size(); start = comma + 1) {
          comma = std::min(text.find(',', start), text.size());
          const std::string item = text.substr(start, comma - start);
          if (image) {
            items.push_back(item.empty() ? nlohmann::json() : nlohmann::json(item));
            continue;
          }
          size_t used = 0;
          double x = 0;
          try {
            x = std::stod(item, &used);
          } catch (const std::exception&) {
            used = 0;
          }
          DP_CHECK(used == item.size() && used > 0, "generate: --", flag, ": '", item, "' is not a number");
          items.push_back(x);
        }
        v[flag] = items.size() == 1 ? items[0] : nlohmann::json(items);
      }
      auto at = [&](const char* f) { return v.count(f) ? &v[f] : nullptr; };
      base.guess_mode = a.flag("guess-mode");
      base.ip_adapter_image = a.str("ip-adapter-image");
      if (a.has("ip-adapter-scale")) base.ip_adapter_scale = a.number("ip-adapter-scale", 1.0);
      base.controls = offline::control_fields({}, {at("control-image"), at("control-scale"), at("control-start"),
                                                   at("control-end")},
                                              {"--control-image", "--control-scale", "--control-start", "--control-end"},
                                              "generate");
    }
    base.original_width = static_cast<int>(a.integer("original-width", 0));
    base.original_height = static_cast<int>(a.integer("original-height", 0));
    base.crop_top = static_cast<int>(a.integer("crop-top", 0));
    base.crop_left = static_cast<int>(a.integer("crop-left", 0));
    DP_CHECK(base.original_width >= 0 && base.original_height >= 0 && base.crop_top >= 0 && base.crop_left >= 0,
             "generate: --original-width/--original-height/--crop-top/--crop-left must be at least 0");
    for (const auto& [flag, v] : {std::pair<const char*, double*>{"aesthetic-score", &base.aesthetic_score},
                                  {"negative-aesthetic-score", &base.negative_aesthetic_score}})
      if (a.has(flag)) {
        *v = a.number(flag, 0);
        DP_CHECK(std::isfinite(*v) && *v >= 0, "generate: --", flag, " must be a number >= 0, got ", *v);
      }
    if (a.has("denoising-end")) base.denoising_end = a.number("denoising-end", 0);
    if (a.has("refiner-strength")) base.refiner_strength = a.number("refiner-strength", 0);
    base.refiner_steps = static_cast<int>(a.integer("refiner-steps", 0));
    base.skip_refiner = a.flag("skip-refiner");
    for (const char* flag : {"denoising-end", "refiner-steps", "refiner-strength", "skip-refiner"})
      DP_CHECK(!a.has(flag) || a.has("refiner"), "generate: --", flag, " needs --refiner DIR");
    base.sr_steps = static_cast<int>(a.integer("sr-steps", 50));
    base.sr_guidance = a.number("sr-guidance", 4.0);
    base.sr_noise_level = static_cast<int>(a.integer("sr-noise-level", 250));
    DP_CHECK(base.sr_steps >= 1, "generate: --sr-steps must be at least 1");
    DP_CHECK(std::isfinite(base.sr_guidance) && base.sr_guidance >= 0, "generate: --sr-guidance must be >= 0");
    DP_CHECK(base.sr_noise_level >= 0, "generate: --sr-noise-level must be at least 0");
    base.x4_steps = static_cast<int>(a.integer("x4-steps", 75));
    base.x4_guidance = a.number("x4-guidance", 9.0);
    base.x4_noise_level = static_cast<int>(a.integer("x4-noise-level", 20));
    DP_CHECK(base.x4_steps >= 1, "generate: --x4-steps must be at least 1");
    DP_CHECK(std::isfinite(base.x4_guidance) && base.x4_guidance >= 0, "generate: --x4-guidance must be >= 0");
    DP_CHECK(base.x4_noise_level >= 0, "generate: --x4-noise-level must be at least 0");
    DP_CHECK(base.prior_steps >= 1, "generate: --prior-steps must be at least 1");
    DP_CHECK(std::isfinite(base.prior_guidance) && base.prior_guidance >= 0, "generate: --prior-guidance must be >= 0");
    DP_CHECK(base.noise_level >= 0, "generate: --noise-level must be at least 0");
    DP_CHECK(base.previews >= 0 && base.previews <= 3, "generate: --previews must be in [0, 3]");
    DP_CHECK(a.integer("width", 0) >= 0 && a.integer("height", 0) >= 0, "generate: --width/--height must be positive");
    jobs = offline::parse_job_lines(lines, jsonl_input, base, static_cast<int>(images));
    for (const auto& j : jobs)
      if (!j.params.sampler.empty()) {
        bool k;
        try {
          (void)parse_sampler_name(j.params.sampler, &k);
        } catch (const std::exception& e) {
          DP_FAIL("generate: ", j.origin, ": ", e.what());
        }
      }
    requests = offline::expand_job(jobs, a.u64("seed", 0));
    DP_CHECK(requests.size() <= 10000000, "generate: ", requests.size(), " images in one run (at most 10,000,000)");
    PlacementDefaults defaults;  // from the command line; a pipeline file's own settings win
    defaults.rank.device = a.str("device", "cpu");
    defaults.rank.dtype = a.str("dtype", "float32");
    defaults.transport = a.str("transport", "mpi");
    defaults.stage.max_batch = static_cast<int>(a.integer("max-batch", 8));
    defaults.stage.batching = a.str("batching", "step");
    defaults.batch_invariant = a.flag("batch-invariant");
    SdModel::validate(a.str("model"));
    // an LCM-distilled UNet embeds the guidance scale: no unconditional row, so negative prompts go unused (diffusers)
    if (world.rank == 0 && !SdModel::is_sd3(a.str("model")) && !SdModel::is_flux(a.str("model")) &&
        UNetConfig::load(path_join(a.str("model"), "unet/config.json")).time_cond_proj_dim > 0) {
      const auto it =
          std::find_if(jobs.begin(), jobs.end(), [](const auto& j) { return !j.params.negative_prompt.empty(); });
      if (it != jobs.end())
        std::fprintf(stderr, "diffpipe: warning: %s: the negative prompt is not used: %s's UNet takes the guidance "
                     "scale as an input (time_cond_proj_dim, a Latent Consistency Model) and runs no unconditional row\n",
                     it->origin.c_str(), a.str("model").c_str());
    }
    {  // prompt lengths in tokens: CLIP reads max_length tokens with its start and end (T5: 76 and its end);
       // warn as diffusers does
      const bool t5 = SdModel::is_if(a.str("model"));
      std::unique_ptr<ClipTokenizer> clip;
      std::unique_ptr<T5Tokenizer> t5tok;
      if (t5) t5tok = std::make_unique<T5Tokenizer>(T5Tokenizer::load(path_join(a.str("model"), "tokenizer")));
      else
        clip = std::make_unique<ClipTokenizer>(
            ClipTokenizer::load(SdModel::prompt_tokenizer_dir(a.str("model"), a.str("prior"))));
      const size_t max_len = t5 ? 77 : static_cast<size_t>(clip->max_length());
      std::vector<PromptLine> all;
      std::set<std::string> seen_negative;
      for (const auto& j : jobs) {
        all.push_back({j.params.prompt, j.origin});
        if (!j.params.negative_prompt.empty() && seen_negative.insert(j.params.negative_prompt).second)
          all.push_back({j.params.negative_prompt, j.origin + " (negative prompt)"});
      }
      for (const auto& l : all) {
        size_t n = 0;
        try {
          n = t5 ? t5tok->pieces(l.text).size() + 1 : clip->encode_untruncated(l.text).size();
        } catch (const std::exception& e) {
          DP_FAIL("generate: ", l.origin, ": ", describe(e));
        }
        if (n > max_len && world.rank == 0)
          std::fprintf(stderr, "diffpipe: warning: %s: the prompt has %zu tokens; %s reads %zu (with its %s), so the "
                       "last %zu are ignored\n", l.origin.c_str(), n, t5 ? "T5" : "CLIP", max_len,
                       t5 ? "end token" : "start and end tokens", n - max_len);
      }
    }
    const auto layout = pipeline_layout(a.str("model"), model_addons(a));
    DP_CHECK(!(a.has("pipeline") && a.has("placement")), "generate: --placement and --pipeline exclude each other ",
             "(a pipeline file places every stage itself)");
    if (a.has("pipeline")) {
      placement = Placement::load(a.str("pipeline"), world.size, layout, defaults);
    } else {
      const std::string kind = a.str("placement", "pipeline");
      DP_CHECK(kind == "pipeline" || kind == "replicas", "generate: --placement must be pipeline or replicas, got '",
               kind, "'");
      placement = kind == "replicas" ? Placement::replicas(world.size, defaults.rank, layout)
                                     : Placement::derive(world.size, defaults.rank, layout);
      placement.transport = defaults.transport;
      for (auto& s : placement.stages) {
        s.spec.max_batch = defaults.stage.max_batch;
        s.spec.batching = defaults.stage.batching;
      }
      placement.batch_invariant = defaults.batch_invariant;
      placement.validate("command line");
    }
    // Up-front memory estimate for this rank's stages (CPU ranks: against MemAvailable shared by the ranks on the
    // node): a run that would run out of memory is refused now, with the numbers, instead of dying later.
    if (!a.flag("skip-memory-check") && placement.ranks.at(world.rank).device == "cpu" && !requests.empty()) {
      const auto& rs = placement.ranks.at(world.rank);
      int batch = 1;
      for (const auto& st : placement.stages)
        if (std::count(st.spec.ranks.begin(), st.spec.ranks.end(), world.rank))
          batch = std::max(batch, std::min<int>(st.spec.max_batch, static_cast<int>(requests.size())));
      const auto here = placement.stages_on(world.rank);
      // two denoiser rows a request when guided (FLUX.1: only with true CFG; its guidance scale is embedded; an LCM
      // UNet's embedded guidance is not known before its config loads, so its estimate is the guided one: an upper bound)
      const bool guided = SdModel::uses_cfg(SdModel::is_flux(a.str("model")), false, base);
      const MemoryNeed need = estimate_rank_memory(a.str("model"), here, base.width, base.height, batch,
                                                   guided, rs.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat,
                                                   model_addons(a));
      const double avail = available_host_memory() / std::max(1, world.local_size);
      std::string names;
      for (const auto& n : here) names += (names.empty() ? "" : ", ") + n;
      const double gb = 1e9;
      char buf[512];
      std::snprintf(buf, sizeof(buf),
                    "generate: rank %d (%s) needs about %.1f GB for %s images, batch %d%s: weights %.1f GB + "
                    "activations %.1f GB, but about %.1f GB of memory is available to it (MemAvailable / %d "
                    "rank(s) on this node); lower --max-batch or --width/--height, use fewer ranks per node, or "
                    "pass --skip-memory-check",
                    world.rank, names.c_str(), need.total() / gb,
                    base.width > 0 || base.height > 0 ? detail::cat(base.width, "x", base.height).c_str() : "default-size",
                    batch, guided ? " (x2 UNet rows for guidance)" : "", need.weights / gb,
                    need.activations / gb, avail / gb, std::max(1, world.local_size));
      DP_CHECK(avail <= 0 || need.total() <= avail, buf);
    }
    opts.model_dir = a.str("model");
    opts.addons = model_addons(a);
    opts.placement = placement;
    opts.timeout_s = a.number("timeout", 600);
    DP_CHECK(opts.timeout_s > 0, "generate: --timeout must be positive");
    opts.inject_failure = a.str("inject-failure");
    opts.fail_fast = a.flag("fail-fast");
    RequestMeta rm;
    rm.priority = static_cast<int>(a.integer("priority", 0));
    rm.deadline_s = a.number("deadline", 0);
    DP_CHECK(rm.deadline_s >= 0, "generate: --deadline must be >= 0 seconds");
    std::map<size_t, double> cancel_at;
    for (const auto& c : a.all("cancel-at")) {  // testing aid: REQUEST:SECONDS
      const auto colon = c.find(':');
      DP_CHECK(colon != std::string::npos, "generate: --cancel-at expects REQUEST:SECONDS, got '", c, "'");
      const size_t id = std::stoul(c.substr(0, colon));
      DP_CHECK(id < requests.size(), "generate: --cancel-at: no request ", id);
      cancel_at[id] = std::stod(c.substr(colon + 1));
    }
    {  // every request's settings against the model (configs only), before the output folder is touched
      DeviceSpec cfg_only;
      const SdModel configs = SdModel::load(a.str("model"), cfg_only, 0, opts.addons);
      std::set<std::string> checked;
      for (size_t i = 0; i < requests.size(); ++i) {
        GenerationParams p = requests[i];
        p.prompt.clear();
        p.negative_prompt.clear();
        p.seed = 0;
        if (!checked.insert(params_to_json(p).dump()).second) continue;
        try {
          const ResolvedParams r = resolve_params(configs, requests[i]);
          if (!requests[i].image_prompt.empty() && !r.image.defined())  // names the file (unless read above)
            (void)read_image_ref(requests[i].image_prompt);
        } catch (const std::exception& e) {
          DP_FAIL("generate: ", jsonl_input ? origin_of(jobs, i) + ": " : std::string(), e.what());
        }
      }
    }
    if (world.rank == 0) {  // the output folder: lock, settings, what an earlier run finished
      offline::OutputOptions oo;
      oo.dir = a.str("out", "out");
      oo.format = a.str("format", "png");
      oo.shard_size = static_cast<int>(a.integer("shard-size", 1000));
      oo.overwrite = a.flag("overwrite");
      oo.model = a.str("model");
      for (const LoraSpec& l : opts.addons.loras) oo.model += ", LoRA: " + l.path + " (" + format_number(l.scale) + ")";
      for (const LoraAdapter& l : opts.addons.adapters) oo.adapters[l.name] = l.path;
      for (const EmbeddingSpec& e : opts.addons.embeddings)
        oo.model += ", Embedding: " + e.path + (e.token.empty() ? "" : " (" + e.token + ")");
      for (size_t k = 0; k < opts.addons.controlnets.size(); ++k)
        oo.model += (k == 0 ? ", ControlNet: " : ", ") + opts.addons.controlnets[k];
      if (!opts.addons.refiner.empty()) oo.model += ", Refiner: " + opts.addons.refiner;
      if (!opts.addons.prior.empty()) oo.model += ", Prior: " + opts.addons.prior;
      if (std::any_of(layout.begin(), layout.end(), [](const PipelineStage& s) { return s.name == "prior"; }))
        oo.prior = SdModel::is_kandinsky(a.str("model")) ? offline::kPlainPrior : offline::kNoisedPrior;
      oo.img2img = SdModel::is_img2img_folder(a.str("model"));
      oo.strengths = SdModel::strength_defaults(a.str("model"));
      oo.total = requests.size();
      oo.identity = run_identity(requests, placement, opts.addons);
      sink.emplace(oo);
      for (uint64_t i = 0; i < requests.size(); ++i)
        if (!sink->finished().count(i)) pending.push_back(i);
    }
    opts.meta.assign(world.rank == 0 ? pending.size() : requests.size(), rm);
    for (size_t k = 0; world.rank == 0 && k < pending.size(); ++k)
      if (cancel_at.count(pending[k])) opts.meta[k].cancel_at_s = cancel_at[pending[k]];
  });

  int threads = static_cast<int>(a.integer("threads", 0));
  if (threads <= 0) {
    threads = mpi::threads_per_rank();
  }
  at::set_num_threads(threads);
  if (a.has("cpu-cache-mb")) {
    cpu_allocator::install(static_cast<size_t>(a.integer("cpu-cache-mb", 0)) << 20);
  }
  const bool profiling = a.flag("profile");
  profile::set_enabled(profiling);

  const std::string out_dir = a.str("out", "out");
  if (lead) {
    std::fputs(placement.describe().c_str(), stderr);
    if (!sink->finished().empty())
      std::fprintf(stderr, "diffpipe: %s: continuing an earlier run: %zu of %zu images already have a line; %zu to "
                   "make\n", out_dir.c_str(), sink->finished().size(), requests.size(), pending.size());
  }
  std::shared_ptr<Transport> transport;
  if (world.size == 1) transport = make_inproc_world(1)[0];
  else if (placement.transport == "nccl") transport = make_nccl_transport(world.local_rank);
  else transport = make_mpi_transport();

  const bool quiet = a.flag("quiet");
  std::vector<GenerationParams> todo;  // rank 0: the pending requests, in order
  for (uint64_t i : pending) todo.push_back(requests[i]);
  std::optional<offline::Progress> progress;
  if (lead) progress.emplace(requests.size(), requests.size() - pending.size());
  ListFeed feed(todo, opts.meta, [&](GeneratedImage&& gi) {
    const uint64_t index = pending.at(gi.index);
    nlohmann::json j = params_to_json(gi.params);
    j["index"] = index;
    j["status"] = gi.status;
    if (gi.status != "done") {
      j["reason"] = gi.reason;
    } else {
      j["width"] = gi.image.width;
      j["height"] = gi.image.height;
      j["latency_s"] = gi.latency_s;
      j["denoise_rank"] = gi.denoise_rank;
    }
    sink->write(index, gi, std::move(j), !quiet);  // image (tmp + rename) and its line, flushed
    progress->tick(gi.status == "done");
  }, [&](uint64_t id, int k, Image&& image) { sink->write_preview(pending.at(id), k, todo.at(id), image); });
  const auto stats = run_pipeline(opts, *transport, lead ? &feed : nullptr);
  transport.reset();
  if (profiling) print_profile(stats, placement);
  if (lead) {
    progress->end();
    sink->finish(!a.flag("no-contact-sheet") && requests.size() > 1);
    std::fprintf(stderr, "diffpipe: %zu image(s) in %.2f s (%.3f images/s) -> %s\n", stats.images, stats.wall_s,
                 stats.images / std::max(stats.wall_s, 1e-9), out_dir.c_str());
    if (stats.failed > 0)
      std::fprintf(stderr, "diffpipe: error: %zu request(s) failed (status \"failed\" in %s, with the reason)\n",
                   stats.failed, path_join(out_dir, "images.jsonl").c_str());
  }
  // every rank exits non-zero when a request failed (rank 0 knows; it tells the others)
  int failed = static_cast<int>(stats.failed);
  if (world.active && world.size > 1) DP_MPI_CHECK(MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD));
  return failed > 0 ? 1 : 0;
}

}  // namespace diffpipe::apps
