"""Low rank by truncated SVD, and turning a router MoE into an AoE model.

The paper never uses SVD: it factorizes W_g = W_down W_up and trains both factors from scratch,
arguing that trained weights are close to low rank anyway (its §3). We use SVD to *show* that
(notebooks/01) and to convert a trained MoE layer into an AoE layer (our own addition).

Eckart-Young: keeping the r largest singular values, W_r = U_r S_r V_r^T, is the best rank-r
approximation of W in Frobenius (and spectral) norm, with relative error
    ||W - W_r||_F / ||W||_F = sqrt(sum_{j>r} s_j^2 / sum_j s_j^2) = sqrt(1 - energy(r)).
That is the best error on the *weights*. A layer only ever computes x W on its own inputs, and
whitened_svd_factorize gives the best rank-r error on those instead.
"""

from dataclasses import replace

import torch

from .aoe import AoE
from .model import GPT, GPTConfig
from .moe import MoE


def svd_factorize(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (m, n) ~= A (m, r) @ B (r, n), the rank-r truncated SVD with the singular values split
    evenly between the factors (A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T), so neither factor
    carries all the scale. In AoE terms: W_g ~= W_down W_up."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be between 1 and min(m, n)={min(m, n)} for a {m}x{n} matrix")
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)   # U (m, k), S (k,), Vh (k, n)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def whitened_svd_factorize(W: torch.Tensor, X: torch.Tensor, rank: int,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware ("whitened") SVD: A (m, r), B (r, n) minimizing ||X W - X A B||_F, the error
    on the inputs X (N, m) rather than on the weights, so directions the inputs rarely use cost little.

    With C = X^T X (m, m): ||X Z||_F^2 = tr(Z^T C Z) = ||C^(1/2) Z||_F^2, so the problem is Eckart-Young
    for C^(1/2) W: take its rank-r SVD U_r S_r V_r^T and map back, A = C^(-1/2) U_r sqrt(S_r),
    B = sqrt(S_r) V_r^T. Eigenvalues of C below eps * its largest are clamped (directions X never uses).
    If C is a multiple of the identity this is svd_factorize(W, rank)."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be between 1 and min(m, n)={min(m, n)} for a {m}x{n} matrix")
    if X.shape[-1] != m:
        raise ValueError(f"X has {X.shape[-1]} features, W has {m} rows")
    X = X.detach().float().reshape(-1, m)
    lam, Q = torch.linalg.eigh(X.T @ X)                      # C = Q diag(lam) Q^T
    root = lam.clamp_min(eps * lam.max()).sqrt()             # (m,)
    A, B = svd_factorize((Q * root) @ Q.T @ W.detach().float(), rank)   # factors of C^(1/2) W
    return (Q / root) @ Q.T @ A, B                           # C^(-1/2) A, B


def rank_profile(W: torch.Tensor) -> dict:
    """For every rank r = 1..min(m, n): the kept spectral energy and the relative Frobenius error
    of the best rank-r approximation. Returns tensors indexed by r-1 plus the singular values."""
    S = torch.linalg.svdvals(W.detach().float())          # (k,) descending
    energy = (S.square().cumsum(0) / S.square().sum())    # (k,) energy kept by the top r
    return {"ranks": torch.arange(1, S.numel() + 1), "singular_values": S,
            "energy": energy, "rel_error": (1 - energy).clamp_min(0).sqrt()}


def moe_to_aoe(moe: MoE, config: GPTConfig, d_low: int) -> AoE:
    """An AoE layer whose experts are the MoE's: W_down^i W_up^i = rank-d_low SVD of W_g^i,
    W_p and W_o copied, d_wide = the experts' width. The router is dropped (and with it the router-side
    options of config): the experts now rank themselves by ||x W_down^i||. At d_low = n_embd each
    expert computes exactly what it did before. A factorized MoE (expert_gate="lowrank") gives the
    SVD of its product W_down^i W_up^i."""
    cfg = replace(config, ffn="aoe", d_low=d_low, d_wide=moe.w_p.shape[-1],
                  expert_gate="full", router="linear", erc_loss_coef=0.0)
    L = d_low
    with torch.no_grad():
        w_g = moe.gate_matrix()                            # (E, D, H)
        aoe = AoE(cfg).to(w_g.device)
        for i in range(moe.n_experts):
            A, B = svd_factorize(w_g[i], L)                # (D, L), (L, H)
            aoe.w_down[:, i * L:(i + 1) * L] = A
            aoe.w_up[i] = B
        aoe.w_p.copy_(moe.w_p)
        aoe.w_o.copy_(moe.w_o)
    return aoe


def gpt_moe_to_aoe(model: GPT, d_low: int) -> GPT:
    """A whole MoE GPT converted layer by layer (attention, norms and embeddings copied)."""
    if model.config.ffn != "moe":
        raise ValueError(f"gpt_moe_to_aoe needs a model with ffn='moe', got ffn={model.config.ffn!r}")
    cfg = replace(model.config, ffn="aoe", d_low=d_low, d_wide=model.config.ffn_dim)
    new = GPT(cfg).to(next(model.parameters()).device)
    # Everything outside the expert layers has the same names and shapes in both models.
    experts = tuple(f"blocks.{i}.ffn." for i, _ in model.expert_layers())
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(experts)}
    missing, unexpected = new.load_state_dict(shared, strict=False)
    assert not unexpected and all(k.startswith(experts) for k in missing), (missing, unexpected)
    for i, moe in model.expert_layers():
        new.blocks[i].ffn = moe_to_aoe(moe, model.config, d_low)
    return new
