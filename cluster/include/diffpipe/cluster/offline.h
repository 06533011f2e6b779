// Offline generation at scale (`generate` with a prompts file): the job's input (plain prompts or JSONL with
// per-line settings), per-image seeds, and the output folder as a crash-safe, resumable record:
//   - every image is written under a temporary name and renamed; images.jsonl gets one line per finished or
//     failed image, appended and flushed as it happens (a cut last line is repaired on the next run);
//   - a rerun of the same command skips what has a line and produces exactly the rest; a rerun with other
//     settings is refused (run.json records them) unless `overwrite`;
//   - one job at a time per folder (an exclusive lock naming the holder's pid);
//   - images go to folders of at most `shard_size` files (flat when the run fits in one), or to webdataset tar
//     shards (NNNNN.tar of KEY.png + KEY.json) written whole and renamed when complete;
//   - PNGs carry their provenance in a "parameters" text chunk, as image tools read it;
//   - memory does not grow with the number of images (the contact sheet is a bounded sample read back at the
//     end).
// Rank 0 owns the sink; not thread-safe (the coordinator's thread calls it).
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/image.h"
#include "diffpipe/runtime/text.h"
#include "diffpipe/stages/request.h"
#include <nlohmann/json.hpp>

namespace diffpipe::offline {

struct JobLine {
  GenerationParams params;  // seed: only meaningful when seed_set
  int images = 1;
  bool seed_set = false;
  std::string origin;  // "file:line" or "--prompt #k"
};

// A request's ControlNet fields (JSONL: control_image, control_scale, control_start, control_end; HTTP:
// control_image, controlnet_conditioning_scale, control_guidance_start/end), each absent (nullptr), a value or a list
// with one entry per ControlNet of the run (--controlnet order; a null image leaves that one out): `controls` (the
// defaults) updated. An image alone is the first ControlNet's; a number alone applies to every entry with an image;
// a list must have one entry per image. Throws naming `where` and the key.
struct ControlFieldValues {
  const nlohmann::json *image = nullptr, *scale = nullptr, *start = nullptr, *end = nullptr;
};
struct ControlFieldNames {
  std::string image, scale, start, end;
};
std::vector<ControlInput> control_fields(std::vector<ControlInput> controls, const ControlFieldValues& v,
                                         const ControlFieldNames& names, const std::string& where);

// A request's "lora" field (JSONL, HTTP): "NAME[:SCALE],..." as it is, or an object {"NAME": SCALE, ...} in that
// form; throws naming `where` for anything else.
std::string lora_field(const nlohmann::json& v, const std::string& where);

// Plain lines take `base` and `images`; JSONL lines (a .jsonl file, one object a line) may set prompt (required),
// negative_prompt, seed, steps, guidance, sampler, width, height, clip_skip, images. Errors name file:line and key.
std::vector<JobLine> parse_job_lines(const std::vector<PromptLine>& lines, bool jsonl, const GenerationParams& base,
                                     int images);
// Images of a line together, in input order. The n-th image of the run uses base_seed + n, unless its line sets a
// seed s: then its k-th image uses s + k.
std::vector<GenerationParams> expand_job(const std::vector<JobLine>& lines, uint64_t base_seed);

// The A1111-style "parameters" text: prompt, negative prompt, then "Steps: …, Sampler: …, CFG scale: …, Seed: …,
// Size: WxH, Model: …".
// The diffusion prior of a run's model, whose settings join the parameters: Stable unCLIP's (its image embedding
// noised to noise_level) or Kandinsky 2.2's (no noise level).
enum PriorKind : int { kNoPrior = 0, kNoisedPrior = 1, kPlainPrior = 2 };
std::string parameters_text(const GenerationParams& p, int width, int height, const std::string& model,
                            int prior = kNoPrior, bool img2img = false, const StrengthDefaults& strengths = {},
                            const std::map<std::string, std::string>& adapters = {});

struct OutputOptions {
  std::string dir;
  std::string format = "png";  // png | webdataset
  int shard_size = 1000;       // files per folder, or samples per tar shard
  bool overwrite = false;
  std::string model;           // for run.json and the parameters chunk
  int prior = kNoPrior;        // the model's diffusion prior (PriorKind): its settings join the chunk
  bool img2img = false;        // an image_prompt is image-to-image's starting image (SD, SDXL, SD3): strength joins it
  StrengthDefaults strengths;  // the folder's default strengths
  std::map<std::string, std::string> adapters;  // per-request LoRA adapters by name: their files, for the PNG text
  std::string identity;        // everything that decides the pixels (compared with run.json on a rerun)
  size_t total = 0;            // images in the run
  int sheet_max = 64;          // contact sheet: at most this many images (the lowest indices done)
};

class OutputSink {
 public:
  // Locks the folder, checks or writes run.json, reads images.jsonl (repairing a cut last line). Throws naming
  // the folder when another job holds it or the settings differ.
  explicit OutputSink(const OutputOptions& o);
  ~OutputSink();
  OutputSink(const OutputSink&) = delete;
  OutputSink& operator=(const OutputSink&) = delete;

  // Indices that already have a line (done or failed): a rerun skips them.
  const std::set<uint64_t>& finished() const { return finished_; }
  size_t done_before() const { return done_before_; }
  // Writes the image (when done) and its line. `index` is the run-wide index; `line` the JSON fields to record.
  void write(uint64_t index, const GeneratedImage& gi, nlohmann::json line, bool echo_stdout);
  // A partial image of `index` (png format: IMAGE-preview-K.png beside the image; webdataset: not kept).
  void write_preview(uint64_t index, int k, const GenerationParams& p, const Image& image);
  // Completes open shards and writes the contact sheet from a bounded sample. Returns lines written by this run.
  void finish(bool contact_sheet);
  std::string file_for(uint64_t index, uint64_t seed) const;  // png format: where image `index` goes

 private:
  void lock();
  void check_run_json();
  void read_lines();
  void append_line(const std::string& line);
  void flush_shard(int64_t shard, bool complete);
  OutputOptions o_;
  int lock_fd_ = -1;
  int jsonl_fd_ = -1;
  std::set<uint64_t> finished_;
  size_t done_before_ = 0;
  std::map<uint64_t, std::string> done_files_;  // those indices' files
  struct Shard {  // webdataset: a tar shard being written (NNNNN.tar.part); its lines wait for the rest of it
    int fd = -1;
    std::vector<std::string> lines;
    size_t expected = 0;  // samples in this shard
  };
  std::map<int64_t, Shard> shards_;
};

// Progress on stderr (rank 0): on a terminal one live line with images done / total, images/s and ETA;
// otherwise a plain line every `every_s` seconds.
class Progress {
 public:
  Progress(size_t total, size_t already, double every_s = 5);
  void tick(bool done);  // one image finished (done or not)
  void end();

 private:
  void print(bool final);
  size_t total_, already_, count_ = 0, failed_ = 0;
  double every_s_, last_ = -1e9;
  bool tty_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace diffpipe::offline
