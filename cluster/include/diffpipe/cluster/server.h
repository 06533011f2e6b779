// The HTTP front end of `diffpipe serve`: an HTTP/1.1 server on Boost.Asio/Beast (rank 0) that speaks the
// OpenAI Images API and feeds the coordinator as a RequestFeed.
//   POST /v1/images/generations  {prompt, n, size "WxH", response_format b64_json, output_format png, user,
//                                 negative_prompt, num_inference_steps, guidance_scale, seed, sampler, width, height,
//                                 stream, partial_images 0-3, image, strength, noise_level}
//     -> {created, data: [{b64_json}], usage}; errors {"error": {message, type, param, code}}
//     stream: true -> server-sent events image_generation.partial_image (the denoised estimate, decoded by the
//     decode stage after final images) then image_generation.completed
//   POST /v1/images/edits        the same fields with "image" (the PNG to start from: image-to-image on SD/SDXL, the
//                                x4 upscaler's input, Stable unCLIP's image prompt) and "strength"; a multipart form
//                                (the image as a file, as the OpenAI client's images.edit sends it) or JSON (base64)
//   POST /v1/images/variations   "image" alone (no prompt): Stable unCLIP image variations (images.create_variation)
//   GET /healthz (200 once the pipeline runs on every rank, else 503), GET /v1/models, GET /metrics (Prometheus)
// A full admission queue answers 429 with Retry-After; a request past its deadline 504; a request that fails in
// a stage 500 for itself alone; a client that disconnects has its requests cancelled in every stage. Bad input
// (malformed JSON, a missing prompt, an unsupported size, n out of range, an oversized body, a slow client) gets
// 400/413/408 with the field named, and the server goes on. stop() stops accepting, lets in-flight requests finish,
// then closes the feed, so every rank exits cleanly. Thread-safety: the coordinator's thread calls the feed side;
// the server's own threads run the sessions; they meet under one mutex.
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "diffpipe/cluster/pipeline_runner.h"

namespace diffpipe {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                 // 0: any free port (port() says which)
  std::string model_name = "diffpipe";
  int max_n = 8;                   // images per request
  size_t max_body = 16 << 20;      // bytes; more is 413 (uploaded images travel in the body)
  double read_timeout_s = 10;      // a client slower than this to send its request gets 408
  double request_timeout_s = 0;    // per image, from arrival; 0 = none (else 504 past it)
  int threads = 4;                 // server threads (the model runs elsewhere); none ever blocks
  GenerationParams defaults;       // steps, guidance, sampler, size when the request leaves them out
  bool image_variations = false;   // the model makes variations of an image alone (/v1/images/variations)
  // What requests may choose, listed on the model of GET /v1/models: LoRA adapter names ("lora"), textual-inversion
  // tokens, the number of ControlNets (control_image entries).
  std::vector<std::string> lora_adapters, embedding_tokens;
  int controlnets = 0;
  bool ip_adapter = false;  // the run has an IP-Adapter (listed in /v1/models)
  std::string refiner;      // the run's SDXL refiner folder, "" = none (listed in /v1/models)
  // Checks one image's settings against the model (throws naming the field); run on the request's thread.
  std::function<void(const GenerationParams&)> validate;
  // Prompt length in tokens, for `usage`.
  std::function<int(const std::string&)> count_tokens;
};

class ImageServer : public RequestFeed {
 public:
  explicit ImageServer(ServerOptions o);
  ~ImageServer() override;
  void start();   // binds and listens (throws naming host:port), serves on its own threads
  void stop();    // graceful: no new connections, in-flight requests finish, then the feed closes
  int port() const;
  bool stopping() const;

  // RequestFeed (the coordinator's thread)
  std::vector<FeedItem> arrivals(double now) override;
  std::vector<uint64_t> cancellations() override;
  bool closed() const override;
  void deliver(GeneratedImage&& gi) override;
  void preview(uint64_t id, int index, Image&& image) override;
  void status(size_t queued, size_t active) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffpipe
