// CoSENT / AnglE on CPU (fastloss.ops.cosent's native path). Filled in by the CoSENT native kernel work.
#include "fastloss.h"

namespace fastloss {

void register_cosent(pybind11::module_& m) { (void)m; }

}  // namespace fastloss
