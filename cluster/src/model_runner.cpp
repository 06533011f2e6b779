// run_pipeline for model folders: each rank loads the components of the stages placed on it, and the folder's
// registered stages (stages/model_stages.h) become the pipeline run_stages drives.
#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/stages/model_stages.h"
#include "diffpipe/stages/stages.h"

namespace diffpipe {

DeviceSpec device_spec_of(const RankSpec& rs, bool batch_invariant) {
  DeviceSpec spec;
  if (rs.device == "cuda") {
    const int n = static_cast<int>(at::detail::getCUDAHooks().getNumGPUs());
    DP_CHECK(n > 0, "rank ", mpi::world().rank, ": device \"cuda\" requested but no GPU is visible");
    spec.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(mpi::world().local_rank % n));
  }
  spec.dtype = rs.dtype == "float16" ? at::kHalf : rs.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  spec.batch_invariant = batch_invariant;
  return spec;
}

namespace {
// Each rank loads what its stages need; a load failure anywhere fails every rank with one message.
SdModel load_rank_model(const RunOptions& opts, Transport& transport, RunOptions* fitted) {
  SdModel model;
  const int me = transport.rank();
  const RankSpec& rs = opts.placement.ranks.at(me);
  *fitted = opts;
  run_on_all_ranks_or_fail([&] {
    fitted->placement.fit(pipeline_layout(opts.model_dir, opts.addons), "placement");
    const DeviceSpec spec = device_spec_of(rs, opts.placement.batch_invariant);
    model = SdModel::load(opts.model_dir, spec, components_for(fitted->placement.stages_on(me)), opts.addons);
  });
  return model;
}
}  // namespace

RunStats run_pipeline(const RunOptions& opts, Transport& transport, const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result) {
  RunOptions o;
  const SdModel model = load_rank_model(opts, transport, &o);
  return run_pipeline(o, transport, model, requests, on_result);
}

RunStats run_pipeline(const RunOptions& opts, Transport& transport, RequestFeed* feed) {
  RunOptions o;
  const SdModel model = load_rank_model(opts, transport, &o);
  return run_pipeline(o, transport, model, feed);
}

RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model, RequestFeed* feed) {
  RunOptions o = opts;
  run_on_all_ranks_or_fail([&] { o.placement.fit(pipeline_layout(model.dir, model.addons), "placement"); });
  const PipelineDef pipeline = model_pipeline(model, o.placement.stage_names());
  return run_stages(o, transport, pipeline, feed);
}

RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model,
                      const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result) {
  run_on_all_ranks_or_fail([&] {  // bad settings fail before any work
    if (transport.rank() == 0)
      for (const auto& p : requests) (void)resolve_params(model, p);
  });
  ListFeed feed(requests, opts.meta, on_result);
  return run_pipeline(opts, transport, model, &feed);
}

}  // namespace diffpipe
