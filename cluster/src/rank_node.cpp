// One rank's share of a run: its dispatcher (routes incoming messages to the local stage workers' inboxes and
// the coordinator's), its stage workers, on rank 0 the coordinator, and on a CPU rank the compute lane (the
// calling thread runs every stage's tensor work; the dispatcher then has a thread of its own).
#include <thread>

#include "coordinator.h"
#include "diffpipe/cluster/wire.h"
#include "diffpipe/runtime/error.h"
#include "stage_worker.h"

namespace diffpipe {
namespace runner {
namespace {

using namespace std::chrono_literals;
constexpr double kGraceS = 5;

class RankNode {
 public:
  RankNode(const RunOptions& o, Transport& t, const PipelineDef& p, const Clock& c)
      : ctx_(o, t, p, c), inj_(Injection::parse(o.inject_failure, o.placement.stage_names())) {}

  RunStats run(RequestFeed* feed) {
    const double t0 = ctx_.clock.now();
    const auto wall0 = std::chrono::steady_clock::now();
    const int me = ctx_.rank();
    const Placement& P = ctx_.opts.placement;
    for (int k = 0; k < static_cast<int>(P.stages.size()); ++k) {
      const auto& ranks = P.stages[k].spec.ranks;
      if (std::find(ranks.begin(), ranks.end(), me) == ranks.end()) continue;
      workers_[k] = std::make_unique<StageWorker>(ctx_, k, P.stages[k].spec, inj_);
    }
    if (me == 0) {
      DP_CHECK(feed, "rank 0 needs a request feed");
      coord_ = std::make_unique<Coordinator>(ctx_, *feed);
    }
    // On a CPU rank the stages' tensor work runs on this thread (the lane) and every other thread of the rank
    // runs its own small tensor work serially, so the process keeps one OpenMP pool (runtime/compute_lane.h).
    const bool lane = ctx_.opts.cpu_lane && me < static_cast<int>(P.ranks.size()) && P.ranks[me].device == "cpu";
    if (lane) ctx_.lane.open();
    for (auto& [k, w] : workers_)
      threads_.emplace_back([w = w.get(), lane] {
        if (lane) use_one_cpu_thread_here();  // its stage computes on the lane
        w->run();
      });
    if (coord_)
      threads_.emplace_back([this] {
        use_one_cpu_thread_here();
        try {
          coord_->run();
        } catch (const std::exception& e) {
          ctx_.set_failure(std::string("coordinator: ") + describe(e));
        }
      });
    std::string failure;
    auto drive = [&] {  // routes messages until Shutdown, then stops the rank's threads
      try {
        dispatch();
      } catch (const std::exception& e) {
        failure = describe(e);
      }
      ctx_.stop = true;
      for (auto& [k, w] : workers_) w->inbox().close();
      if (coord_) coord_->inbox().close();
      for (auto& th : threads_) th.join();
      ctx_.lane.close();
    };
    if (lane) {
      std::thread dispatcher([&] {
        use_one_cpu_thread_here();
        drive();
      });
      ctx_.lane.serve();
      dispatcher.join();
    } else {
      drive();
    }
    if (failure.empty()) failure = ctx_.failure();
    if (!failure.empty()) {
      if (me == 0)  // tell everyone, so no rank waits for work that will never come
        for (int r = 1; r < ctx_.transport.size(); ++r) {
          try {
            ctx_.send(r, wire::encode(wire::Abort{failure}));
          } catch (...) {
          }
        }
      try {
        ctx_.transport.flush(2000ms);
      } catch (...) {
      }
      throw Error(failure);
    }
    ctx_.transport.flush(std::chrono::milliseconds(static_cast<int64_t>(ctx_.opts.timeout_s * 1000)));
    RunStats st;
    st.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    (void)t0;
    st.images = ctx_.images_done;
    st.failed = ctx_.failed_requests;
    st.bytes_sent = static_cast<double>(ctx_.bytes_sent.load());
    st.peak_queued = ctx_.peak_queued;
    st.peak_active = ctx_.peak_active;
    for (auto& b : ctx_.busy_us) st.busy_s.push_back(b.load() / 1e6);
    return st;
  }

 private:
  std::string stages_here() const {
    std::string s;
    for (const auto& n : ctx_.opts.placement.stages_on(ctx_.rank())) s += (s.empty() ? "" : ", ") + n;
    return s;
  }

