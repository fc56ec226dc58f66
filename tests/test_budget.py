import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxzip import Budget, allocate, knapsack, topk_indices, topk_mask


# ---------------------------------------------------------------- Budget
def test_budget_acceptance_examples():
    assert Budget(rate=0.5).resolve(10) == 5
    assert Budget(tokens=3).resolve(10) == 3
    with pytest.raises(ValueError):
        Budget(rate=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rate": 0.5, "tokens": 3},
        {"rate": -0.1},
        {"rate": 1.5},
        {"rate": float("nan")},
        {"rate": float("inf")},
        {"rate": "0.5"},
        {"rate": True},
        {"tokens": -1},
        {"tokens": 2.5},
        {"tokens": True},
        {"tokens": "3"},
    ],
)
def test_budget_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


def test_budget_resolve_edges():
    assert Budget(rate=1.0).resolve(7) == 7
    assert Budget(rate=0.33).resolve(100) == 33
    assert Budget(rate=0.3).resolve(10) == 3  # 0.3 * 10 = 2.9999999999999996 in floats
    assert Budget(tokens=50).resolve(10) == 10  # more than the input: identity
    assert Budget(tokens=0).resolve(10) == 0
    assert Budget(rate=0.5).resolve(0) == 0
    assert Budget(tokens=3.0).tokens == 3
    assert Budget(tokens=50).is_identity(10)
    with pytest.raises(ValueError):
        Budget(rate=0.5).resolve(-1)
    with pytest.raises(ValueError):
        Budget(rate=0.5).resolve(2.5)


@pytest.mark.parametrize(
    "spec,expected",
    [("10%", Budget(rate=0.1)), ("0.25", Budget(rate=0.25)), ("4x", Budget(rate=0.25)),
     ("500", Budget(tokens=500)), (0.5, Budget(rate=0.5)), (7, Budget(tokens=7)),
     (" 50 % ", Budget(rate=0.5)), ("1e3", None)],
)
def test_budget_parse(spec, expected):
    if expected is None:
        with pytest.raises(ValueError):
            Budget.parse(spec)
    else:
        assert Budget.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", "abc", "0%", "200%", "-5", "0.5x", "1.5", True])
def test_budget_parse_rejects(spec):
    with pytest.raises(ValueError):
        Budget.parse(spec)


def test_from_ratio():
    assert Budget.from_ratio(4).rate == 0.25
    with pytest.raises(ValueError):
        Budget.from_ratio(0.5)


@given(rate=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(0, 10**6))
def test_resolve_never_over(rate, n):
    k = Budget(rate=rate).resolve(n)
    assert 0 <= k <= n
    assert k <= rate * n + 1e-6


# ---------------------------------------------------------------- allocate
sizes_st = st.lists(st.integers(0, 200), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    sizes=sizes_st,
    frac=st.floats(0, 1),
    method=st.sampled_from(["proportional", "longcodezip", "score"]),
    beta=st.floats(0, 1),
    seed=st.integers(0, 1000),
    floor=st.integers(0, 5),
)
def test_allocate_properties(sizes, frac, method, beta, seed, floor):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=len(sizes))
    total = int(frac * sum(sizes))
    a = allocate(total, sizes, scores, method=method, beta=beta, floors=floor)
    b = allocate(total, sizes, scores, method=method, beta=beta, floors=floor)
    assert np.array_equal(a, b)  # deterministic
    assert a.dtype == np.int64 and a.shape == (len(sizes),)
    sizes_a = np.asarray(sizes, dtype=np.int64)
    assert np.all(a >= 0) and np.all(a <= sizes_a)
    floors = np.minimum(floor, sizes_a)
    assert np.all(a >= floors)
    # exact when feasible; never over budget unless the floors force it
    if floors.sum() <= total:
        assert a.sum() == min(total, sizes_a.sum())
    else:
        assert np.array_equal(a, floors)


def test_allocate_edge_cases():
    assert allocate(10, []).size == 0
    assert allocate(5, [10]).tolist() == [5]
    # all-equal scores under longcodezip = proportional
    assert allocate(30, [20, 40], [1.0, 1.0], method="longcodezip").tolist() == [10, 20]
    # ceilings respected, leftover flows to the others
    assert allocate(30, [20, 40], ceilings=[5, 100]).tolist() == [5, 25]
    with pytest.raises(ValueError):
        allocate(5, [1, 2], method="nope")
    with pytest.raises(ValueError):
        allocate(5, [1, 2], method="score")
    with pytest.raises(ValueError):
        allocate(-1, [1, 2])
    with pytest.raises(ValueError):
        allocate(3, [1, -2])


