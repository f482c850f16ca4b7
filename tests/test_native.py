"""consortium.native: C helpers built once into the cache, or found prebuilt where no compiler is."""
from __future__ import annotations

import shutil

import pytest

from consortium import native

SOURCE = "int consortium_test_answer(void) { return 42; }\n"
build = native.library.__wrapped__   # the uncached function: each call looks again


@pytest.fixture()
def src(tmp_path):
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here")
    p = tmp_path / "answer.c"
    p.write_text(SOURCE)
    return p


def test_built_once_into_the_cache_then_reused(src, tmp_path, monkeypatch):
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path / "cache"))
    assert build(src).consortium_test_answer() == 42
    [lib] = (tmp_path / "cache" / "native").iterdir()
    assert lib.name.startswith("answer-") and lib.suffix == ".so"
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))   # reuse needs no compiler
    monkeypatch.delenv("CC", raising=False)
    assert build(src).consortium_test_answer() == 42
    src.write_text(SOURCE.replace("42", "43"))   # a changed source is built again, not reused
    assert build(src) is None


def test_prebuilt_folder_is_used_without_a_compiler(src, tmp_path, monkeypatch):
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path / "image"))
    build(src)   # what an image's build stage does
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))
    monkeypatch.delenv("CC", raising=False)
    assert build(src) is None
    monkeypatch.setenv("CONSORTIUM_NATIVE_PREBUILT", str(tmp_path / "image" / "native"))
    assert build(src).consortium_test_answer() == 42
    assert not (tmp_path / "empty").exists()
    monkeypatch.setenv("CONSORTIUM_NO_NATIVE", "1")
    assert build(src) is None


def test_a_source_that_does_not_compile_gives_none(tmp_path, monkeypatch):
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here")
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    assert build(bad) is None
    assert not list((tmp_path / "cache" / "native").glob("*.so"))


def test_every_helper_prebuilds_for_an_image(src, tmp_path, monkeypatch, capsys):
    assert native.main([str(tmp_path / "image")]) == 0
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "image").iterdir()) == sorted(native.HELPERS)
    monkeypatch.setenv("CONSORTIUM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CONSORTIUM_NATIVE_PREBUILT", str(tmp_path / "image"))
    for package, rel, opt in native.HELPERS.values():
        assert build(native._source(package, rel), opt) is not None
    assert native.main([]) == 2 and "usage" in capsys.readouterr().err
