"""lowrank.whitened_svd_factorize: the best rank-r factors for the error on given inputs."""

import pytest
import torch

from minimoe.lowrank import svd_factorize, whitened_svd_factorize


def anisotropic_inputs(N=512, m=16, seed=0):
    """Inputs whose variance falls off 100x across the m directions of a random basis."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    return torch.randn(N, m, generator=g) * torch.logspace(0, -2, m) @ Q.T


def act_error(W, X, A, B):
    return (torch.linalg.norm(X @ W - X @ A @ B) / torch.linalg.norm(X @ W)).item()


def test_whitened_beats_plain_svd_on_the_inputs_and_loses_on_the_weights():
    W, X = torch.randn(16, 24, generator=torch.Generator().manual_seed(1)), anisotropic_inputs()
    for r in (2, 6, 12):
        Aw, Bw = whitened_svd_factorize(W, X, r)
        Ap, Bp = svd_factorize(W, r)
        assert Aw.shape == (16, r) and Bw.shape == (r, 24)
        assert act_error(W, X, Aw, Bw) < act_error(W, X, Ap, Bp) - 0.05
        assert torch.linalg.norm(W - Aw @ Bw) > torch.linalg.norm(W - Ap @ Bp)   # Eckart-Young on W


def test_whitened_is_optimal_on_the_inputs():
    """No rank-r matrix does better on X: not a random perturbation of the answer, not gradient descent."""
    g = torch.Generator().manual_seed(2)
    W, X, r = torch.randn(16, 24, generator=g), anisotropic_inputs(seed=3), 5
    A, B = whitened_svd_factorize(W, X, r)
    best = act_error(W, X, A, B)
    for _ in range(20):
        dA, dB = 0.01 * torch.randn(A.shape, generator=g), 0.01 * torch.randn(B.shape, generator=g)
        assert act_error(W, X, A + dA, B + dB) >= best - 1e-6
    Ag = torch.nn.Parameter(0.1 * torch.randn(16, r, generator=g))
    Bg = torch.nn.Parameter(0.1 * torch.randn(r, 24, generator=g))
    opt = torch.optim.Adam([Ag, Bg], lr=1e-2)
    for _ in range(1500):
        loss = (X @ W - X @ Ag @ Bg).square().sum()
        opt.zero_grad(); loss.backward(); opt.step()
    assert act_error(W, X, Ag.detach(), Bg.detach()) >= best - 1e-4
    assert act_error(W, X, Ag.detach(), Bg.detach()) == pytest.approx(best, abs=2e-3)


def test_isotropic_inputs_give_the_plain_svd_and_full_rank_is_exact():
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    X = 3.0 * torch.linalg.qr(torch.randn(16, 16))[0]        # X^T X = 9 I
    Aw, Bw = whitened_svd_factorize(W, X, 6)
    Ap, Bp = svd_factorize(W, 6)
    assert torch.allclose(Aw @ Bw, Ap @ Bp, atol=1e-4)
    A, B = whitened_svd_factorize(W, anisotropic_inputs(), 16)
    assert torch.allclose(A @ B, W, atol=1e-3)


def test_bad_arguments():
    W, X = torch.randn(16, 24), torch.randn(100, 16)
    with pytest.raises(ValueError, match="rank"):
        whitened_svd_factorize(W, X, 17)
    with pytest.raises(ValueError, match="features"):
        whitened_svd_factorize(W, torch.randn(100, 24), 4)
