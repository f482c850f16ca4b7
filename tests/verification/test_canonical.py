"""The commitment (numpy, and canonical.c where it applies) against the published vectors and the
spec's edge cases."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from consortium.verification import canonical
from consortium.verification.canonical import CanonicalGrid, NonCanonicalTensor, NonFiniteActivation

from . import reference_commit

VECTORS = Path(canonical.__file__).with_name("vectors") / "commitments.json"
DATA = json.loads(VECTORS.read_text())
IDS = [v["name"] for v in DATA["vectors"]]


def test_vectors_file_is_what_the_reference_generates():
    # Guards the committed file against hand edits: it must be exactly the reference's output.
    assert DATA == json.loads(json.dumps(reference_commit.build()))


def test_vectors_cover_the_open_details():
    assert len(DATA["vectors"]) >= 20
    names = set(IDS)
    for needed in ("signed-zero", "ties-to-even", "near-32", "near-50", "near-clamp", "large", "subnormals"):
        assert needed in names


@pytest.fixture(params=["native", "numpy"])
def implementation(request, monkeypatch):
    """Runs a test with canonical.c, then with numpy alone."""
    if request.param == "numpy":
        monkeypatch.setattr(canonical, "_native_functions", lambda: None)
    elif canonical._native_functions() is None:
        if any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            pytest.fail("a C compiler is here but canonical.c did not build")
        pytest.skip("no C compiler: numpy alone")
    return request.param


@pytest.mark.parametrize("vec", DATA["vectors"], ids=IDS)
def test_implementations_match_vectors(vec, implementation):
    grid = CanonicalGrid.from_json(vec["grid"])
    x = np.array(vec["rows"], dtype=vec["input_dtype"])
    # The JSON numbers and the raw bytes describe the same input.
    assert [row.astype("<" + x.dtype.str[1:]).tobytes().hex() for row in x] == vec["rows_hex"]
    assert canonical.canonical_rows(x, grid).tolist() == vec["indices"]
    assert [d.hex() for d in canonical.commit_rows(x, grid)] == vec["digests"]
    assert [d.hex() for d in canonical.seed_commit_rows(x, grid)] == vec["seed_digests"]


def test_configs_never_share_digests():
    same = [v for v in DATA["vectors"] if v["name"].startswith("same-input-")]
    assert len(same) == 3
    assert all(v["indices"] == same[0]["indices"] for v in same)  # same indices...
    assert len({v["digests"][0] for v in same}) == 3  # ...different digests: the header differs


def test_one_commitment_per_row_in_order():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]], dtype=np.float32)
    d = canonical.commit_rows(x)
    assert len(d) == 3 and all(len(c) == 32 for c in d)
    assert d[0] == d[2] != d[1]
    assert canonical.commit_rows(x[1:2]) == [d[1]]


def test_large_arrays_commit_in_blocks_to_the_same_digests(implementation):
    """Many rows go in blocks of rows and rows wider than a block in pieces hashed one after another:
    the digests are those of the whole array in one pass (commit_canonical of its indices)."""
    rng = np.random.default_rng(5)
    for shape in [(40, 2000), (3, 70_000), (2, 3 * canonical._BLOCK_ELEMENTS + 17)]:
        x = (rng.standard_normal(shape) * 40).astype(np.float32)
        assert x.size > canonical._BLOCK_ELEMENTS
        whole = canonical.commit_canonical(canonical.canonical_rows(x))
        assert canonical.commit_rows(x) == whole == [canonical.commit_rows(r[None])[0] for r in x]
        x[-1, -2] = np.nan   # refused naming the place in the whole array, not in a block
        with pytest.raises(NonFiniteActivation, match=f"row {shape[0] - 1}, column {shape[1] - 2}"):
            canonical.commit_rows(x)


def test_several_arrays_commit_as_their_rows_in_order():
    rng = np.random.default_rng(6)
    for width, n in [(576, 16), (49_152, 3)]:   # hidden rows go together, logit rows one by one
        arrays = [(rng.standard_normal((1 + i % 2, width)) * 9).astype(np.float32) for i in range(n)]
        assert canonical.commit_arrays(arrays) == canonical.commit_rows(np.concatenate(arrays))


def test_negative_zero_equals_positive_zero():
    a = np.array([[-0.0, -0.001, -1e-40]], dtype=np.float32)
    b = np.zeros((1, 3), dtype=np.float32)
    assert canonical.commit_rows(a) == canonical.commit_rows(b)
    assert canonical.seed_commit_rows(a) == canonical.seed_commit_rows(b)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bad, implementation):
    x = np.ones((2, 5), dtype=np.float32)
    x[1, 3] = bad
    with pytest.raises(NonFiniteActivation, match="row 1, column 3"):
        canonical.commit_rows(x)
    with pytest.raises(NonFiniteActivation, match="row 1, column 3"):
        canonical.canonical_rows(x)
    with pytest.raises(NonFiniteActivation):
        canonical.seed_commit_rows(x)


def test_finite_overflow_of_float16_is_clamped_not_refused():
    x = np.array([[7e4, -3e38]], dtype=np.float32)
    assert canonical.canonical_rows(x).tolist() == [[6400, -6400]]


def test_ties_round_half_to_even():
    # y*64 = n + 0.5 exactly for these float16-representable inputs.
    y = np.array([[0.5 / 64, 1.5 / 64, 2.5 / 64, -0.5 / 64, -1.5 / 64, 99.5 / 64]], dtype=np.float32)
    assert canonical.canonical_rows(y).tolist() == [[0, 2, 2, 0, -2, 100]]


def test_clamp_is_inclusive_and_symmetric():
    g = CanonicalGrid(grid=64, clamp=100.0)
    y = np.array([[100.0, -100.0, 100.0625, -250.0]], dtype=np.float32)
    assert canonical.canonical_rows(y, g).tolist() == [[6400, -6400, 6400, -6400]]


def test_revealed_indices_must_be_canonical():
    g = CanonicalGrid()
    with pytest.raises(NonCanonicalTensor):
        canonical.commit_canonical(np.array([[6401]], dtype=np.int32), g)
    with pytest.raises(NonCanonicalTensor):
        canonical.commit_canonical(np.array([[0.5]]), g)
    with pytest.raises(NonCanonicalTensor):
        canonical.commit_canonical(np.array([1, 2], dtype=np.int32), g)


def test_grid_config_validation():
    with pytest.raises(ValueError):
        CanonicalGrid(dtype="bfloat16")
    with pytest.raises(ValueError):
        CanonicalGrid(grid=0)
    with pytest.raises(ValueError):
        CanonicalGrid(grid=64, clamp=0.1)  # 6.4 grid steps: the clamp is not on the grid
    with pytest.raises(ValueError):
        CanonicalGrid(clamp=float("inf"))
    assert CanonicalGrid(grid=16, clamp=8).clamp_steps == 128


def test_input_must_be_two_dimensional_float():
    with pytest.raises(ValueError):
        canonical.commit_rows(np.zeros(4, dtype=np.float32))
    with pytest.raises(TypeError):
        canonical.commit_rows(np.zeros((1, 4), dtype=np.int32))


def test_random_rows_agree_with_reference():
    # Beyond the fixed vectors: many random rows, including ties and values past the clamp.
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 64)) * rng.choice([0.01, 1, 30, 200], size=(6, 64))).astype(np.float32)
    x[0, :8] = (np.arange(8) + 0.5) / 64  # exact ties
    for grid in (CanonicalGrid(), CanonicalGrid(dtype="float32", grid=256, clamp=50.0)):
        got = canonical.commit_rows(x, grid)
        want = [reference_commit.digest([float(v) for v in row], grid.dtype, grid.grid, grid.clamp)[1] for row in x]
        assert got == want
        seed_got = canonical.seed_commit_rows(x, grid)
        seed_want = [reference_commit.seed_digest([float(v) for v in row], grid.dtype, grid.grid, grid.clamp)
                     for row in x]
        assert seed_got == seed_want


@pytest.mark.parametrize("g", [1, 3, 64, 100, 1000, 4095, 8191, 8192, 8193, 2**20])
def test_index_table_is_exact_for_every_float16_value(g):
    # canonical_rows looks float16 values up in a table made with float32 arithmetic (float64 above
    # a grid of 2**13); every entry must equal the float64 result.
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every = every[np.isfinite(every)].astype(np.float32)[None, :]
    gr = CanonicalGrid(grid=g, clamp=100.0)
    exact = np.clip(np.rint(every.astype(np.float16).astype(np.float64) * g), -gr.clamp_steps, gr.clamp_steps)
    table = canonical._float16_index_table(gr)
    assert (table.take(every.astype(np.float16).view(np.uint16)) == exact.astype(np.int32)).all()
    # Rows this wide take the float32 arithmetic where the grid allows it; narrow rows the table.
    assert (canonical.canonical_rows(every, gr) == exact.astype(np.int32)).all()
    assert (canonical.canonical_rows(every[:, :100], gr) == exact[:, :100].astype(np.int32)).all()


@pytest.mark.parametrize("g,clamp", [(64, 100.0), (1, 65504.0), (100, 100.0), (8192, 3.0), (1, 32767.0)])
def test_float32_rows_skip_the_float16_cast_and_agree_with_it(g, clamp, implementation):
    # float32 rows take canonical.c or numpy's arithmetic path; each must equal numpy's float16 cast
    # followed by the table, for every exponent, both signs, subnormals, and mantissas at and beside
    # each tie. (canonical.c was also checked once on all 2^32 patterns, at four of these configs.)
    rng = np.random.default_rng(g)
    exponent = np.repeat(np.arange(255, dtype=np.uint32), 600)
    mantissa = rng.integers(0, 1 << 23, size=exponent.size, dtype=np.uint32)
    near_tie = np.uint32(0x1000) + rng.integers(-2, 3, size=exponent.size).astype(np.uint32)  # 13 dropped bits
    mantissa[::3] = (mantissa[::3] & np.uint32(~0x1FFF & 0x7FFFFF)) | near_tie[::3]
    sign = rng.integers(0, 2, size=exponent.size, dtype=np.uint32) << np.uint32(31)
    x = (sign | (exponent << np.uint32(23)) | mantissa).view(np.float32)[None, :]
    gr = CanonicalGrid(grid=g, clamp=clamp)
    with np.errstate(over="ignore"):
        cast = x.astype(np.float16)
    assert (canonical.canonical_rows(x, gr) == canonical._float16_index_table(gr).take(cast.view(np.uint16))).all()
    # canonical.c writes the int16 indices hashed under small clamps directly: the same numbers.
    hashed = canonical._hash_indices(x, gr)
    if implementation == "native":
        assert hashed.dtype == (np.int16 if gr.clamp_steps <= 32767 else np.int32)
    assert (hashed == canonical.canonical_rows(x, gr)).all()
