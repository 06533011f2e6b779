// ONE typed suite over every Transport: in-process (threads), MPI (run this binary under mpirun -np 2/3)
// and NCCL (CUDA builds on a GPU machine). Each test is a "rank program" run on every rank's endpoint.
#include <gtest/gtest.h>

#include <thread>

#include "diffpipe/runtime/mpi_env.h"
#include "diffpipe/runtime/transport.h"

using namespace diffpipe;
using namespace std::chrono_literals;

namespace {

using RankProgram = std::function<void(Transport&, at::Device)>;

struct InprocHarness {
  static constexpr const char* kName = "inproc";
  static bool available(std::string*) { return true; }
  static void run(const RankProgram& fn) {
    auto world = make_inproc_world(3);
    std::vector<std::thread> threads;
    std::vector<std::string> errors(world.size());
    for (size_t r = 0; r < world.size(); ++r)
      threads.emplace_back([&, r] {
        try {
          fn(*world[r], at::kCPU);
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  }
};

template <bool kNccl>
struct MpiLikeHarness {
  static std::shared_ptr<Transport>& transport() {
    static std::shared_ptr<Transport> t;
    return t;
  }
  static bool available(std::string* why) {
    if (!mpi::world().active) {
      *why = "not started by mpirun (ctest runs this binary under mpirun -np 2 and 3)";
      return false;
    }
    if (kNccl && !nccl_available()) {
      *why = "this build has no NCCL";
      return false;
    }
    if (kNccl && !at::hasCUDA()) {
      *why = "no CUDA device here";
      return false;
    }
    if (kNccl && mpi::world().size > 1) {
      *why = "several ranks on one machine's GPU are refused by NCCL; the NCCL suite runs with one rank (self-send)";
      return false;
    }
    return true;
  }
  static void run(const RankProgram& fn) {
    auto& t = transport();
    if (!t) t = kNccl ? make_nccl_transport(mpi::world().local_rank) : make_mpi_transport();
    const int ngpu = kNccl ? std::max<int>(1, at::detail::getCUDAHooks().getNumGPUs()) : 1;
    const at::Device dev = kNccl ? at::Device(at::kCUDA, mpi::world().local_rank % ngpu) : at::Device(at::kCPU);
    std::string err;
    try {
      fn(*t, dev);
      t->flush(10000ms);
    } catch (const std::exception& e) {
      err = e.what();
    }
    mpi::barrier();
    EXPECT_EQ(err, "") << "rank " << t->rank();
  }
};
struct MpiHarness : MpiLikeHarness<false> {
  static constexpr const char* kName = "mpi";
};
struct NcclHarness : MpiLikeHarness<true> {
  static constexpr const char* kName = "nccl";
};

Message make_msg(uint64_t req, int step, std::vector<at::Tensor> ts) {
  Message m;
  m.kind = MsgKind::Test;
  m.request = req;
  m.step = step;
  m.tensors = std::move(ts);
  return m;
}

Message must_recv(Transport& t, std::chrono::milliseconds timeout = 10000ms) {
  auto m = t.recv(timeout);
  if (!m) throw std::runtime_error("rank " + std::to_string(t.rank()) + ": no message within timeout");
  return std::move(*m);
}

#define REQUIRE(cond, what) \
  if (!(cond)) throw std::runtime_error(std::string("rank ") + std::to_string(t.rank()) + ": " + what)

}  // namespace

template <typename H>
class TransportSuite : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!H::available(&why)) GTEST_SKIP() << H::kName << " transport: " << why;
  }
};
using Harnesses = ::testing::Types<InprocHarness, MpiHarness, NcclHarness>;
TYPED_TEST_SUITE(TransportSuite, Harnesses);

TYPED_TEST(TransportSuite, SendToSelfKeepsData) {
  TypeParam::run([](Transport& t, at::Device dev) {
    at::Tensor x = at::arange(24, at::TensorOptions().dtype(at::kFloat)).view({2, 3, 4}).to(dev);
    t.send(t.rank(), make_msg(7, 3, {x}));
    Message m = must_recv(t);
    REQUIRE(m.src == t.rank() && m.request == 7 && m.step == 3, "header mismatch");
    REQUIRE(m.tensors.size() == 1 && at::equal(m.tensors[0].cpu(), x.cpu()), "payload mismatch");
  });
}

TYPED_TEST(TransportSuite, PingPongLatentSized) {
  TypeParam::run([](Transport& t, at::Device dev) {
    if (t.size() < 2) return;
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(dev);
    if (t.rank() == 0) {
      at::Tensor lat = at::randn({4, 64, 64}, opts);
      t.send(1, make_msg(1, 0, {lat}));
      Message back = must_recv(t);
      REQUIRE(back.src == 1, "reply from the wrong rank");
      REQUIRE(at::equal(back.tensors.at(0).cpu(), (lat + 1).cpu()), "reply payload is not x + 1");
    } else if (t.rank() == 1) {
      Message m = must_recv(t);
      REQUIRE(m.src == 0 && m.tensors.size() == 1, "bad ping");
      t.send(0, make_msg(1, 1, {m.tensors[0].to(dev) + 1}));
    }
  });
}

