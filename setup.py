"""Build script for fastloss's optional native extension ``fastloss._C``.

Environment flags (see the README's table):
  FASTLOSS_BUILD_EXT=0     skip the extension entirely (pure Python + Triton)
  FASTLOSS_BUILD_CUDA=auto compile csrc/cuda/ (*.cu, *.cpp) when a CUDA toolkit (CUDA_HOME, else nvcc on PATH,
                           else /usr/local/cuda) and a CUDA build of torch exist (default);
                      =0   never; =1 always (fails loudly if it cannot)
  TORCH_CUDA_ARCH_LIST     GPU architectures of the CUDA build (default "8.0;9.0": A100, H100)
  FASTLOSS_EXT_STRICT=1    a failed extension build fails the install instead of falling back to Python
  MAX_JOBS                 parallel compile jobs (default: from cores and memory)
  FASTLOSS_BUILD_CACHE     directory of built extensions, reused when every input of the build is the same (default
                           $XDG_CACHE_HOME/fastloss/ext, else ~/.cache/fastloss/ext); =0 never reuse or store
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # A torch translation unit peaks near 2 GiB in the compiler.
    return str(max(1, min(cores, int(mem_gib // 2))))


def _find_cuda_home() -> str | None:
    """The toolkit that nvcc belongs to: CUDA_HOME / CUDA_PATH, else the toolkit of nvcc on PATH, else
    /usr/local/cuda. torch's own guess can land on /usr/local (an nvcc wrapper script), which has no headers."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


# How many built extensions the cache keeps (the most recently used; one with the CUDA sources is ~40 MB).
CACHE_ENTRIES = 4
# The environment a build reads besides its sources: compilers and their flags, the CUDA build's settings.
_BUILD_ENV = (
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "NVCC_FLAGS",
    "NVCC_APPEND_FLAGS",
    "NVCC_PREPEND_FLAGS",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
    "FASTLOSS_BUILD_CUDA",
)


def cache_dir() -> str | None:
    """The build cache's directory (FASTLOSS_BUILD_CACHE), None where it is switched off."""
    value = os.environ.get("FASTLOSS_BUILD_CACHE", "").strip()
    if value.lower() in ("0", "false", "no", "off"):
        return None
    if value:
        return value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastloss", "ext")


def _tool_version(tool: str) -> str:
    try:
        done = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"
    return done.stdout + done.stderr


