// Batch-all and batch-semi-hard triplet losses on CPU (fastloss.ops.triplet's native streamed path). Filled in by
// the streamed-triplet native kernel work.
#include "fastloss.h"

namespace fastloss {

void register_triplet_streamed(pybind11::module_& m) { (void)m; }

}  // namespace fastloss