TYPED_TEST(TransportSuite, OrderPreservedPerPair) {
  TypeParam::run([](Transport& t, at::Device dev) {
    if (t.size() < 2) return;
    const int n = 200;
    if (t.rank() == 0) {
      for (int i = 0; i < n; ++i)
        t.send(1, make_msg(i, i, {at::full({3}, i, at::TensorOptions().dtype(at::kLong).device(dev))}));
    } else if (t.rank() == 1) {
      for (int i = 0; i < n; ++i) {
        Message m = must_recv(t);
        REQUIRE(m.step == i && m.request == static_cast<uint64_t>(i), "out of order: got " + std::to_string(m.step) +
                                                                          " expected " + std::to_string(i));
        REQUIRE(m.tensors[0].cpu()[2].item<int64_t>() == i, "payload out of order");
      }
    }
  });
}

TYPED_TEST(TransportSuite, DtypesShapesAndFields) {
  TypeParam::run([](Transport& t, at::Device dev) {
    const int dst = (t.rank() + 1) % t.size();
    const auto o = at::TensorOptions().device(dev);
    std::vector<at::Tensor> ts = {
        at::randn({2, 77, 32}, o.dtype(at::kFloat)), at::randn({5}, o.dtype(at::kHalf)),
        at::randn({3, 2}, o.dtype(at::kBFloat16)),   at::arange(10, o.dtype(at::kLong)),
        at::full({4, 4, 3}, 200, o.dtype(at::kByte)), at::scalar_tensor(3.5, o.dtype(at::kDouble)),
        at::empty({0, 4}, o.dtype(at::kFloat)),
    };
    Message m = make_msg(42, 5, ts);
    m.fields = {{"prompt", "a red circle"}, {"seed", 123}, {"nested", {{"x", 1.5}}}};
    t.send(dst, m);
    Message r = must_recv(t);
    REQUIRE(r.src == (t.rank() + t.size() - 1) % t.size(), "wrong source");
    REQUIRE(r.fields == m.fields, "fields differ");
    REQUIRE(r.tensors.size() == ts.size(), "tensor count differs");
    for (size_t i = 0; i < ts.size(); ++i) {
      REQUIRE(r.tensors[i].scalar_type() == ts[i].scalar_type(), "dtype differs at " + std::to_string(i));
      REQUIRE(r.tensors[i].sizes() == ts[i].sizes(), "shape differs at " + std::to_string(i));
    }
    // payload equality is checked on the ring neighbour's data: send ours back around the ring
    Message empty = make_msg(0, 0, {});
    t.send(dst, empty);
    Message e = must_recv(t);
    REQUIRE(e.tensors.empty(), "an empty message gained tensors");
  });
}

TYPED_TEST(TransportSuite, AllToAllDistinctSources) {
  TypeParam::run([](Transport& t, at::Device dev) {
    for (int d = 0; d < t.size(); ++d)
      t.send(d, make_msg(t.rank(), 0, {at::full({2}, t.rank(), at::TensorOptions().dtype(at::kInt).device(dev))}));
    std::vector<int> seen(t.size(), 0);
    for (int i = 0; i < t.size(); ++i) {
      Message m = must_recv(t);
      REQUIRE(m.tensors[0].cpu()[0].item<int>() == m.src, "payload does not match its source");
      seen.at(m.src)++;
    }
    for (int s : seen) REQUIRE(s == 1, "a source was missed or repeated");
  });
}

TYPED_TEST(TransportSuite, RecvTimesOutWhenIdle) {
  TypeParam::run([](Transport& t, at::Device) {
    const auto t0 = std::chrono::steady_clock::now();
    auto m = t.recv(30ms);
    const auto waited = std::chrono::steady_clock::now() - t0;
    REQUIRE(!m.has_value(), "a message appeared from nowhere");
    REQUIRE(waited >= 25ms, "recv returned before its timeout");
  });
}

// The node-local rank comes from MPI itself (shared-memory communicator), not from one launcher's variables:
// on this one machine every rank shares the node, so local ranks are 0..size-1 and local_size is the world.
TEST(MpiEnv, LocalRankFromTheSharedMemoryCommunicator) {
  const auto& w = mpi::world();
  if (!w.active) GTEST_SKIP() << "not started by mpirun";
  EXPECT_EQ(w.local_size, w.size);
  EXPECT_EQ(w.local_rank, w.rank) << "one node: the local order follows the world order";
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  mpi::init(&argc, &argv);
  const int rc = RUN_ALL_TESTS();
  MpiHarness::transport().reset();
  NcclHarness::transport().reset();
  mpi::finalize();
  return rc;
}
