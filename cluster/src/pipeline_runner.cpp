#include "diffpipe/cluster/pipeline_runner.h"

#include <mpi.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include "diffpipe/runtime/blocking_queue.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/torch_tensor.h"
#include "diffpipe/runtime/log.h"
#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/runtime/profile.h"
#include "diffpipe/scheduler/planner.h"
#include "diffpipe/scheduler/step_batcher.h"
#include "diffpipe/stages/stages.h"

namespace diffpipe {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

void run_on_all_ranks_or_fail(const std::function<void()>& step) {
  std::string err;
  try {
    step();
  } catch (const std::exception& e) {
    err = e.what();
  }
  if (!mpi::world().active) {
    if (!err.empty()) throw Error(err);
    return;
  }
  const int me = mpi::world().rank;
  int mine = err.empty() ? INT32_MAX : me, first = INT32_MAX;
  DP_MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (first == INT32_MAX) return;
  int len = me == first ? static_cast<int>(err.size()) : 0;
  DP_MPI_CHECK(MPI_Bcast(&len, 1, MPI_INT, first, MPI_COMM_WORLD));
  std::string msg(len, '\0');
  if (me == first) msg = err;
  DP_MPI_CHECK(MPI_Bcast(msg.data(), len, MPI_CHAR, first, MPI_COMM_WORLD));
  throw AgreedError(msg);
}

namespace {

struct Injection {
  int stage = -1;
  uint64_t request = 0;
  bool crash = false;
};

Injection parse_injection(const std::string& s) {
  Injection inj;
  if (s.empty()) return inj;
  const auto a = s.find(':');
  DP_CHECK(a != std::string::npos, "--inject-failure: expected STAGE:REQUEST[:crash], got '", s, "'");
  const std::string st = s.substr(0, a);
  std::string rest = s.substr(a + 1);
  const auto b = rest.find(':');
  if (b != std::string::npos) {
    DP_CHECK(rest.substr(b + 1) == "crash", "--inject-failure: the third part may only be 'crash'");
    inj.crash = true;
    rest = rest.substr(0, b);
  }
  for (int k = 0; k < kNumStages; ++k)
    if (st == stage_name(static_cast<StageKind>(k))) inj.stage = k;
  DP_CHECK(inj.stage >= 0, "--inject-failure: unknown stage '", st, "'");
  inj.request = std::stoull(rest);
  return inj;
}

// One rank's workers, inboxes and (on rank 0) coordinator.
class RankNode {
 public:
  RankNode(const RunOptions& o, Transport& t, const SdModel& model)
      : opts_(o), t_(t), model_(model), inj_(parse_injection(o.inject_failure)) {}

  RunStats run(const std::vector<GenerationParams>& requests, const std::function<void(GeneratedImage&&)>& on_result) {
    const auto t0 = Clock::now();
    touch();
    const int me = t_.rank();
    for (StageKind s : opts_.placement.stages_on(me)) {
      switch (s) {
        case StageKind::Encode: threads_.emplace_back([this] { guarded(StageKind::Encode, [this] { encode_loop(); }); }); break;
        case StageKind::Denoise: threads_.emplace_back([this] { guarded(StageKind::Denoise, [this] { denoise_loop(); }); }); break;
        case StageKind::Decode: threads_.emplace_back([this] { guarded(StageKind::Decode, [this] { decode_loop(); }); }); break;
        case StageKind::Upscale: threads_.emplace_back([this] { guarded(StageKind::Upscale, [this] { upscale_loop(); }); }); break;
      }
    }
    if (me == 0)
      threads_.emplace_back([&] {
        try {
          coordinate(requests, on_result);
        } catch (const std::exception& e) {
          set_failure(std::string("coordinator: ") + e.what());
        }
      });
    std::string failure;
    try {
      dispatch();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    stop_ = true;
    for (auto& q : inbox_) q.close();
    coord_inbox_.close();
    for (auto& th : threads_) th.join();
    if (failure.empty()) failure = get_failure();
    if (!failure.empty()) {
      if (me == 0)  // tell everyone, so no rank waits for work that will never come
        for (int r = 1; r < t_.size(); ++r) {
          Message a;
          a.kind = MsgKind::Abort;
          a.fields = {{"why", failure}};
          send(r, a);
        }
      try {
        t_.flush(2000ms);
      } catch (...) {
      }
      throw Error(failure);
    }
    t_.flush(std::chrono::milliseconds(static_cast<int64_t>(opts_.timeout_s * 1000)));
    RunStats st;
    st.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
    st.images = images_done_;
    for (int k = 0; k < kNumStages; ++k) st.busy_s[k] = busy_[k].load() / 1e6;
    return st;
  }

 private:
  // ---- failure bookkeeping
  void set_failure(const std::string& what) {
    std::lock_guard<std::mutex> lk(fail_mu_);
    if (failure_.empty()) failure_ = what;
    failed_ = true;
  }
  std::string get_failure() {
    std::lock_guard<std::mutex> lk(fail_mu_);
    return failure_;
  }
  void touch() { last_activity_us_ = now_us(); }
  // Every message leaves through here: its hand-over to the transport is the profile's "transport" time.
  void send(int dst, Message m) {
    profile::Scope prof(profile::Section::Transport);
    t_.send(dst, std::move(m));
  }
  static int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count();
  }