  // The dispatcher: routes incoming messages to the local inboxes until Shutdown.
  void dispatch() {
    const int me = ctx_.rank();
    while (true) {
      if (ctx_.failed()) throw Error(ctx_.failure());
      auto m = ctx_.transport.recv(50ms);
      if (!m) {
        // a few seconds past the coordinator's own deadline, so that its diagnosis (naming the silent rank)
        // arrives first when rank 0 is alive
        if (me != 0 && ctx_.clock.now() - ctx_.last_activity() > ctx_.opts.timeout_s + kGraceS)
          DP_FAIL("rank ", me, ": no message and no work for ", ctx_.opts.timeout_s + kGraceS,
                  " s (is rank 0 alive?); stages here: ", stages_here());
        continue;
      }
      ctx_.touch();
      switch (m->kind) {
        case MsgKind::Work: {
          const int k = m->fields.is_object() ? m->fields.value("stage", -1) : -1;
          auto it = workers_.find(k);
          DP_CHECK(it != workers_.end(), "rank ", me, " received work for stage ", k, " from rank ", m->src,
                   ", but runs only: ", stages_here());
          it->second->inbox().push(std::move(*m));
          break;
        }
        case MsgKind::StageDone:
        case MsgKind::Steps:
        case MsgKind::Result:
        case MsgKind::Failed:
        case MsgKind::Preview:
        case MsgKind::Error:
          DP_CHECK(coord_, "rank ", me, " received a ", msg_kind_name(m->kind), " message from rank ", m->src,
                   " but only rank 0 coordinates");
          coord_->inbox().push(std::move(*m));
          break;
        case MsgKind::Cancel: ctx_.cancel(wire::decode_cancel(*m).request); break;
        case MsgKind::Heartbeat: break;  // touch() above: rank 0 is alive
        case MsgKind::Shutdown: return;
        case MsgKind::Abort: DP_FAIL("rank ", me, ": stopped because the job failed: ", wire::decode_abort(*m).why);
        default:
          DP_FAIL("rank ", me, ": unexpected message kind ", static_cast<int>(m->kind), " (",
                  msg_kind_name(m->kind), ") from rank ", m->src);
      }
    }
  }

  NodeContext ctx_;
  Injection inj_;
  std::map<int, std::unique_ptr<StageWorker>> workers_;
  std::unique_ptr<Coordinator> coord_;
  std::vector<std::thread> threads_;
};

}  // namespace
}  // namespace runner

ListFeed::ListFeed(const std::vector<GenerationParams>& requests, const std::vector<RequestMeta>& meta,
                   std::function<void(GeneratedImage&&)> on_result,
                   std::function<void(uint64_t, int, Image&&)> on_preview)
    : requests_(requests), meta_(meta), on_result_(std::move(on_result)), on_preview_(std::move(on_preview)) {
  meta_.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) order_.push_back(i);
  std::stable_sort(order_.begin(), order_.end(),
                   [&](size_t a, size_t b) { return meta_[a].arrival_s < meta_[b].arrival_s; });
}

std::vector<FeedItem> ListFeed::arrivals(double now) {
  std::vector<FeedItem> out;
  for (; next_ < order_.size() && meta_[order_[next_]].arrival_s <= now; ++next_) {
    const size_t i = order_[next_];
    out.push_back({i, requests_[i], meta_[i]});
  }
  return out;
}

namespace {
void check_pipeline(const RunOptions& opts, const PipelineDef& pipeline) {
  std::string have, want;
  for (const auto& s : opts.placement.stages) have += (have.empty() ? "" : ", ") + s.name;
  for (const auto& d : pipeline) want += (want.empty() ? "" : ", ") + d.name;
  DP_CHECK(have == want, "placement: stages (", have, ") do not match the pipeline (", want, ")");
  for (const auto& d : pipeline) DP_CHECK(d.make, "pipeline: stage '", d.name, "' has no factory");
  (void)runner::Injection::parse(opts.inject_failure, opts.placement.stage_names());
}
}  // namespace

RunStats run_stages(const RunOptions& opts, Transport& transport, const PipelineDef& pipeline, RequestFeed* feed) {
  std::shared_ptr<Clock> clock = opts.clock ? opts.clock : std::make_shared<SteadyClock>();
  run_on_all_ranks_or_fail([&] { check_pipeline(opts, pipeline); });
  runner::RankNode node(opts, transport, pipeline, *clock);
  return node.run(transport.rank() == 0 ? feed : nullptr);
}

RunStats run_stages(const RunOptions& opts, Transport& transport, const PipelineDef& pipeline,
                    const std::vector<GenerationParams>& requests,
                    const std::function<void(GeneratedImage&&)>& on_result,
                    const std::function<void(const GenerationParams&)>& validate) {
  run_on_all_ranks_or_fail([&] {
    if (transport.rank() == 0 && validate)
      for (const auto& p : requests) validate(p);  // bad settings fail before any work
  });
  ListFeed feed(requests, opts.meta, on_result);
  return run_stages(opts, transport, pipeline, &feed);
}

}  // namespace diffpipe
