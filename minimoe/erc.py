"""Expert-router coupling (ERC) loss: Lv, Ma, Ma, Qiao, "Coupling Experts and Routers in
Mixture-of-Experts via an Auxiliary Loss", arXiv 2512.23447 (ICLR 2026). The same first author as AoE;
ERC keeps the router and pays a fixed n^2 cost instead of AoE's per-token one.

Row i of the router R (n x d) is the cluster centre of the tokens routed to expert i, so it can stand in
for them as a "proxy token". Three steps (paper §3):

  1. proxies   R~[i] = R[i] * delta_i,  delta_i ~ U(1 - eps_i, 1 + eps_i)^d,
               eps_i <= ||R[i] - R[j]|| / (2 ||R[i]||), j the nearest other centre: R~[i] stays in its cluster.
  2. responses M[i, j] = || R~[i] W_g^j ||       expert j's gate activation norm for expert i's proxy  (n x n)
  3. loss      L = 1/n^2 sum_i sum_{j != i} ( max(M[i,j] - alpha M[i,i], 0) + max(M[j,i] - alpha M[i,i], 0) )

Read literally: the first term asks proxy i to excite its own expert i more than any expert j (the router
row points at what its expert can do); the second asks expert i to respond to its own proxy more than to any
proxy j (the expert specializes in the tokens it is actually sent). alpha in [0, 1] sets how strict: the paper found alpha=1
best at n=64 and 0.5 at n=256. R~ is used only here; routing uses the clean R. The cost is n proxies through
n experts' W_g, 2 n^2 d H forward FLOPs per layer, whatever the batch size.

Where the paper leaves a choice (ours, stated):
  - eps_i is taken AT the bound (the largest noise that stays in the cluster), and the noise delta is a
    sampled constant: no gradient flows through eps or delta, only through R and W_g.
  - the noise is drawn from torch's global generator on every training forward (each micro-step and rank
    draws its own); evaluation forwards skip ERC, so validation losses stay deterministic.
  - computed in fp32 (n^2 activations: negligible), like the router scores.
  - for the factorized-W_g control (moe.py, expert_gate="lowrank") W_g^j = W_down^j W_up^j.
"""

import torch
import torch.nn.functional as F


def erc_noise_bound(R: torch.Tensor) -> torch.Tensor:
    """eps_i = min_{j != i} ||R[i] - R[j]|| / (2 ||R[i]||).   R (n, d) -> (n,)"""
    dist = torch.cdist(R, R)                                                 # (n, n)
    dist = dist.masked_fill(torch.eye(R.shape[0], dtype=torch.bool, device=R.device), float("inf"))
    return dist.min(dim=1).values / (2 * R.norm(dim=1))


def erc_proxies(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: R~ = R * delta, delta ~ U(1 - eps, 1 + eps) elementwise.   R (n, d) -> R~ (n, d), eps (n,)"""
    eps = erc_noise_bound(R.detach())                                        # (n,) no gradient: a bound
    delta = 1 + (2 * torch.rand_like(R, dtype=torch.float32) - 1) * eps[:, None]   # (n, d)
    return R * delta, eps


def erc_activation_norms(proxy: torch.Tensor, w_g: torch.Tensor, w_up: torch.Tensor | None = None) -> torch.Tensor:
    """Step 2: M[i, j] = ||proxy[i] W_g^j||.   proxy (n, d), w_g (n, d, H) -> M (n, n).
    With w_up (n, L, H), w_g is W_down (n, d, L) and W_g^j = W_down^j W_up^j."""
    act = torch.einsum("id,jdh->ijh", proxy, w_g)                            # (n, n, H) or (n, n, L)
    if w_up is not None:
        act = torch.einsum("ijl,jlh->ijh", act, w_up)                        # (n, n, H)
    return act.norm(dim=-1)


def erc_penalty(M: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 3: 1/n^2 sum_i sum_{j != i} relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i])."""
    n = M.shape[0]
    own = alpha * M.diagonal()[:, None]                                      # (n, 1) alpha M[i, i]
    off = ~torch.eye(n, dtype=torch.bool, device=M.device)                   # (n, n) j != i
    return ((F.relu(M - own) + F.relu(M.T - own)) * off).sum() / n ** 2


def erc_loss(R: torch.Tensor, w_g: torch.Tensor, w_up: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The ERC loss of one MoE layer (steps 1-3), in fp32.   R (n, d) router rows, w_g (n, d, H),
    w_up None (or, factorized, w_g = W_down (n, d, L) and w_up (n, L, H))."""
    with torch.autocast(R.device.type, enabled=False):
        f32 = lambda t: None if t is None else t.float()   # noqa: E731
        proxy, _ = erc_proxies(R.float())
        return erc_penalty(erc_activation_norms(proxy, f32(w_g), f32(w_up)), alpha)


def erc_flops(n: int, d: int, widths: list[int]) -> int:
    """Training FLOPs (forward 2 + backward 4 per multiply-add) of one layer's ERC loss, per forward:
    6 n^2 sum(d_in * d_out) over the projections that make W_g (one for a full W_g, two when factorized)."""
    dims = [d, *widths]
    return 6 * n * n * sum(a * b for a, b in zip(dims, dims[1:]))