  // Runs a worker loop; an exception fails the request it was on and the whole job (issue: one failure
  // ends every rank). The error goes to the coordinator, naming rank, stage and request.
  void guarded(StageKind s, const std::function<void()>& loop) {
    try {
      loop();
    } catch (const std::exception& e) {
      const std::string what = detail::cat("rank ", t_.rank(), ", stage ", stage_name(s), ", request ",
                                           current_[static_cast<int>(s)].load(), ": ", e.what());
      DP_LOG(Error, what);
      Message m;
      m.kind = MsgKind::Error;
      m.fields = {{"what", what}};
      try {
        send(0, m);
      } catch (...) {
      }
      set_failure(what);
    }
  }

  void maybe_inject(StageKind s, uint64_t req) {
    if (inj_.stage != static_cast<int>(s) || inj_.request != req) return;
    if (inj_.crash) {
      std::fprintf(stderr, "[diffpipe] rank %d: injected crash in stage %s on request %llu\n", t_.rank(),
                   stage_name(s), static_cast<unsigned long long>(req));
      std::fflush(stderr);
      std::abort();
    }
    DP_FAIL("injected failure");
  }

  // ---- dispatcher (the rank's main thread): routes incoming messages to the local inboxes
  void dispatch() {
    const int64_t timeout_us = static_cast<int64_t>(opts_.timeout_s * 1e6);
    while (true) {
      if (failed_) throw Error(get_failure());
      auto m = t_.recv(50ms);
      if (!m) {
        if (now_us() - last_activity_us_.load() > timeout_us && t_.rank() != 0)
          DP_FAIL("rank ", t_.rank(), ": no message and no work for ", opts_.timeout_s,
                  " s (is rank 0 alive?); stages here: ", stages_here());
        continue;
      }
      touch();
      switch (m->kind) {
        case MsgKind::Encode: inbox_[0].push(std::move(*m)); break;
        case MsgKind::Denoise: inbox_[1].push(std::move(*m)); break;
        case MsgKind::Decode: inbox_[2].push(std::move(*m)); break;
        case MsgKind::Upscale: inbox_[3].push(std::move(*m)); break;
        case MsgKind::Result:
        case MsgKind::Progress:
        case MsgKind::Error: coord_inbox_.push(std::move(*m)); break;
        case MsgKind::Cancel: {
          std::lock_guard<std::mutex> lk(cancel_mu_);
          cancelled_.insert(m->request);
          break;
        }
        case MsgKind::Shutdown: return;
        case MsgKind::Abort:
          DP_FAIL("rank ", t_.rank(), ": stopped because the job failed: ", m->fields.value("why", std::string("?")));
        default: DP_FAIL("rank ", t_.rank(), ": unexpected message kind ", static_cast<int>(m->kind), " from rank ", m->src);
      }
    }
  }
  std::string stages_here() const {
    std::string s;
    for (auto k : opts_.placement.stages_on(t_.rank())) s += std::string(s.empty() ? "" : ", ") + stage_name(k);
    return s;
  }

  // Pops one message, then whatever else arrives within the batch wait, up to max_batch; cancelled requests
  // are dropped on the way.
  std::vector<Message> take_batch(BlockingQueue<Message>& q, const StageSpec& spec) {
    std::vector<Message> batch;
    auto first = q.pop(50ms);
    if (!first) return batch;
    if (!is_cancelled(first->request)) batch.push_back(std::move(*first));
    const auto deadline = Clock::now() + std::chrono::microseconds(static_cast<int64_t>(spec.batch_wait_ms * 1000));
    while (static_cast<int>(batch.size()) < spec.max_batch) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      auto n = left.count() > 0 ? q.pop(left) : q.try_pop();
      if (!n) break;
      if (!is_cancelled(n->request)) batch.push_back(std::move(*n));
    }
    return batch;
  }

