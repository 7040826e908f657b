"""Test set-up shared by every test module.

- Without CUDA, Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1), set here before
  anything imports triton.
- Fresh floating allocations made with torch.empty / empty_like are poisoned with NaN (as fla's tests do), on CPU
  and CUDA alike, so a kernel that leaves part of its output unwritten fails loudly (not in tests marked
  ``unpoisoned``, which count the ops a call dispatches).
- torch.compile's on-disk caches do not notice a changed custom op (pytorch/pytorch#144344, #160472): a graph
  compiled by an earlier checkout, with an op's old schema, would be reused. Each session compiles into its own
  directory (unless TORCHINDUCTOR_CACHE_DIR is set), removed at the end.
"""

import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _COMPILE_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastloss-tests-inductor-")
else:
    _COMPILE_CACHE = None

import pytest  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _poisoned(factory):
    def wrapper(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() and out.device.type != "meta" and not out.requires_grad:
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(request, monkeypatch):
    if request.node.get_closest_marker("unpoisoned"):  # its fill would count as a launch
        yield
        return
    monkeypatch.setattr(torch, "empty", _poisoned(_empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(_empty_like))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    if _COMPILE_CACHE is not None:
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
