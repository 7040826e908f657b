// Python bindings of the CUDA kernels (compiled only in a CUDA build: setup.py adds csrc/cuda/ then).
#include "cuda/kernels.h"
#include "fastloss.h"

namespace fastloss {

void register_cuda(pybind11::module_& m) {
  m.def("l2norm_fwd", &l2norm_fwd_cuda, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "l2norm_fwd(x, eps=1e-12) -> y: F.normalize(x, p=2, dim=1, eps) of a CUDA [rows, dim] tensor "
        "(fp16/bf16/fp32/fp64; sums in fp32, fp64 for fp64)",
        pybind11::arg("x"), pybind11::arg("eps") = 1e-12);
  m.def("l2norm_bwd", &l2norm_bwd_cuda, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "l2norm_bwd(x, dy, eps=1e-12) -> dx: the gradient of F.normalize(x, p=2, dim=1, eps) w.r.t. x given dy",
        pybind11::arg("x"), pybind11::arg("dy"), pybind11::arg("eps") = 1e-12);
}

}  // namespace fastloss
