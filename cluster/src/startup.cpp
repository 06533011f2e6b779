#include <mpi.h>

#include "diffpipe/cluster/pipeline_runner.h"
#include "diffpipe/runtime/error.h"
#include "diffpipe/runtime/mpi_env.h"

namespace diffpipe {

void run_on_all_ranks_or_fail(const std::function<void()>& step) {
  std::string err;
  try {
    step();
  } catch (const std::exception& e) {
    err = describe(e);
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

}  // namespace diffpipe