def build_key(root: str, build_cuda: bool) -> str:
    """A digest of everything the extension's bytes depend on, and nothing of where they live: the native sources
    (every file under csrc/), this script (the flags), the interpreter, torch (its headers and ABI), the compilers'
    versions and the environment variables a build reads. Paths are left out, so a fresh clone of the same commit,
    or a virtual environment of the same torch, finds the extension its twin built."""
    digest = hashlib.sha256()

    def add(label: str, value: str | bytes) -> None:
        data = value if isinstance(value, bytes) else value.encode()
        digest.update(f"{label}:{len(data)}:".encode() + data)

    for path in sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                add(os.path.relpath(path, root).replace(os.sep, "/"), f.read())
    with open(os.path.join(root, "setup.py"), "rb") as f:
        add("setup.py", f.read())
    add("python", f"{sys.version} {sys.platform} {sysconfig.get_config_var('EXT_SUFFIX')}")
    add("python-flags", f"{sysconfig.get_config_var('CC')} {sysconfig.get_config_var('CFLAGS')}")
    import torch

    add(
        "torch",
        f"{torch.__version__} {torch.version.git_version} {torch.version.cuda} {torch._C._GLIBCXX_USE_CXX11_ABI}",
    )
    for name in _BUILD_ENV:
        add(f"env {name}", os.environ.get(name, "<unset>"))
    add("c++", _tool_version(os.environ.get("CXX", "c++")))
    if build_cuda:
        from torch.utils import cpp_extension

        add("nvcc", _tool_version(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    else:
        add("nvcc", "CPU-only build")
    return digest.hexdigest()[:32]


def restore(directory: str, key: str, target: str) -> bool:
    """Copies the cached extension of `key` to `target`; False where there is none."""
    cached = os.path.join(directory, key, os.path.basename(target))
    if not os.path.isfile(cached):
        return False
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    shutil.copy2(cached, target)
    os.utime(os.path.join(directory, key))  # most recently used
    return True


def store(directory: str, key: str, built: str, keep: int = CACHE_ENTRIES) -> None:
    """Adds the extension just built under `key` (written whole, then renamed: a reader never sees a partial file),
    then drops all but the `keep` most recently used entries."""
    entry = os.path.join(directory, key)
    os.makedirs(entry, exist_ok=True)
    partial = os.path.join(entry, f".{os.path.basename(built)}.{os.getpid()}")
    shutil.copy2(built, partial)
    os.replace(partial, os.path.join(entry, os.path.basename(built)))
    os.utime(entry)
    entries = [os.path.join(directory, name) for name in os.listdir(directory)]
    entries = sorted((e for e in entries if os.path.isdir(e)), key=os.path.getmtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _extensions():
    if _flag("FASTLOSS_BUILD_EXT", "1") in ("0", "false", "no") or sys.platform == "darwin":
        print("fastloss: skipping the native extension (FASTLOSS_BUILD_EXT=0 or macOS)")
        return [], {}
    want_cuda = _flag("FASTLOSS_BUILD_CUDA", "auto")
    cuda_home = _find_cuda_home() if want_cuda in ("auto", "1") else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read once, when torch.utils.cpp_extension is imported
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("fastloss: torch is not importable at build time; install torch first and use --no-build-isolation")
        return [], {}

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_dir = os.path.join("csrc", "cuda")
    cuda_sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp")))
    # No -std flag: torch.utils.cpp_extension adds the standard this torch's headers need (C++17 or C++20).
    # -ffp-contract=off: every product is rounded where the source rounds it, so a logit is the same number in the
    # row max and in exp(logit - max) (the MNRL kernel's loss and p - 1 rely on it), and results do not depend on
    # which SIMD clone (FMA or not) the CPU picks. No measurable cost: the GEMMs dominate.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    import torch

    have_cuda = (
        cpp_extension.CUDA_HOME is not None
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h"))
        and torch.version.cuda is not None
    )
    if want_cuda == "1" and not have_cuda:
        raise RuntimeError("FASTLOSS_BUILD_CUDA=1 but CUDA_HOME or a CUDA build of torch is missing")
    build_cuda = bool(cuda_sources) and have_cuda and want_cuda in ("auto", "1")

    if build_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = cpp_extension.CUDAExtension(
            "fastloss._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("FASTLOSS_WITH_CUDA", "1")],
            # no --use_fast_math: the kernels keep IEEE division/sqrt and denormals (F.normalize's eps semantics)
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastloss._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    kind = f"CPU + CUDA {os.environ['TORCH_CUDA_ARCH_LIST']}" if build_cuda else "CPU"
    print(f"fastloss: building fastloss._C ({kind}), MAX_JOBS={os.environ['MAX_JOBS']}")

    class BuildExt(cpp_extension.BuildExtension):
        """Falls back to pure Python when the compiler fails, unless FASTLOSS_EXT_STRICT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
                if _flag("FASTLOSS_EXT_STRICT", "0") in ("1", "true", "yes"):
                    raise
                print(f"fastloss: WARNING: native extension build failed ({exc}); using the Python backends")

        def build_extension(self, ext):
            # pip builds an editable install in a fresh temporary directory, so without this every install compiles
            # every source (minutes on 2 cores) however little changed.
            directory, target = cache_dir(), self.get_ext_fullpath(ext.name)
            key = None
            if directory:
                try:
                    key = build_key(ROOT, build_cuda)
                    if restore(directory, key, target):
                        print(f"fastloss: fastloss._C from the build cache ({os.path.join(directory, key)})")
                        return
                except OSError as exc:
                    print(f"fastloss: build cache unreadable ({exc}); compiling")
            super().build_extension(ext)
            if key:
                try:
                    store(directory, key, target)
                except OSError as exc:
                    print(f"fastloss: could not store the build in the cache ({exc})")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


if __name__ == "__main__":  # as setuptools runs it; tests import the cache's functions
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