  void add_busy(StageKind s, Clock::time_point since) {
    busy_[static_cast<int>(s)] += std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - since).count();
    touch();
  }

  // ---- stage workers
  bool is_cancelled(uint64_t id) {
    std::lock_guard<std::mutex> lk(cancel_mu_);
    return cancelled_.count(id) != 0;
  }
  void progress(uint64_t id, const char* event) {
    Message p;
    p.kind = MsgKind::Progress;
    p.request = id;
    p.fields = {{"event", event}};
    send(0, std::move(p));
  }
  static double meta_num(const nlohmann::json& f, const char* k, double def) {
    return f.contains("meta") ? f["meta"].value(k, def) : def;
  }

  void encode_loop() {
    TextEncodeStage stage(model_);
    const auto& spec = opts_.placement.stage(StageKind::Encode);
    while (!stop_) {
      auto batch = take_batch(inbox_[0], spec);
      if (batch.empty()) continue;
      const auto t0 = Clock::now();
      std::vector<GenerationParams> params;
      for (const auto& m : batch) {
        current_[0] = m.request;
        params.push_back(params_from_json(m.fields.at("params")));
        maybe_inject(StageKind::Encode, m.request);
      }
      std::vector<const GenerationParams*> ptrs;
      for (const auto& p : params) ptrs.push_back(&p);
      auto embs = stage.run(ptrs);
      add_busy(StageKind::Encode, t0);
      for (size_t i = 0; i < batch.size(); ++i) {
        Message out;
        out.kind = MsgKind::Denoise;
        out.request = batch[i].request;
        out.fields = batch[i].fields;
        out.tensors.push_back(embs[i].cond.contiguous());
        if (embs[i].uncond.defined()) out.tensors.push_back(embs[i].uncond.contiguous());
        progress(batch[i].request, "encoded");
        send(batch[i].fields.at("route").at(1).get<int>(), std::move(out));
      }
    }
  }

  struct Active {
    DenoiseState state;
    nlohmann::json fields;
  };

  // Continuous step-level batching (or static / single, per the placement): one UNet call per iteration over
  // the requests the StepBatcher picks; new requests join at the next iteration, finished ones leave at once.
  void denoise_loop() {
    DenoiseStage stage(model_);
    const auto& spec = opts_.placement.stage(StageKind::Denoise);
    sched::StepBatcher batcher(sched::parse_batch_mode(spec.batching), spec.max_batch);
    std::map<uint64_t, Active> states;
    const auto start = Clock::now();
    auto now_s = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
    auto admit = [&](Message m) {
      if (is_cancelled(m.request)) return;
      current_[1] = m.request;
      maybe_inject(StageKind::Denoise, m.request);
      const GenerationParams p = params_from_json(m.fields.at("params"));
      Embeddings e;
      DP_CHECK(!m.tensors.empty(), "denoise: no embeddings received");
      e.cond = m.tensors[0].to(model_.spec.device, model_.spec.dtype);
      if (m.tensors.size() > 1) e.uncond = m.tensors[1].to(model_.spec.device, model_.spec.dtype);
      const int prio = static_cast<int>(meta_num(m.fields, "priority", 0));
      states.emplace(m.request, Active{make_denoise_state(model_, p, e, m.request), std::move(m.fields)});
      batcher.add(m.request, prio, now_s());
    };
    while (!stop_) {
      if (states.empty()) {
        auto m = inbox_[1].pop(50ms);
        if (!m) continue;
        admit(std::move(*m));
      }
      while (auto m = inbox_[1].try_pop()) admit(std::move(*m));
      for (auto it = states.begin(); it != states.end();) {  // cancellation at any step
        if (is_cancelled(it->first)) {
          batcher.cancel(it->first);
          it = states.erase(it);
        } else {
          ++it;
        }
      }
      const std::vector<uint64_t> run = batcher.plan(now_s());
      if (run.empty()) continue;
      const auto t0 = Clock::now();
      std::vector<DenoiseState*> batch;
      for (uint64_t id : run) batch.push_back(&states.at(id).state);
      current_[1] = run.front();
      stage.step(batch);
      add_busy(StageKind::Denoise, t0);
      {  // one progress message per iteration: where each request is (step k of N)
        Message p;
        p.kind = MsgKind::Progress;
        p.request = run.front();
        nlohmann::json ids = nlohmann::json::array(), steps = nlohmann::json::array(), totals = nlohmann::json::array();
        for (uint64_t id : run) {
          ids.push_back(id);
          steps.push_back(states.at(id).state.step);
          totals.push_back(states.at(id).state.total_steps());
        }
        p.fields = {{"event", "steps"}, {"ids", ids}, {"steps", steps}, {"totals", totals}};
        send(0, std::move(p));
      }
      for (uint64_t id : run) {
        Active& a = states.at(id);
        if (!a.state.done()) continue;
        batcher.finished(id);
        Message out;
        out.kind = MsgKind::Decode;
        out.request = id;
        out.fields = std::move(a.fields);
        out.fields["denoise_rank"] = t_.rank();
        out.tensors.push_back(a.state.latents.contiguous());
        const int dst = out.fields.at("route").at(2).get<int>();
        progress(id, "denoised");
        send(dst, std::move(out));
        states.erase(id);
      }
    }
  }

