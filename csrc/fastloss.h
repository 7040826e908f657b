// Shared declarations of the fastloss._C extension: each op file defines one register_* function.
#pragma once
#include <torch/extension.h>

namespace fastloss {
void register_mnrl(pybind11::module_& m);
void register_triplet(pybind11::module_& m);
#ifdef FASTLOSS_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif
}  // namespace fastloss
