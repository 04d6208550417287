"""Rank rules read off a spectrum: energy, Gavish–Donoho's hard threshold, the RMT bulk edge, and the k_min floor."""
import math

import pytest
import torch

from pruning_utils.compress.lowrank import (
    RANK_RULES,
    apply_k_min,
    choose_rank,
    energy_rank,
    factorize,
    gavish_donoho_rank,
    gd_omega,
    rmt_rank,
    svd_factors,
)
from pruning_utils.model.stats import GramStats


def diag_matrix(values, shape=(6, 4)) -> torch.Tensor:
    w = torch.zeros(shape, dtype=torch.float64)
    w[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return w


def rank5_plus_noise(shape=(100, 80), sigma=0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(shape[0], 5, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], 5, generator=g, dtype=torch.float64))[0]
    signal = (u * torch.tensor([50.0, 40, 30, 20, 10], dtype=torch.float64)) @ v.T
    return signal + sigma * torch.randn(shape, generator=g, dtype=torch.float64)


def test_energy_rank_by_hand():
    # s² = 100, 1, 0.01, 0.0001 of 101.0101: the top 1 holds 0.9900001, the top 2 0.9999000, the top 3 0.9999990
    s = [10.0, 1.0, 0.1, 0.01]
    assert energy_rank(s, 0.99) == 1
    assert energy_rank(s, 0.991) == 2
    assert energy_rank(s, 0.99995) == 3
    assert energy_rank(s, 0.9999995) == 4
    assert energy_rank(list(reversed(s)), 0.991) == 2  # the order given does not matter
    assert choose_rank(diag_matrix(s), "energy", threshold=0.991) == 2  # the same, from the matrix's own SVD
    assert choose_rank(torch.tensor(s), "energy", (6, 4), threshold=0.991) == 2


def test_energy_threshold_one_keeps_the_full_numerical_rank():
    g = torch.Generator().manual_seed(1)
    exact3 = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g,
                                                                                   dtype=torch.float64)
    assert choose_rank(exact3, "energy", threshold=1.0) == 3  # round-off singular values carry no energy
    full = torch.randn(30, 20, generator=g, dtype=torch.float64)
    assert choose_rank(full, "energy", threshold=1.0) == 20
    assert energy_rank([0.0, 0.0, 0.0]) == 1  # a zero matrix still gets rank 1


def test_gd_omega_matches_the_published_values():
    assert gd_omega(1.0) == pytest.approx(2.858, abs=0.01)  # square: 2.858 in Gavish & Donoho (2014)
    assert gd_omega(0.5) == pytest.approx(0.07 - 0.2375 + 0.91 + 1.43)


def test_gavish_donoho_by_hand():
    # square: ω(1) = 2.86; median 1 -> τ = 2.86, only 10 is above it
    assert gavish_donoho_rank([10.0, 1.0, 1.0, 1.0, 1.0], (5, 5)) == 1
    # an even count: the median averages the middle pair, (3 + 1) / 2 = 2 -> τ = 5.72 (the lower median would give 2)
    assert gavish_donoho_rank([10.0, 3.0, 1.0, 1.0], (4, 4)) == 1
    assert gavish_donoho_rank([10.0, 8.0, 1.0, 1.0, 1.0, 1.0], (6, 6)) == 2
    # β = 1/2: ω = 2.2225, median 1 -> τ = 2.2225
    assert gavish_donoho_rank([3.0, 2.0, 1.0], (3, 6)) == 1


@pytest.mark.parametrize("shape", [(100, 80), (80, 100)])
def test_gavish_donoho_finds_the_rank_of_a_noisy_low_rank_matrix(shape):
    w = rank5_plus_noise(shape)
    assert choose_rank(w, "gavish_donoho") == 5
    assert choose_rank(w, "gd") == 5
    assert choose_rank(torch.linalg.svdvals(w), "gavish_donoho", shape) == 5


def test_gavish_donoho_on_pure_noise_is_the_floor():
    noise = torch.randn(100, 80, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert choose_rank(noise, "gavish_donoho") == 1


def test_rmt_rule_is_edge_rank():
    w = rank5_plus_noise()
    assert choose_rank(w, "rmt") == rmt_rank(w)


def test_k_min_raises_the_rank():
    w = diag_matrix([10.0, 1.0, 0.1, 0.01])
    assert choose_rank(w, "energy", threshold=0.5) == 1
    assert choose_rank(w, "energy", threshold=0.5, k_min=3) == 3
    assert choose_rank(w, "energy", threshold=0.991, k_min=1) == 2  # a floor below the rule's rank changes nothing
    assert choose_rank(rank5_plus_noise(), "gd", k_min=8) == 8
    assert apply_k_min(2, 3, 4) == 3 and apply_k_min(4, 3, 4) == 4


def test_bad_thresholds_raise():
    for bad in (0, -0.1, 1.5, math.nan, True):
        with pytest.raises(ValueError, match=r"energy threshold .* is invalid: choose a fraction in \(0, 1\]"):
            energy_rank([3.0, 1.0], bad)
    with pytest.raises(ValueError, match=r"threshold 2 is invalid"):
        choose_rank(diag_matrix([1.0]), "energy", threshold=2)


def test_bad_rules_and_floors_raise():
    w = diag_matrix([1.0, 0.5])
    with pytest.raises(ValueError, match="unknown rank rule 'svd'; known: energy, gavish_donoho, gd, rmt"):
        choose_rank(w, "svd")
    for bad in (0, 5, 2.5):  # the matrix is 6x4: full rank 4
        with pytest.raises(ValueError, match=r"k_min=.* is invalid: choose an integer in \[1, 4\]"):
            choose_rank(w, "energy", k_min=bad)
    with pytest.raises(ValueError, match=r"k_min=9 is invalid"):
        apply_k_min(2, 9, 4)
    with pytest.raises(ValueError, match="need the matrix's shape"):
        choose_rank(torch.ones(4), "gd")
    with pytest.raises(ValueError, match="give all 4"):
        choose_rank(torch.ones(3), "gd", (6, 4))
    with pytest.raises(ValueError, match="does not match"):
        choose_rank(w, "gd", (4, 6))
    assert set(RANK_RULES) == {"energy", "gavish_donoho", "gd", "rmt"}


def test_svd_factors_take_the_rules_by_name():
    w = rank5_plus_noise()
    lin = torch.nn.Linear(80, 100).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    assert factorize(lin, "gd").rank == 5
    assert factorize(lin, "energy").rank == choose_rank(w, "energy")
    gram = GramStats.empty(80)
    gram.add(torch.randn(500, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    a, b = svd_factors(w, "gd", "whiten", gram)  # the rule reads W's own spectrum, not W·T's
    assert a.shape == (5, 80) and b.shape == (100, 5)