  // The decoder and the upscaler: batches of requests whose first tensors share a shape go through `run` in one
  // call (one VAE / super-resolution call per shape); `emit` sends each request on with its row of the result.
  void grouped_loop(StageKind s, const std::function<at::Tensor(std::vector<at::Tensor>&)>& run,
                    const std::function<void(Message&&, at::Tensor)>& emit) {
    const int k = static_cast<int>(s);
    const auto& spec = opts_.placement.stage(s);
    while (!stop_) {
      auto batch = take_batch(inbox_[k], spec);
      if (batch.empty()) continue;
      std::map<std::vector<int64_t>, std::vector<size_t>> groups;
      for (size_t i = 0; i < batch.size(); ++i) groups[batch[i].tensors.at(0).sizes().vec()].push_back(i);
      for (const auto& [shape, idx] : groups) {
        const auto t0 = Clock::now();
        std::vector<at::Tensor> inputs;
        for (size_t i : idx) {
          current_[k] = batch[i].request;
          maybe_inject(s, batch[i].request);
          inputs.push_back(batch[i].tensors[0]);
        }
        at::Tensor out = run(inputs);
        add_busy(s, t0);
        for (size_t j = 0; j < idx.size(); ++j) emit(std::move(batch[idx[j]]), out[static_cast<int64_t>(j)].contiguous());
      }
    }
  }

  void decode_loop() {
    DecodeStage stage(model_);
    grouped_loop(
        StageKind::Decode,
        [&](std::vector<at::Tensor>& lat) {
          for (auto& l : lat) l = l.to(model_.spec.device, at::kFloat);
          return stage.run_uint8(lat);
        },
        [&](Message&& in, at::Tensor image) {
          Message out;
          out.request = in.request;
          out.fields = std::move(in.fields);
          out.tensors.push_back(image);
          const int up = out.fields.at("route").at(3).get<int>();  // -1: no super-resolution, the image is final
          out.kind = up >= 0 ? MsgKind::Upscale : MsgKind::Result;
          if (up >= 0) progress(out.request, "decoded");
          send(up >= 0 ? up : 0, std::move(out));
        });
  }

  // Super-resolution of decoded images (cascade models).
  void upscale_loop() {
    UpscaleStage stage(model_);
    grouped_loop(
        StageKind::Upscale, [&](std::vector<at::Tensor>& imgs) { return stage.run_uint8(at::stack(imgs)); },
        [&](Message&& in, at::Tensor image) {
          Message out;
          out.kind = MsgKind::Result;
          out.request = in.request;
          out.fields = std::move(in.fields);
          out.tensors.push_back(image);
          send(0, std::move(out));
        });
  }

