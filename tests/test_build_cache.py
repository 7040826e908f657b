"""setup.py's build cache: a built fastloss._C is reused only where every input of its build is the same."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("fastloss_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; setup() runs only as __main__
    return module


def _tree(root: Path) -> Path:
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "csrc" / "ops.cpp").write_text("int f() { return 1; }\n")
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "setup.py").write_text("# flags\n")
    return root


def test_key_follows_the_sources_flags_and_environment_not_the_path(setup_module, tmp_path, monkeypatch):
    for name in setup_module._BUILD_ENV:
        monkeypatch.delenv(name, raising=False)
    a = _tree(tmp_path / "a")
    key = setup_module.build_key(str(a), build_cuda=False)
    assert setup_module.build_key(str(a), build_cuda=False) == key
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert setup_module.build_key(str(b), build_cuda=False) == key  # a fresh clone of the same commit

    (b / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() { }\n")
    changed_source = setup_module.build_key(str(b), build_cuda=False)
    (b / "csrc" / "new.h").write_text("")
    added_header = setup_module.build_key(str(b), build_cuda=False)
    (a / "setup.py").write_text("# other flags\n")
    changed_flags = setup_module.build_key(str(a), build_cuda=False)
    (a / "setup.py").write_text("# flags\n")
    monkeypatch.setenv("CXXFLAGS", "-march=native")
    changed_env = setup_module.build_key(str(a), build_cuda=False)
    monkeypatch.delenv("CXXFLAGS")
    assert setup_module.build_key(str(a), build_cuda=False) == key
    keys = [key, changed_source, added_header, changed_flags, changed_env]
    assert len(set(keys)) == len(keys), keys


def test_store_then_restore_and_keep_the_most_recent(setup_module, tmp_path):
    cache = tmp_path / "cache"
    built = tmp_path / "build" / "_C.so"
    built.parent.mkdir()
    target = tmp_path / "install" / "fastloss" / "_C.so"
    assert not setup_module.restore(str(cache), "k0", str(target))  # nothing cached yet
    assert not target.exists()

    for i in range(4):
        built.write_bytes(bytes([i]) * 1000)
        setup_module.store(str(cache), f"k{i}", str(built), keep=3)
        os.utime(cache / f"k{i}", (1000 + i, 1000 + i))  # k3 the most recently used
    assert sorted(p.name for p in cache.iterdir()) == ["k1", "k2", "k3"]  # k0, the oldest of 4, dropped
    assert [p.name for p in (cache / "k1").iterdir()] == ["_C.so"]  # no partial file left

    assert setup_module.restore(str(cache), "k1", str(target))
    assert target.read_bytes() == bytes([1]) * 1000
    assert os.path.getmtime(cache / "k1") > 1003  # restoring made k1 the most recent: it survives the next store
    built.write_bytes(b"new")
    setup_module.store(str(cache), "k4", str(built), keep=3)
    assert sorted(p.name for p in cache.iterdir()) == ["k1", "k3", "k4"]


def test_cache_dir_from_the_environment(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLOSS_BUILD_CACHE", str(tmp_path / "here"))
    assert setup_module.cache_dir() == str(tmp_path / "here")
    for off in ("0", "off", "false", "no"):
        monkeypatch.setenv("FASTLOSS_BUILD_CACHE", off)
        assert setup_module.cache_dir() is None
    monkeypatch.delenv("FASTLOSS_BUILD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert setup_module.cache_dir() == str(tmp_path / "xdg" / "fastloss" / "ext")