def test_allocate_longcodezip_rule():
    # R_i = R_base (1 + beta (2 s_norm - 1)): the best group gets rate R_base (1 + beta)
    sizes = [100, 100, 100]
    a = allocate(150, sizes, [0.0, 0.5, 1.0], method="longcodezip", beta=0.5)
    assert a.tolist() == [25, 50, 75]
    # higher score never gets a lower rate
    a = allocate(90, [50, 100, 200], [3.0, 1.0, 2.0], method="longcodezip", beta=0.8)
    rates = a / np.array([50, 100, 200])
    assert rates[0] >= rates[2] >= rates[1]


# ---------------------------------------------------------------- top-k
@given(st.lists(st.integers(-3, 3), min_size=0, max_size=30), st.integers(0, 35))
def test_topk_numpy_torch_agree(vals, k):
    a = np.asarray(vals, dtype=np.float64)
    m_np = topk_mask(a, k)
    m_t = topk_mask(torch.tensor(a), k).numpy()
    assert np.array_equal(m_np, m_t)
    assert m_np.sum() == min(k, len(vals))
    if 0 < k < len(vals):
        assert a[m_np].min() >= a[~m_np].max()


def test_topk_ties_go_to_earlier():
    assert topk_mask(np.array([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [True, True, False, False]
    assert topk_indices(np.array([0.0, 5.0, 1.0, 5.0]), 2).tolist() == [1, 3]
    assert topk_indices(np.array([0.0, 5.0, 1.0, 5.0]), 3, sort_by_position=False).tolist() == [1, 3, 2]


def test_topk_force_and_dims():
    s = np.array([[5.0, 1.0, 3.0], [0.0, 9.0, 8.0]])
    m = topk_mask(s, 1, dim=-1, force_keep=np.array([[False, True, False], [False, False, False]]))
    assert m.tolist() == [[False, True, False], [False, True, False]]
    t = topk_indices(torch.tensor(s), 2, dim=1)
    assert t.tolist() == [[0, 2], [1, 2]]
    with pytest.raises(ValueError):
        topk_mask(s, -1)


# ---------------------------------------------------------------- knapsack
def _brute(v, w, cap):
    best = 0.0
    n = len(v)
    for bits in range(1 << n):
        idx = [i for i in range(n) if bits >> i & 1]
        if sum(w[i] for i in idx) <= cap:
            best = max(best, sum(max(v[i], 0) for i in idx))
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-5, 20), st.integers(0, 15)), min_size=0, max_size=9),
    st.integers(0, 40),
)
def test_knapsack_exact_matches_bruteforce(items, cap):
    v = [a for a, _ in items]
    w = [b for _, b in items]
    m = knapsack(v, w, cap)
    assert np.array_equal(m, knapsack(v, w, cap))
    assert sum(w[i] for i in range(len(v)) if m[i]) <= cap
    got = sum(v[i] for i in range(len(v)) if m[i])
    assert math.isclose(got, _brute(v, w, cap), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.1, 20), st.integers(1, 50)), min_size=1, max_size=40),
    st.integers(1, 300),
)
def test_knapsack_greedy_within_budget_and_half_optimal(items, cap):
    v = [a for a, _ in items]
    w = [b for _, b in items]
    g = knapsack(v, w, cap, exact_limit=0)  # force greedy
    e = knapsack(v, w, cap)
    assert sum(w[i] for i in range(len(v)) if g[i]) <= cap
    gv = sum(v[i] for i in range(len(v)) if g[i])
    ev = sum(v[i] for i in range(len(v)) if e[i])
    assert gv >= 0.5 * ev - 1e-9


def test_knapsack_force_and_errors():
    m = knapsack([1.0, 10.0, 3.0], [5, 5, 5], 10, force=[True, False, False])
    assert m.tolist() == [True, True, False]
    # forced items over capacity: all forced, nothing else
    assert knapsack([1, 1], [5, 5], 3, force=[True, False]).tolist() == [True, False]
    assert knapsack([], [], 5).tolist() == []
    assert knapsack([1.0, 2.0], [0, 3], 0).tolist() == [True, False]
    with pytest.raises(ValueError):
        knapsack([1.0], [1.5], 3)
    with pytest.raises(ValueError):
        knapsack([1.0], [1, 2], 3)
    with pytest.raises(ValueError):
        knapsack([1.0], [-1], 3)
    with pytest.raises(ValueError):
        knapsack([float("nan")], [1], 3)


def test_fill_until_keeps_the_crossing_item_and_skips_empty_ones():
    from ctxzip.budget import fill_until

    scores = [0.9, 0.1, 0.5, 0.7, 0.3]
    sizes = [4, 3, 0, 5, 2]
    # best first: 0 (4, left 6), 3 (5, left 1), 2 skipped (size 0), 4 (2, crosses: kept), stop
    assert fill_until(scores, sizes, 10).tolist() == [True, False, False, True, True]
    assert fill_until(scores, sizes, 0).tolist() == [True, False, False, False, False]
    assert not fill_until([], [], 5).any()
    with pytest.raises(ValueError):
        fill_until([1.0, 2.0], [1.0], 3)