  // ---- coordinator (rank 0): the Planner decides, this loop executes and feeds it events
  void coordinate(const std::vector<GenerationParams>& requests, const std::function<void(GeneratedImage&&)>& on_result) {
    const auto& P = opts_.placement;
    sched::PlannerConfig pc;
    static_assert(kNumStages == sched::kPlannedStages, "the planner plans every stage");
    for (int s = 0; s < kNumStages; ++s) pc.replicas[s] = P.stages[s].ranks;
    pc.queue_capacity = P.queue_capacity;
    pc.encode_inflight_limit = P.stage(StageKind::Encode).inflight_limit() * 4;
    pc.denoise_inflight_limit = P.stage(StageKind::Denoise).inflight_limit();
    pc.decode_inflight_limit = 1 << 30;  // decode work is bounded by what the denoisers release
    sched::Planner planner(pc);
    const size_t n = requests.size();
    auto meta = [&](size_t i) { return i < opts_.meta.size() ? opts_.meta[i] : RequestMeta{}; };
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return meta(a).arrival_s < meta(b).arrival_s; });
    std::vector<bool> cancel_sent(n, false);
    size_t next = 0, finished = 0;
    const auto start = Clock::now();
    auto now_s = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
    auto last_progress = Clock::now();
    auto report = [&](uint64_t id, const std::string& status, const std::string& reason) {
      GeneratedImage gi;
      gi.index = id;
      gi.params = requests[id];
      gi.status = status;
      gi.reason = reason;
      gi.latency_s = now_s() - meta(id).arrival_s;
      on_result(std::move(gi));
      ++finished;
    };
    auto drop = [&](const sched::Drop& d) {  // tell every rank on its route (it may be in flight between them)
      const auto& info = planner.info(d.id);
      std::set<int> ranks(info.route, info.route + kNumStages);
      for (int r : ranks) {
        if (r < 0) continue;
        Message c;
        c.kind = MsgKind::Cancel;
        c.request = d.id;
        send(r, c);
      }
      report(d.id, sched::state_name(d.state), info.reason);
    };
    while (finished < n) {
      if (stop_) return;
      const double now = now_s();
      // arrivals (open loop): a full queue rejects or holds the source back
      while (next < n && meta(order[next]).arrival_s <= now) {
        const size_t id = order[next];
        const RequestMeta m = meta(id);
        const double deadline = m.deadline_s > 0 ? m.arrival_s + m.deadline_s : 0;
        if (planner.submit(id, m.priority, requests[id].steps, now, deadline)) {
          ++next;
        } else if (opts_.reject_when_full) {
          ++next;
          report(id, "rejected", "admission queue full");
        } else {
          break;
        }
      }
      for (size_t i = 0; i < n; ++i) {
        const RequestMeta m = meta(i);
        if (m.cancel_at_s < 0 || cancel_sent[i] || now < m.cancel_at_s || !planner.known(i)) continue;
        cancel_sent[i] = true;
        if (auto d = planner.cancel(i, "cancelled by the client", now)) drop(*d);
      }
      for (const auto& d : planner.expire(now)) drop(d);
      for (const auto& a : planner.admit(now)) {
        Message m;
        m.kind = MsgKind::Encode;
        m.request = a.id;
        const RequestMeta rm = meta(a.id);
        m.fields = {{"params", params_to_json(requests[a.id])},
                    {"route", {a.route[0], a.route[1], a.route[2], a.route[3]}},
                    {"meta", {{"priority", rm.priority}}}};
        send(a.route[0], std::move(m));
      }
      auto msg = coord_inbox_.pop(10ms);
      if (!msg) {
        const double idle = std::chrono::duration<double>(Clock::now() - last_progress).count();
        if (idle > opts_.timeout_s && planner.active() > 0) {
          std::string pending;
          for (size_t i = 0; i < n; ++i) {
            if (!planner.known(i)) continue;
            const auto& r = planner.info(i);
            if (sched::is_final(r.state) || r.state == sched::RequestState::Queued) continue;
            pending += detail::cat(pending.empty() ? "" : "; ", "request ", i, " ", sched::state_name(r.state),
                                   " (encode rank ", r.route[0], ", denoise rank ", r.route[1], ", decode rank ",
                                   r.route[2], r.route[3] >= 0 ? detail::cat(", upscale rank ", r.route[3]) : "", ")");
          }
          DP_FAIL("no progress for ", opts_.timeout_s, " s; waiting on ", pending);
        }
        continue;
      }
      last_progress = Clock::now();
      if (msg->kind == MsgKind::Error) DP_FAIL(msg->fields.value("what", std::string("unknown error")));
      DP_CHECK(msg->request < n && planner.known(msg->request), "message for unknown request ", msg->request,
               " from rank ", msg->src);
      const uint64_t id = msg->request;
      // a message proves the request reached a stage; earlier events from other ranks may still be in flight
      auto reach = [&](uint64_t rid, sched::RequestState target) { return planner.reach(rid, target, now_s()); };
      if (msg->kind == MsgKind::Progress) {
        const std::string ev = msg->fields.value("event", std::string());
        if (ev == "encoded") {
          reach(id, sched::RequestState::Denoising);
        } else if (ev == "denoised") {
          reach(id, sched::RequestState::Decoding);
        } else if (ev == "decoded") {
          reach(id, sched::RequestState::Upscaling);
        } else if (ev == "steps") {
          const auto& ids = msg->fields.at("ids");
          const auto& steps = msg->fields.at("steps");
          for (size_t k = 0; k < ids.size(); ++k) {
            const uint64_t rid = ids[k].get<uint64_t>();
            if (!planner.known(rid) || !reach(rid, sched::RequestState::Denoising)) continue;
            if (planner.info(rid).state == sched::RequestState::Denoising && steps[k].get<int>() > planner.info(rid).step)
              planner.on_step(rid, steps[k].get<int>(), now_s(), msg->fields.at("totals")[k].get<int>());
          }
        }
        continue;
      }
      if (!reach(id, sched::RequestState::Decoding)) continue;  // cancelled or timed out meanwhile
      planner.on_done(id, now_s());
      GeneratedImage gi;
      gi.index = id;
      gi.params = params_from_json(msg->fields.at("params"));
      gi.denoise_rank = msg->fields.value("denoise_rank", -1);
      gi.latency_s = now_s() - meta(id).arrival_s;
      gi.image = image_from_uint8_hwc(msg->tensors.at(0));
      on_result(std::move(gi));
      ++finished;
      ++images_done_;
    }
    for (int r = 0; r < t_.size(); ++r) {
      Message s;
      s.kind = MsgKind::Shutdown;
      send(r, s);
    }
  }

  const RunOptions& opts_;
  Transport& t_;
  const SdModel& model_;
  Injection inj_;
  BlockingQueue<Message> inbox_[kNumStages];
  BlockingQueue<Message> coord_inbox_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stop_{false}, failed_{false};
  std::mutex fail_mu_;
  std::string failure_;
  std::atomic<uint64_t> current_[kNumStages] = {};
  std::atomic<int64_t> busy_[kNumStages] = {};
  std::atomic<int64_t> last_activity_us_{0};
  std::atomic<size_t> images_done_{0};
  std::mutex cancel_mu_;
  std::set<uint64_t> cancelled_;
};

}  // namespace

