"""Analysis helpers for the notebooks: who picks the experts, and what that choice is worth.

The paper's insight experiment (Lv et al., arXiv 2501.13074, §2, Table 1) takes a trained router
MoE, throws the router away, and lets every expert vote for itself with the L2 norm of its own
activation at one node of Eq. 1:

    E_i(x) = (SiLU(x W_g^i) * x W_p^i) W_o^i
    nodes:  "x_wg"       x W_g^i                       (N, E, H)
            "x_wp"       x W_p^i                       (N, E, H)
            "silu_x_wg"  SiLU(x W_g^i)                 (N, E, H)
            "hidden"     SiLU(x W_g^i) * x W_p^i       (N, E, H)
            "output"     E_i(x)                        (N, E, D)
            "svd_down"   x W_down^i, W_down^i the rank-r factor of W_g^i that lowrank.svd_factorize
                         (and hence lowrank.moe_to_aoe) produces                            (N, E, r)

The K experts with the largest norms are selected and weighted by the softmax of their norms (as in
AoE, Alg. 2). Rule.gates swaps the weighting alone (router softmax, norm softmax or equal gates), so a
comparison can separate *which* experts a rule picks from *how* it weighs them; Rule.part ranks by the
norm of the positive (or negative) entries of a node only, to test what the sign of x W contributes.
Everything after the choice is the MoE's own experts, run by dispatch.py's pieces.
`evaluate_rule` swaps a whole model's selection rule and measures validation loss, plus how often
the new rule picks the same experts as the router would have on the very same layer input.

Also here: what each expert sees and takes (ffn_inputs, expert_choices, byte statistics), and
train_or_load, which trains a notebook's model once with minimoe.train and then reuses the run.
The analysis functions never change weights; rules are swapped in and out by a context manager.

Shapes as in dispatch.py: N tokens, E experts, K experts per token, D model width, H expert width.
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import (Routing, combine, count_per_expert, gather_rows, grouped_mm, plan_dispatch, resolve_impl, route,
                       routing_summary, swiglu_experts)
from .lowrank import svd_factorize
from .moe import MoE

NODES = {
    "x_wg": "x W_g",
    "x_wp": "x W_p",
    "silu_x_wg": "SiLU(x W_g)",
    "hidden": "SiLU(x W_g) * x W_p",
    "output": "E_i(x)",
    "svd_down": "x W_down (rank-r SVD of W_g)",
}
RULE_KINDS = ("router", "norm", "random")
GATE_KINDS = ("own", "router", "norm", "equal")   # "own": router->router, norm->norm, random->equal
PARTS = ("all", "pos", "neg")                     # the whole activation, ReLU(a) or ReLU(-a)
_OWN_GATES = {"router": "router", "norm": "norm", "random": "equal"}


# --------------------------------------------------------------------------- activations at a node

def _check_moe(layer):
    if not isinstance(layer, MoE):
        raise TypeError(f"expected a router MoE layer (minimoe.moe.MoE), got {type(layer).__name__}; "
                        f"norm-ranking experiments remove a router, so start from a model with ffn='moe'")


def svd_down_weights(moe: MoE, rank: int) -> torch.Tensor:
    """Every expert's W_down^i (D, r): the left factor of the rank-r SVD of W_g^i, exactly as
    lowrank.moe_to_aoe builds it (A = U_r sqrt(S_r)).   -> (E, D, r)"""
    _check_moe(moe)
    w_g = moe.gate_matrix()                                          # (E, D, H)
    return torch.stack([svd_factorize(w_g[i], rank)[0] for i in range(moe.n_experts)])


@torch.no_grad()
def node_activations(moe: MoE, x: torch.Tensor, node: str, rank: int | None = None,
                     w_down: torch.Tensor | None = None) -> torch.Tensor:
    """What every expert computes at `node` for every token: x (N, D) -> (N, E, width).
    This runs ALL experts on ALL tokens: an analysis tool, not a fast path."""
    _check_moe(moe)
    if node not in NODES:
        raise ValueError(f"node={node!r} is not one of {list(NODES)}")
    if node == "svd_down":
        if w_down is None:
            if rank is None:
                raise ValueError("node='svd_down' needs rank=r (1 <= r <= n_embd)")
            w_down = svd_down_weights(moe, rank)
        return torch.einsum("nd,edr->ner", x.float(), w_down)       # (N, E, r)
    g = torch.einsum("nd,edh->neh", x, moe.gate_matrix())           # (N, E, H) x W_g^i
    if node == "x_wg":
        return g
    if node == "silu_x_wg":
        return F.silu(g)
    p = torch.einsum("nd,edh->neh", x, moe.w_p)                      # (N, E, H) x W_p^i
    if node == "x_wp":
        return p
    h = F.silu(g) * p                                                # (N, E, H)
    if node == "hidden":
        return h
    return torch.einsum("neh,ehd->ned", h, moe.w_o)                  # (N, E, D) E_i(x)


# --------------------------------------------------------------------------- selection rules

@dataclass(frozen=True)
class Rule:
    """How a layer picks its K experts.

    Rule("router")                    the trained router (Alg. 1): the model as it was trained
    Rule("norm", "x_wg")              largest ||activation at node||_ord, gates softmax(norms[I])
    Rule("norm", "svd_down", rank=8)  the same at the rank-8 SVD factor x W_down (AoE's score)
    Rule("random", seed=0)            K experts uniformly at random, equal gates 1/K
    Rule("norm", "x_wg", part="pos")  rank by ||ReLU(x W_g)||: the positive entries only

    gates= keeps the choice of experts and swaps how they are weighted (a control):
    Rule("norm", "hidden", gates="router")  the norm's experts, weighted by the router's softmax
    Rule("router", "hidden", gates="norm")  the router's experts, weighted by softmax(||hidden||)
    Rule("router", gates="equal")           the router's experts, 1/K each
    Weights other than "equal" are softmax(scores) at the chosen experts, renormalized to sum to 1
    if the MoE renormalizes (as route() does).
    """
    kind: str = "router"
    node: str | None = None
    rank: int | None = None
    ord: float = 2.0          # norm order: 2 (L2, the paper's choice), 1, or math.inf
    seed: int = 0             # for kind="random"
    gates: str = "own"        # how the chosen experts are weighted: one of GATE_KINDS
    part: str = "all"         # rank (and gate) by the norm of: all entries, ReLU(a) or ReLU(-a)

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise ValueError(f"Rule.kind={self.kind!r} is invalid: allowed values are {RULE_KINDS}")
        if self.gates not in GATE_KINDS:
            raise ValueError(f"Rule.gates={self.gates!r} is invalid: allowed values are {GATE_KINDS}")
        if self.part not in PARTS:
            raise ValueError(f"Rule.part={self.part!r} is invalid: allowed values are {PARTS}")
        if self.uses_norm:
            if self.node not in NODES:
                raise ValueError(f"Rule.node={self.node!r} is invalid: a norm rule needs one of {list(NODES)}")
            if self.node == "svd_down" and (not isinstance(self.rank, int) or self.rank < 1):
                raise ValueError(f"Rule.rank={self.rank!r} is invalid: node='svd_down' needs a positive "
                                 f"int rank (at most n_embd)")
            if self.node != "svd_down" and self.rank is not None:
                raise ValueError(f"Rule.rank={self.rank!r} is invalid: rank only applies to node='svd_down'")
            if self.ord not in (1, 2, math.inf):
                raise ValueError(f"Rule.ord={self.ord!r} is invalid: use 1, 2 or math.inf")
        elif self.node is not None or self.rank is not None or self.part != "all":
            raise ValueError(f"Rule(kind={self.kind!r}) takes no node/rank/part (got node={self.node!r}, "
                             f"rank={self.rank!r}, part={self.part!r}); use kind='norm' to rank by a node, "
                             f"or gates='norm' to weight by one")

    @property
    def uses_norm(self) -> bool:
        """Whether a node's norms are computed: to choose (kind="norm") or to weigh (gates="norm")."""
        return self.kind == "norm" or self.gates == "norm"

    @property
    def weighting(self) -> str:
        """The gates actually used: "own" resolved to router / norm / equal."""
        return _OWN_GATES[self.kind] if self.gates == "own" else self.gates

    @property
    def swapped(self) -> bool:
        """True for a control: the experts of one rule with another rule's weights."""
        return self.weighting != _OWN_GATES[self.kind]

    @property
    def norm_label(self) -> str:
        name = {1: "L1", 2: "L2", math.inf: "Linf"}[self.ord]
        node = NODES[self.node].replace("rank-r", f"rank-{self.rank}")
        part = {"all": "", "pos": ", positive part", "neg": ", negative part"}[self.part]
        return f"{name} norm of {node}{part}"

    @property
    def label(self) -> str:
        base = {"router": "router (trained)", "random": "random experts"}.get(self.kind) or self.norm_label
        if not self.swapped:
            return base
        if self.weighting == "norm":
            return f"{base.replace(' (trained)', '')}, gates by {self.norm_label}"
        return f"{base.replace(' (trained)', '')}, {self.weighting} gates"


def node_scores(moe: MoE, x: torch.Tensor, node: str, rank: int | None = None, ord: float = 2.0,
                part: str = "all", w_down: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert's vote: ||activation at node||_ord, of the part="pos"/"neg" entries only if asked.
    x (N, D) -> (N, E)"""
    a = node_activations(moe, x, node, rank, w_down).float()            # (N, E, width)
    if part != "all":
        a = F.relu(a if part == "pos" else -a)                          # keep one sign, zero the other
    return torch.linalg.vector_norm(a, ord=ord, dim=-1)                 # (N, E)


def select_experts(moe: MoE, x: torch.Tensor, rule: Rule, generator: torch.Generator | None = None,
                   w_down: torch.Tensor | None = None) -> Routing:
    """Choose each token's K experts under `rule`.  x (N, D) -> Routing with (N, K) gates/experts."""
    _check_moe(moe)
    K, E = moe.top_k, moe.n_experts
    norms = (node_scores(moe, x, rule.node, rule.rank, rule.ord, rule.part, w_down)
             if rule.uses_norm else None)                                     # (N, E)
    if rule.kind == "router":
        r = route(moe.router(x), K, moe.renormalize)
    elif rule.kind == "norm":
        r = route(norms, K, moe.renormalize)
    else:
        N = x.shape[0]
        scores = torch.rand(N, E, generator=generator).to(x.device)         # (N, E) i.i.d. uniform
        experts = scores.topk(K, dim=-1).indices                             # a uniform random K-subset
        probs = torch.full((N, E), 1.0 / E, device=x.device)
        gates = torch.full((N, K), 1.0 / K, device=x.device)
        r = Routing(scores, probs, gates, experts)
    if not rule.swapped:
        return r
    # the control: keep r's experts, weigh them another way
    if rule.weighting == "equal":
        gates = torch.full(r.experts.shape, 1.0 / K, device=x.device)       # (N, K)
    else:
        w = moe.router(x) if rule.weighting == "router" else norms          # (N, E)
        gates = F.softmax(w.float(), dim=-1).gather(1, r.experts)          # (N, K)
        if moe.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(r.scores, r.probs, gates, r.experts)


def run_experts(moe: MoE, x: torch.Tensor, r: Routing) -> torch.Tensor:
    """The MoE's own experts (Eq. 1) for the choice in `r`, gate-weighted.  x (N, D) -> (N, D).
    The same dispatch pieces MoE.forward uses: only who chose the experts differs."""
    plan = plan_dispatch(r.experts, moe.n_experts)
    impl = resolve_impl(moe.dispatch, x)
    x_s = gather_rows(x, plan.token)                                    # (S, D)
    g = moe.gate_preactivation(x_s, plan, impl)                         # (S, H) x W_g^i
    y = swiglu_experts(x_s, g, moe.w_p, moe.w_o, plan, impl)            # (S, D)
    return combine(y, r.gates, plan, x.shape[0])                        # (N, D)


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How alike two top-k choices (N, K) are, token by token:
    same_set: the K experts are the same set;  overlap: mean |A ∩ B| / K;
    top1: the highest-scored experts coincide (columns are in descending score order, as topk gives)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two (N, K) expert tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    hits = (a[:, :, None] == b[:, None, :]).any(-1)                     # (N, K) a's expert in b's set
    K = a.shape[1]
    return {"same_set": hits.all(-1).float().mean().item(),
            "overlap": hits.float().sum(-1).div(K).mean().item(),
            "top1": (a[:, 0] == b[:, 0]).float().mean().item(),
            "tokens": a.shape[0]}


def chance_agreement(n_experts: int, top_k: int) -> dict:
    """What a uniformly random K-subset scores against any fixed choice, for reference."""
    return {"same_set": 1 / math.comb(n_experts, top_k), "overlap": top_k / n_experts,
            "top1": 1 / n_experts}


# --------------------------------------------------------------------------- a whole model under a rule

class RuleFFN(nn.Module):
    """Stands in for a trained MoE layer: the same experts, picked by another rule. Records how
    often its choice agrees with the router's on the same input (the router is still there,
    consulted only for the comparison). Returns no aux loss: nothing is being trained."""

    def __init__(self, moe: MoE, rule: Rule, layer: int = 0):
        super().__init__()
        _check_moe(moe)
        self.moe, self.rule = moe, rule
        self.w_down = svd_down_weights(moe, rule.rank) if rule.node == "svd_down" else None
        # one generator per layer, so every layer draws its own random experts, reproducibly
        self.generator = torch.Generator().manual_seed(rule.seed * 1_000_003 + layer)
        self.agree = {"same_set": 0.0, "overlap": 0.0, "top1": 0.0, "tokens": 0}
        self.counts = torch.zeros(moe.n_experts)                        # (E,) token-slots per expert
        self.last_routing: Routing | None = None

    @torch.no_grad()
    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(-1, D)                                            # (N, D)
        r = select_experts(self.moe, x, self.rule, self.generator, self.w_down)
        router = route(self.moe.router(x), self.moe.top_k, self.moe.renormalize)
        a = topk_agreement(r.experts, router.experts)
        n = a.pop("tokens")
        for k, v in a.items():
            self.agree[k] += v * n
        self.agree["tokens"] += n
        self.counts += count_per_expert(r.experts.reshape(-1), self.moe.n_experts).cpu().float()
        self.last_routing = r
        return run_experts(self.moe, x, r).view(B, T, D), x.new_zeros((), dtype=torch.float32)

    def agreement(self) -> dict:
        """Token-averaged agreement with the router, plus the routing statistics of this rule's choice
        (dispatch.routing_summary): load = share of token-slots per expert, ent_load its entropy in nats
        (Eq. 7, at most max_ent = log E), load_cv."""
        n = max(self.agree["tokens"], 1)
        load = self.counts / self.counts.sum().clamp_min(1)
        return {**{k: v / n for k, v in self.agree.items() if k != "tokens"}, **routing_summary(load)}


@contextmanager
def use_rule(model, rule: Rule):
    """Temporarily replace the selection rule of every MoE layer of `model` (a GPT with ffn='moe').
    Yields {layer index: RuleFFN}; the original layers are put back on exit, even on error."""
    layers = model.expert_layers()
    if not layers:
        raise ValueError(f"the model has no expert layers (ffn={model.config.ffn!r}); "
                         f"norm ranking needs a trained router MoE (ffn='moe')")
    swapped = {}
    try:
        for i, moe in layers:
            swapped[i] = RuleFFN(moe, rule, layer=i)
            model.blocks[i].ffn = swapped[i]
        yield swapped
    finally:
        for i, moe in layers:
            model.blocks[i].ffn = moe


@torch.no_grad()
def evaluate_rule(model, batches, rule: Rule = Rule("router")) -> dict:
    """Mean cross-entropy of `model` on `batches` [(x, y), ...] with every MoE layer using `rule`,
    its agreement with the router (averaged over tokens and layers; 1.0 for the router) and how
    evenly it spreads tokens (ent_load: Eq. 7 in nats, max_ent = log E when perfectly balanced).
    batch_losses: the loss of each batch, in order, for error bars (bootstrap_batches)."""
    was_training = model.training
    model.eval()
    try:
        with use_rule(model, rule) as layers:
            losses = []
            for x, y in batches:
                model(x, y)
                losses.append(model.last_ce_loss.item())
            per_layer = {i: f.agreement() for i, f in layers.items()}
    finally:
        model.train(was_training)
    mean = {k: float(np.mean([a[k] for a in per_layer.values()]))
            for k in ("same_set", "overlap", "top1", "ent_load", "max_ent")}
    return {"rule": rule.label, "val_loss": float(np.mean(losses)), **mean, "per_layer": per_layer,
            "batch_losses": losses}


def bootstrap_batches(losses, stat, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap over validation batches, paired: losses (R, B) holds R rules' losses on
    the SAME B batches, and every resample draws one set of batch indices for all rows, so the
    batch-to-batch variation that all rules share cancels in differences between them.
    stat maps an (R, B') array to a number or an (R,) array (e.g. the gap closed of every rule).
    -> (lo, hi), each like stat's output: the central `level` interval of stat over the resamples.
    It measures how much the numbers depend on which text was evaluated, not on the training seed."""
    losses = np.asarray(losses, dtype=float)
    if losses.ndim != 2 or losses.shape[1] < 2:
        raise ValueError(f"losses must be (rules, batches) with at least 2 batches, got {losses.shape}")
    rng = np.random.default_rng(seed)
    B = losses.shape[1]
    draws = np.stack([np.asarray(stat(losses[:, rng.integers(0, B, B)]), dtype=float)
                      for _ in range(n_boot)])                          # (n_boot, ...)
    tail = (1 - level) / 2 * 100
    return np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table. columns: [(key, header, format spec)], e.g. ("val_loss", "val loss", ".3f")."""
    cells = [[h for _, h, _ in columns]]
    cells += [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- what each expert sees

@torch.no_grad()
def ffn_inputs(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input x (B, T, D) that each expert layer receives for the tokens idx (B, T)
    (i.e. after the block's RMSNorm), captured with forward pre-hooks."""
    seen, hooks = {}, []
    for i, ffn in model.expert_layers():
        hooks.append(ffn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach())))
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def expert_choices(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Which K experts each token visits in each expert layer: {layer: (B, T, K)}, best first."""
    B, T = idx.shape
    model(idx)
    return {i: ffn.last_routing.experts.view(B, T, -1) for i, ffn in model.expert_layers()}


BYTE_CLASSES = ("letters", "digits", "space", "newline", "punctuation", "other")


def byte_class(tokens) -> np.ndarray:
    """Index into BYTE_CLASSES for each byte token (0-255)."""
    t = np.asarray(tokens).astype(np.int64)
    cls = np.full(t.shape, 5)
    is_punct = np.zeros(256, dtype=bool)
    is_punct[[ord(c) for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]] = True
    cls[is_punct[t.clip(0, 255)]] = 4
    cls[t == ord("\n")] = 3
    cls[t == ord(" ")] = 2
    cls[(t >= ord("0")) & (t <= ord("9"))] = 1
    cls[((t >= ord("a")) & (t <= ord("z"))) | ((t >= ord("A")) & (t <= ord("Z")))] = 0
    return cls


def expert_byte_classes(tokens, experts, n_experts: int) -> np.ndarray:
    """Share of each byte class among the tokens each expert takes (rows sum to 1; an expert that
    takes no token gets a row of zeros). tokens (N,), experts (N,) e.g. each token's top-1 expert.
    -> (n_experts, len(BYTE_CLASSES))"""
    cls = byte_class(tokens).reshape(-1)
    e = np.asarray(experts).reshape(-1)
    if cls.shape != e.shape:
        raise ValueError(f"tokens and experts must have the same number of elements, got {cls.size} and {e.size}")
    counts = np.zeros((n_experts, len(BYTE_CLASSES)))
    np.add.at(counts, (e, cls), 1)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def top_tokens_per_expert(tokens, experts, n_experts: int, k: int = 6, min_count: int = 20) -> list[list[tuple]]:
    """For each expert, the k tokens it takes most *preferentially*: lift = P(token | expert) /
    P(token), among tokens seen at least min_count times; ties (e.g. tokens the expert takes every
    time) go to the more frequent token. -> [[(token, lift, count), ...], ...]"""
    t = np.asarray(tokens).reshape(-1).astype(np.int64)
    e = np.asarray(experts).reshape(-1)
    V = int(t.max()) + 1
    joint = np.zeros((n_experts, V))
    np.add.at(joint, (e, t), 1)
    tok_total, exp_total = joint.sum(0), joint.sum(1)
    out = []
    for i in range(n_experts):
        lift = (joint[i] / max(exp_total[i], 1)) / np.maximum(tok_total / len(t), 1e-12)
        lift[(tok_total < min_count) | (joint[i] == 0)] = 0
        best = np.lexsort((-joint[i], -np.round(lift, 6)))[:k]     # by lift, then by count
        out.append([(int(b), float(lift[b]), int(joint[i, b])) for b in best if lift[b] > 0])
    return out


def _entropy_bits(counts) -> float:
    p = np.asarray(counts, dtype=float).reshape(-1)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def _codes(*arrays) -> np.ndarray:
    """One integer label per element for the tuple of labels (a_j, b_j, ...)."""
    stacked = np.stack([np.asarray(a).reshape(-1).astype(np.int64) for a in arrays], axis=1)
    return np.unique(stacked, axis=0, return_inverse=True)[1].reshape(-1)


def entropy_bits(*labels) -> float:
    """Plug-in (empirical) joint entropy H(A, B, ...) in bits of paired label arrays."""
    return _entropy_bits(np.bincount(_codes(*labels)))


def mutual_information(a, b, given=None) -> float:
    """Plug-in mutual information I(A; B) in bits of two paired label arrays (e.g. each token's
    byte and its expert), or with `given`, the conditional I(A; B | C) = H(A,C) + H(B,C) - H(A,B,C) - H(C).
    The plug-in estimate is biased upwards when there are many cells per sample (it is > 0 for
    independent labels); compare it with the same estimate on shuffled labels (see shuffled_within)."""
    if given is None:
        return max(0.0, entropy_bits(a) + entropy_bits(b) - entropy_bits(a, b))
    return max(0.0, entropy_bits(a, given) + entropy_bits(b, given) - entropy_bits(a, b, given) - entropy_bits(given))


def shuffled_within(labels, groups, seed: int = 0) -> np.ndarray:
    """labels permuted at random within each group: keeps every group's label counts (so H(labels | groups)
    and I(labels; groups) are unchanged) and destroys any other dependence. The null for a conditional MI."""
    labels, groups = np.asarray(labels).reshape(-1), np.asarray(groups).reshape(-1)
    rng = np.random.default_rng(seed)
    shuffled = np.lexsort((rng.random(len(groups)), groups))      # grouped, random order inside each group
    in_order = np.argsort(groups, kind="stable")                   # grouped, original order inside each group
    out = np.empty_like(labels)
    out[in_order] = labels[shuffled]            # position j of each group takes a random member's label
    return out


# --------------------------------------------------------------------------- runs the notebooks share

def train_or_load(model_config, train_config, name: str, cache_dir=None) -> dict:
    """Train once with minimoe.train, then reuse the run: the notebooks call this with the same
    configs and share one run instead of each training its own.

    The run lives in the run cache (files.cached_run, the study's too): <cache_dir or $MINIMOE_CACHE
    or ~/.cache/minimoe>/runs/<name>-<key>, the key covering both configs (train_config.out_dir and
    progress excluded), so a changed setting means a new run. A run counts as done once result.json
    is written (after training returned); an unfinished attempt is continued from its checkpoint by
    train(), which holds the folder's lock: a second process on the same run is refused in one line,
    never given a folder deleted under it.
    Returns {"model" (eval mode), "log" (log.jsonl rows), "result" (train()'s final metrics),
    "out_dir", "cached" (True if loaded)}.
    The caller's torch RNG is left as it was, trained or loaded, so what a notebook draws afterwards does
    not depend on whether its cache was warm."""
    with torch.random.fork_rng(devices=[]):    # CPU generator only: the runs here train on the CPU
        return _train_or_load(model_config, train_config, name, cache_dir)


def _train_or_load(model_config, train_config, name: str, cache_dir=None) -> dict:
    from .checkpoint import load_model         # lazy: the analysis helpers above need no I/O
    from .data import default_cache_dir, writing
    from .files import cached_run, read_log
    from .train import train

    settings = {"model": asdict(model_config),
                "train": {k: v for k, v in asdict(train_config).items() if k not in ("out_dir", "progress")}}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    run = cached_run(root, name, settings)
    result = run.result()
    cached = result is not None
    if not cached:
        with writing(run.folder.parent):       # an unwritable cache: one line naming it, before training
            run.folder.mkdir(parents=True, exist_ok=True)
        res = train(model_config, replace(train_config, out_dir=str(run.folder), init_from=run.init_from()))
        if res.get("interrupted"):
            raise RuntimeError(f"training of {name!r} was interrupted ({res['interrupted']}); run again")
        with writing(run.folder):
            run.finish({k: v for k, v in res.items() if k not in ("model", "sample")})
        result = run.result()                  # as a later call reads it back
    model, _ = load_model(run.folder)          # the checkpoint of the last evaluation = the final model
    return {"model": model, "log": read_log(run.folder), "result": result, "out_dir": run.folder, "cached": cached}
