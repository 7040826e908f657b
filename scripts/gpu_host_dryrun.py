"""Which CPU tests would fail on a GPU machine, found without one.

On a GPU machine conftest leaves TRITON_INTERPRET unset, so a test that hands CPU tensors to the Triton kernels (or
forces FASTLOSS_BACKEND=triton on them) fails there, while CI, which has the interpreter, passes it. This runs the
suite (the GPU-marked tests and test_cuda_kernels.py left out: they need the real device) with torch.cuda.is_available
patched to True and the interpreter off, and sorts the failures:

  cuda tensors   the test moves its tensors to CUDA, as it would on a GPU (or makes fake CUDA tensors, which then
                 ask for a driver): fails here only for want of one
  cpu tensors    FASTLOSS_BACKEND=triton or a Triton launch with CPU tensors, which a GPU machine refuses too:
                 such a test must skip without the interpreter (tests/_helpers.py: require_interpreter)
  other          anything else, to read

    python3 scripts/gpu_host_dryrun.py [pytest args]      # exit 1 if any test falls under "cpu tensors"
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = """import os
os.environ["TRITON_INTERPRET"] = "0"
import torch
torch.cuda.is_available = lambda: True
"""
CPU_TENSORS = ("TRITON_INTERPRET=1 for CPU tensors", "0 active drivers", "libcuda.so cannot found")
CUDA_TENSORS = ("Found no NVIDIA driver", "not compiled with CUDA", "CUDA driver version is insufficient")


def main(args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "fake_gpu_host.py"), "w") as f:
            f.write(PLUGIN)
        report = os.path.join(tmp, "report.xml")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "fake_gpu_host", "-p", "no:cacheprovider", "-m", "not gpu"]
        cmd += ["--ignore", "tests/test_cuda_kernels.py", "--tb=no", f"--junitxml={report}", *(args or ["tests"])]
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        root = ET.parse(report).getroot()
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in root.iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            message = bad.get("message") or ""
            kind = next((k for k, marks in (("cpu tensors", CPU_TENSORS), ("cuda tensors", CUDA_TENSORS))
                         if any(m in message for m in marks)), "other")  # fmt: skip
            test = re.sub(r"\[.*", "", case.get("name"))  # its parameters dropped
            name = f"{case.get('classname')}::{test}"
            brief = " ".join(message.split())[:120]
            kinds[kind][name if kind != "other" else f"{name}: {brief}"] += 1
    for kind in ("cpu tensors", "other", "cuda tensors"):
        print(f"{kind}: {sum(kinds[kind].values())} failed")
        for name, n in sorted(kinds[kind].items()):
            if kind != "cuda tensors":
                print(f"  {n:4d} {name}")
    return 1 if kinds["cpu tensors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