RunStats run_pipeline(const RunOptions& opts, Transport& transport, const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result) {
  // Each rank loads only what its stages need; a load failure anywhere fails every rank with one message.
  SdModel model;
  const int me = transport.rank();
  const RankSpec& rs = opts.placement.ranks.at(me);
  RunOptions o = opts;  // the upscale stage exists only for models with super-resolution
  run_on_all_ranks_or_fail([&] {
    o.placement.match_model(SdModel::has_super_resolution(opts.model_dir), "placement");
    DeviceSpec spec;
    if (rs.device == "cuda") {
      const int n = static_cast<int>(at::detail::getCUDAHooks().getNumGPUs());
      DP_CHECK(n > 0, "rank ", me, ": device \"cuda\" requested but no GPU is visible");
      spec.device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(mpi::world().local_rank % n));
    }
    spec.dtype = rs.dtype == "float16" ? at::kHalf : rs.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    spec.batch_invariant = opts.placement.batch_invariant;
    unsigned comps = 0;
    for (auto s : o.placement.stages_on(me))
      comps |= s == StageKind::Encode ? kTextEncoder : s == StageKind::Denoise ? kUNet : s == StageKind::Decode ? kVae : kSuperRes;
    model = SdModel::load(opts.model_dir, spec, comps);
    if (me == 0)
      for (const auto& p : requests) (void)resolve_params(model, p);  // bad settings fail before any work
  });
  RankNode node(o, transport, model);
  return node.run(requests, on_result);
}

RunStats run_pipeline(const RunOptions& opts, Transport& transport, const SdModel& model,
                      const std::vector<GenerationParams>& requests,
                      const std::function<void(GeneratedImage&&)>& on_result) {
  RunOptions o = opts;
  run_on_all_ranks_or_fail([&] {
    o.placement.match_model(model.has_super_resolution(), "placement");
    if (transport.rank() == 0)
      for (const auto& p : requests) (void)resolve_params(model, p);
  });
  RankNode node(o, transport, model);
  return node.run(requests, on_result);
}

}  // namespace diffpipe
