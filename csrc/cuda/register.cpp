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
        "l2norm_bwd(x, dy, eps=1e-12) -> dx: the gradient of F.normalize(x, p=2, dim=1, eps) w.r.t. x given dy "
        "(dy in x's dtype or in fp32, fp64 for fp64 x; dx in x's dtype; sums as l2norm_fwd)",
        pybind11::arg("x"), pybind11::arg("dy"), pybind11::arg("eps") = 1e-12);
  m.def("batch_hard_triplet_bwd_cuda", &batch_hard_triplet_bwd_cuda,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        R"doc(batch_hard_triplet_bwd_cuda(grad_hp, grad_hn, x, sel_idx, sel_d, metric) -> dx

batch_hard_triplet_bwd for CUDA tensors (x fp16/bf16/fp32/fp64): the gradient w.r.t. x [B, D] of a loss of the mined
hp, hn given dL/dhp = grad_hp [B], dL/dhn = grad_hn [B] and batch_hard_triplet_mine's sel_idx [3, B] / sel_d [3, B],
equal to fastloss.ops.triplet.batch_hard_bwd's torch path. A stable sort groups the pairs by selected column, then
one thread block per output row gathers them: no atomics, deterministic. Sums in fp32 (fp64 for fp64 x). sel_idx
must hold indices in [-1, B) (as the mining returns them; not checked on the device).)doc",
        pybind11::arg("grad_hp"), pybind11::arg("grad_hn"), pybind11::arg("x"), pybind11::arg("sel_idx"),
        pybind11::arg("sel_d"), pybind11::arg("metric"));
}

}  // namespace fastloss
