"""Native kernels (edgelm.native) against their numpy references (edgelm.native_ref).

Every confidence test runs twice, on the CPU's SIMD path and on the forced
scalar path. Tolerances: float outputs within rel 1e-5 of the float64
reference (entropy and margin also get an absolute floor for values near 0);
argmax and every acceptance kernel must match exactly.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm import native
from edgelm import native_ref as ref
from edgelm.errors import NativeError

pytestmark = pytest.mark.skipif(
    not native.available(), reason="edgelm._native not built: python native/build_native.py"
)

RTOL = 1e-5
ENTROPY_ATOL = 1e-6  # H = log s - t/s loses ~1e-7 absolute to cancellation near one-hot rows
MARGIN_ATOL = 1e-7
# around the 8-lane AVX2 and 4-lane NEON loops and their tails, up to real vocab sizes
LENGTHS = [1, 7, 8, 9, 31, 32, 33, 1000, 32000, 151936]


@pytest.fixture(params=["simd", "scalar"])
def path(request):
    if request.param == "scalar":
        with native.force_scalar():
            yield "scalar"
    else:
        yield native.simd_path()


def assert_confidence_close(got, want):
    np.testing.assert_allclose(got.max_prob, want.max_prob, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got.entropy, want.entropy, rtol=RTOL, atol=ENTROPY_ATOL)
    np.testing.assert_allclose(got.margin, want.margin, rtol=RTOL, atol=MARGIN_ATOL)
    np.testing.assert_array_equal(got.argmax, want.argmax)


# ----------------------------------------------------------------------------
# dispatch


def test_simd_path_matches_cpu():
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text()
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert native.simd_path() == "neon"
    elif " avx2" in flags and " fma" in flags:
        assert native.simd_path() == "avx2"
    else:
        assert native.simd_path() in ("scalar", "avx2", "neon")


def test_native_sources_compile_for_aarch64():
    """Every kernel (NEON table included) cross-compiles for aarch64 with -Wall -Wextra -Werror."""
    pytest.importorskip("ziglang")  # the test extra installs it; a GNU cross gcc would do as well
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_native_aarch64.sh"
    r = subprocess.run(["bash", str(script)], env={**os.environ, "PYTHON": sys.executable, "CC_AARCH64": "none"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: native/*.c compiles for aarch64" in r.stdout


def test_force_scalar_switches_and_restores():
    before = native.simd_path()
    with native.force_scalar():
        assert native.simd_path() == "scalar"
        with native.force_scalar():  # nesting keeps scalar until the outer exit
            pass
        assert native.simd_path() == "scalar"
    assert native.simd_path() == before
    native.set_simd(False)
    assert native.simd_path() == "scalar"
    native.set_simd(True)
    assert native.simd_path() == before


def test_missing_extension_raises_native_error(monkeypatch):
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_IMPORT_ERROR", "No module named 'edgelm._native'", raising=False)
    assert not native.available()
    with pytest.raises(NativeError, match="not built"):
        native.confidence(np.zeros(4, np.float32))


# ----------------------------------------------------------------------------
# confidence: parity on every length


@pytest.mark.parametrize("n", LENGTHS)
def test_confidence_random_rows(path, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    got = native.confidence(x)
    assert isinstance(got.argmax, int) and isinstance(got.max_prob, float)
    assert_confidence_close(got, ref.confidence(x))


@pytest.mark.parametrize("n", [n for n in LENGTHS if n >= 2])
def test_confidence_ties_pick_first_index(path, n):
    # two equal maxima in different lanes and the tail: argmax is the first, margin 0
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal(n).astype(np.float32)
    first, second = n // 3, n - 1
    x[first] = x[second] = 50.0
    got = native.confidence(x)
    assert got.argmax == first
    assert got.margin == 0.0
    assert_confidence_close(got, ref.confidence(x))


@pytest.mark.parametrize("n", LENGTHS)
def test_confidence_max_in_tail(path, n):
    # the top-1 and top-2 sit in the last elements, which the SIMD loops leave to scalar code
    x = np.zeros(n, np.float32)
    x[-1] = 3.0
    if n >= 2:
        x[-2] = 2.0
    got = native.confidence(x)
    assert got.argmax == n - 1
    assert_confidence_close(got, ref.confidence(x))


def _with_neg_inf(n, rng):
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < 0.9] = -np.inf
    x[rng.integers(n)] = 1.0  # keep one finite entry
    return x


def _one_finite(n, rng):
    x = np.full(n, -np.inf, np.float32)
    x[n // 2] = -7.0
    return x


EXTREMES = {
    "very_large": lambda n, rng: (1e6 + 3 * rng.standard_normal(n)).astype(np.float32),
    "very_negative": lambda n, rng: (-1e6 + 3 * rng.standard_normal(n)).astype(np.float32),
    "huge_spread": lambda n, rng: (1e30 * rng.standard_normal(n)).astype(np.float32),  # one-hot
    "float_max_both_signs": lambda n, rng: np.resize(np.float32([3.4e38, -3.4e38]), n),
    "sharp": lambda n, rng: (60 * rng.standard_normal(n)).astype(np.float32),  # H near 0
    "neg_inf_entries": _with_neg_inf,
    "one_finite": _one_finite,  # p1 = 1, H = 0, margin = 1
    "all_equal": lambda n, rng: np.full(n, 2.5, np.float32),  # p1 = 1/n, H = log n, margin 0
    "all_neg_inf": lambda n, rng: np.full(n, -np.inf, np.float32),  # NaN, argmax 0
}


@pytest.mark.parametrize("n", [1, 9, 33, 32000])
@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_confidence_extremes(path, case, n):
    x = EXTREMES[case](n, np.random.default_rng(7))
    got = native.confidence(x)
    assert_confidence_close(got, ref.confidence(x))


def test_confidence_known_values(path):
    # closed forms, so the reference itself is checked too
    n = 1000
    got = native.confidence(np.full(n, -3.0, np.float32))
    assert got.max_prob == pytest.approx(1 / n, rel=RTOL)
    assert got.entropy == pytest.approx(np.log(n), rel=RTOL)
    assert (got.margin, got.argmax) == (0.0, 0)
    got = native.confidence(np.float32([0.0, np.log(3.0)]))  # p = (1/4, 3/4)
    assert got.max_prob == pytest.approx(0.75, rel=RTOL)
    assert got.margin == pytest.approx(0.5, rel=RTOL)
    assert got.entropy == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), rel=RTOL)
    assert got.argmax == 1
    got = native.confidence(np.full(33, -np.inf, np.float32))
    assert np.isnan([got.max_prob, got.entropy, got.margin]).all() and got.argmax == 0


# ----------------------------------------------------------------------------
# confidence: batched rows


@pytest.mark.parametrize("n_vocab", [1, 9, 33, 1000])
def test_confidence_batch_matches_rows(path, n_vocab):
    rng = np.random.default_rng(n_vocab)
    rows = [EXTREMES[case](n_vocab, rng) for case in sorted(EXTREMES)]
    rows += [(rng.standard_normal(n_vocab) * 5).astype(np.float32) for _ in range(6)]
    x = np.stack(rows)  # (n_rows, n_vocab)
    got = native.confidence(x)
    assert got.max_prob.dtype == np.float32 and got.argmax.dtype == np.int32
    assert got.argmax.shape == (len(rows),)
    assert_confidence_close(got, ref.confidence(x))
    for i, row in enumerate(x):  # the batch kernel walks rows the way the row kernel does
        one = native.confidence(row)
        assert_confidence_close(type(one)(*(v[i] for v in got)), one)


def test_confidence_batch_large_vocab(path):
    x = (np.random.default_rng(3).standard_normal((3, 151936)) * 4).astype(np.float32)
    assert_confidence_close(native.confidence(x), ref.confidence(x))


def test_confidence_batch_zero_rows():
    got = native.confidence(np.zeros((0, 16), np.float32))
    assert all(v.shape == (0,) for v in got)


# ----------------------------------------------------------------------------
# confidence: bad input


@pytest.mark.parametrize(
    "logits",
    [
        np.zeros(8, np.float64),  # wrong dtype
        np.zeros(8, np.float16),
        np.zeros(16, np.float32)[::2],  # strided view
        np.asfortranarray(np.zeros((4, 8), np.float32)),  # column-major
        np.zeros((2, 2, 2), np.float32),  # 3-D
        np.zeros(0, np.float32),  # no vocabulary
        np.zeros((3, 0), np.float32),
        [0.0, 1.0],  # not an array
    ],
)
def test_confidence_rejects_bad_input(logits):
    with pytest.raises(ValueError, match=r"^logits "):
        native.confidence(logits)


# ----------------------------------------------------------------------------
# greedy acceptance


def _ids(*values):
    return np.array(values, dtype=np.int32)


@pytest.mark.parametrize(
    "draft, target, want",
    [
        (_ids(5, 6, 7), _ids(5, 6, 7, 8), 3),  # all agree -> n
        (_ids(5, 6, 7), _ids(1, 6, 7, 8), 0),  # first differs
        (_ids(5, 6, 7), _ids(5, 6, 9, 8), 2),  # differs at the last draft token
        (_ids(5, 6, 7), _ids(5, 0, 7, 8), 1),  # later agreement does not count
        (_ids(), _ids(4), 0),  # nothing drafted
    ],
)
def test_greedy_accept_cases(draft, target, want):
    assert native.greedy_accept(draft, target) == want
    assert ref.greedy_accept(draft, target) == want


def test_greedy_accept_random_parity():
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(0, 12))
        target = rng.integers(0, 3, n + 1).astype(np.int32)  # small vocab: long agreements happen
        draft = np.where(rng.random(n) < 0.8, target[:n], rng.integers(0, 3, n)).astype(np.int32)
        assert native.greedy_accept(draft, target) == ref.greedy_accept(draft, target)


@pytest.mark.parametrize(
    "draft, target, name",
    [
        (_ids(1, 2), _ids(1, 2), "target"),  # target must have n + 1 ids
        (np.array([1, 2], np.int64), _ids(1, 2, 3), "draft"),
        (_ids(1, 2), np.array([1, 2, 3], np.int64), "target"),
        (_ids(1, 2, 3, 4)[::2], _ids(1, 2, 3), "draft"),
        (_ids(1, 2).reshape(1, 2), _ids(1, 2, 3), "draft"),
    ],
)
def test_greedy_accept_rejects_bad_input(draft, target, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        native.greedy_accept(draft, target)


# ----------------------------------------------------------------------------
# rejection-sampling acceptance


def _dists(rng, n, n_vocab, alpha=0.5):
    return rng.dirichlet(np.full(n_vocab, alpha), size=n).astype(np.float32)  # (n, n_vocab)


def test_speculative_accept_all_accepted():
    rng = np.random.default_rng(1)
    p = _dists(rng, 4, 10)
    draft = p.argmax(axis=1).astype(np.int32)
    u = np.full(4, np.nextafter(1.0, 0.0))  # the largest u still accepts when p >= q
    assert native.speculative_accept(p, p.copy(), draft, u) == 4


def test_speculative_accept_first_rejected():
    rng = np.random.default_rng(2)
    p, q = _dists(rng, 3, 10), _dists(rng, 3, 10)
    draft = _ids(4, 5, 6)
    p[0, 4] = 0.0  # the target never emits the first draft token
    assert native.speculative_accept(p, q, draft, np.zeros(3)) == 0


def test_speculative_accept_stops_at_ratio():
    # accept while u < p/q: ratios 1, 0.5, 0.25 against u = 0.3 -> rejects index 2
    p = np.float32([[0.5, 0.5], [0.25, 0.75], [0.125, 0.875]])
    q = np.float32([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    assert native.speculative_accept(p, q, _ids(0, 0, 0), np.full(3, 0.3)) == 2
    assert native.speculative_accept(p, q, _ids(0, 0, 0), np.full(3, 0.2)) == 3
    assert native.speculative_accept(p, q, _ids(0, 0, 0), np.full(3, 0.5)) == 1


def test_speculative_accept_random_parity():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n, n_vocab = int(rng.integers(0, 8)), int(rng.integers(1, 40))
        p, q = _dists(rng, n, n_vocab), _dists(rng, n, n_vocab)
        draft = rng.integers(0, n_vocab, n).astype(np.int32)
        u = rng.random(n)
        assert native.speculative_accept(p, q, draft, u) == ref.speculative_accept(p, q, draft, u)


def _spec_args():
    rng = np.random.default_rng(4)
    return _dists(rng, 3, 6), _dists(rng, 3, 6), _ids(0, 1, 2), np.full(3, 0.5)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: {**a, "p": a["p"].astype(np.float64)}, "p"),
        (lambda a: {**a, "q": a["q"][:2]}, "q"),  # shape differs from p
        (lambda a: {**a, "q": np.asfortranarray(a["q"])}, "q"),
        (lambda a: {**a, "draft": a["draft"][:2]}, "p"),  # rows != draft tokens
        (lambda a: {**a, "u": a["u"].astype(np.float32)}, "u"),
        (lambda a: {**a, "u": a["u"][:2]}, "u"),
        (lambda a: {**a, "draft": _ids(0, 6, 1)}, "draft"),  # id outside the vocabulary
        (lambda a: {**a, "draft": _ids(0, -1, 1)}, "draft"),
    ],
)
def test_speculative_accept_rejects_bad_input(change, name):
    p, q, draft, u = _spec_args()
    args = change({"p": p, "q": q, "draft": draft, "u": u})
    with pytest.raises(ValueError, match=rf"^{name} "):
        native.speculative_accept(**args)


# ----------------------------------------------------------------------------
# residual sampling


def test_residual_sample_cases():
    p, q = np.float32([0.5, 0.2, 0.3]), np.float32([0.2, 0.4, 0.4])
    # residual (0.3, 0, 0): only token 0 can come out, whatever u
    assert {native.residual_sample(p, q, u) for u in (0.0, 0.5, np.nextafter(1.0, 0.0))} == {0}
    p, q = np.float32([0.1, 0.6, 0.3]), np.float32([0.3, 0.2, 0.5])
    assert native.residual_sample(p, q, 0.99) == 1  # zero-mass tokens after it are never drawn


def test_residual_sample_zero_residual_falls_back_to_p():
    p = np.float32([0.25, 0.25, 0.5])
    # p == q: no residual mass, so draw from p: cdf (0.25, 0.5, 1)
    assert [native.residual_sample(p, p.copy(), u) for u in (0.1, 0.3, 0.6)] == [0, 1, 2]
    # u exactly on a CDF step belongs to the next token (first j with cdf[j] > u)
    assert [native.residual_sample(p, p.copy(), u) for u in (0.0, 0.25, 0.5)] == [0, 1, 2]
    assert [ref.residual_sample(p, p.copy(), u) for u in (0.0, 0.25, 0.5)] == [0, 1, 2]
    np.testing.assert_allclose(ref.residual_distribution(p, p), p)


def test_residual_sample_random_parity():
    rng = np.random.default_rng(5)
    for _ in range(500):
        n_vocab = int(rng.integers(1, 50))
        p, q = _dists(rng, 2, n_vocab, alpha=0.3)
        if rng.random() < 0.1:
            q = p.copy()  # exercise the fallback
        u = float(rng.random())
        assert native.residual_sample(p, q, u) == ref.residual_sample(p, q, u)


@pytest.mark.parametrize(
    "p, q, u, match",
    [
        (np.float32([0.5, 0.5]), np.float32([0.5, 0.5]), 1.0, r"^u "),
        (np.float32([0.5, 0.5]), np.float32([0.5, 0.5]), -0.1, r"^u "),
        (np.float32([0.5, 0.5]), np.float32([0.5, 0.25, 0.25]), 0.5, r"^q "),
        (np.float64([0.5, 0.5]), np.float32([0.5, 0.5]), 0.5, r"^p "),
        (np.float32([[0.5, 0.5]]), np.float32([[0.5, 0.5]]), 0.5, r"^p "),
        (np.float32([0.0, 0.0]), np.float32([0.5, 0.5]), 0.5, "no probability mass"),
    ],
)
def test_residual_sample_rejects_bad_input(p, q, u, match):
    with pytest.raises(ValueError, match=match):
        native.residual_sample(p, q, u)


# ----------------------------------------------------------------------------
# speculative sampling reproduces the target distribution

N_TRIALS = 100_000
CHI2_LIMIT = 18.47  # chi-square, 4 degrees of freedom, p = 0.001

PAIRS = {
    "opposed": ([0.40, 0.30, 0.15, 0.10, 0.05], [0.10, 0.10, 0.20, 0.30, 0.30]),
    "draft_misses_token": ([0.10, 0.20, 0.30, 0.25, 0.15], [0.30, 0.30, 0.20, 0.20, 0.00]),
}


def _emitted(p, q, residual, seed=0):
    """Tokens one draft step emits: draft x ~ q, keep it or resample the residual."""
    rng = np.random.default_rng(seed)
    draft = rng.choice(len(q), size=N_TRIALS, p=q / q.sum()).astype(np.int32)
    u_accept, u_residual = rng.random(N_TRIALS), rng.random(N_TRIALS)
    out = np.empty(N_TRIALS, np.int64)
    for i in range(N_TRIALS):
        k = native.speculative_accept(p[None], q[None], draft[i : i + 1], u_accept[i : i + 1])
        out[i] = draft[i] if k == 1 else residual(p, q, u_residual[i])
    return out


def _chi2(tokens, p):
    expected = len(tokens) * p.astype(np.float64)
    observed = np.bincount(tokens, minlength=len(p))
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_speculative_sampling_matches_target(pair):
    p, q = (np.float32(v) for v in PAIRS[pair])
    assert _chi2(_emitted(p, q, native.residual_sample), p) < CHI2_LIMIT


def test_chi2_check_catches_a_wrong_residual():
    # power check: resampling from p instead of max(0, p - q) skews the output toward q
    p, q = (np.float32(v) for v in PAIRS["opposed"])
    wrong = lambda p, q, u: ref.residual_sample(p, np.zeros_like(p), u)  # noqa: E731
    assert _chi2(_emitted(p, q, wrong), p) > 10 * CHI2_LIMIT
