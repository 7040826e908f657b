// fastloss._C: CPU kernels for the fused ops (and CUDA kernels where built). Python registers them with
// torch.library in fastloss/ops; this module only exposes plain functions.
#include "bf16_gemm.h"
#include "fastloss.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastloss native kernels";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#ifdef FASTLOSS_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    // what the CPU MNRL op's bf16 GEMMs need (bf16_gemm.h; FASTLOSS_NATIVE_BF16_GEMM=auto takes them where both hold)
    info["mkl_bf16_gemm"] = fastloss::bf16_gemm_linked();
    info["amx_bf16"] = fastloss::cpu_has_amx_bf16();
    return info;
  });
  m.def("bf16_gemm_enabled", &fastloss::bf16_gemm_enabled,
        "Whether the CPU MNRL op multiplies bf16 inputs in bf16 GEMMs now (FASTLOSS_NATIVE_BF16_GEMM; a bad value "
        "raises)");
  fastloss::register_mnrl(m);
  fastloss::register_triplet(m);
  fastloss::register_triplet_streamed(m);
  fastloss::register_cosent(m);
#ifdef FASTLOSS_WITH_CUDA
  fastloss::register_cuda(m);
#endif
}
