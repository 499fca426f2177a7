"""The notebooks: committed with their outputs, and they run top to bottom, headless, without error.

Executing them trains two small models shared by all four notebooks through a cache in a temporary folder,
notebook 02 two more (its seed check) and notebook 04 one more (an ERC run), so this is the slowest file of the
suite: about 5-6 minutes on two CPU cores. The
notebooks run in a temporary working directory, so the figures they export never overwrite the
committed ones in notebooks/figures/.
"""

import ast
import os
from pathlib import Path
import re

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_low_rank_factorization", "02_norm_ranking", "03_router_vs_autonomy", "04_gradients_and_successors"]
# What a notebook may import: minimoe, the numeric/plotting stack and the standard library.
ALLOWED_IMPORTS = {"minimoe", "torch", "numpy", "matplotlib", "IPython", "copy", "math", "sys", "pathlib",
                   "tempfile", "time", "dataclasses", "json"}


def read(name):
    return nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)


def code_of(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def text_of(nb):
    """All stream output of the notebook, in order."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def images_of(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# --------------------------------------------------------------------------- the committed files

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs_and_no_errors(name):
    path = NB_DIR / f"{name}.ipynb"
    assert path.stat().st_size < 1_000_000, f"{path} is {path.stat().st_size} bytes; keep figures small"
    nb = read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "commit the notebook executed"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"cells were not run once, top to bottom: {counts}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert images_of(nb) >= 2
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_import_minimoe_and_copy_no_model_code(name):
    tree = ast.parse(code_of(read(name)))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    assert "minimoe" in imported
    classes = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    assert not classes, f"notebooks define no classes (model code lives in minimoe): {classes}"


def test_notebooks_share_their_runs():
    """The notebooks train with the same settings, so the cache trains each model once."""
    settings = []
    for name in NOTEBOOKS:
        code = code_of(read(name))
        tiny = re.search(r"^TINY = .*$", code, re.M)
        run = re.search(r"^RUN = TrainConfig\((.*?)\)$", code, re.M | re.S)
        assert tiny and run, name
        settings.append((tiny.group(0), " ".join(run.group(1).split())))
    assert all(s == settings[0] for s in settings), settings


@pytest.mark.parametrize("name,figure", [("01_low_rank_factorization", "01_spectrum.png"),
                                         ("02_norm_ranking", "02_norm_ranking.png"),
                                         ("03_router_vs_autonomy", "03_bytes_by_expert.png"),
                                         ("04_gradients_and_successors", "04_gradients_and_successors.png")])
def test_readme_figures_exist(name, figure):
    path = NB_DIR / "figures" / figure
    assert path.is_file() and path.stat().st_size < 300_000
    assert f'FIG_DIR / "{figure}"' in code_of(read(name))


# --------------------------------------------------------------------------- executing them

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory and a model cache shared by the notebooks' executions."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def run_notebook(workdir):
    env = {"MINIMOE_CACHE": str(workdir / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                       # the kernel inherits this process's environment
    executed = {}

    def run(name):
        if name not in executed:
            nb = read(name)
            for c in nb.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(workdir)}}).execute()
            executed[name] = nb
        return executed[name]

    yield run
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_01_low_rank_factorization_runs(run_notebook, workdir):
    nb = run_notebook("01_low_rank_factorization")
    out = text_of(nb)
    for check in ("U^T U = I: True | V^T V = I: True", "U diag(s) V^T == W: True",
                  "sum of rank-1 pieces == W: True", "W_down @ W_up == truncated SVD: True",
                  "||x U_r S_r|| == ||x W_r||: True"):
        assert check in out, check
    # Eckart-Young, as printed: the SVD's error is the formula's and no other rank-r matrix beats it
    errors = dict(re.findall(r"^(.+?)\s+(?:rank\s+\d+\s+)?relative error (\d\.\d+)$", out, re.M))
    svd, formula = float(errors["truncated SVD (top r)"]), float(errors["formula sqrt(1 - energy(r))"])
    assert svd == formula
    assert all(float(v) >= svd for v in errors.values())
    # spectral norm: the SVD's error is s_(r+1), and no other candidate does better
    spec = re.search(r"s_\(r\+1\) = (\d\.\d+); spectral norm .*$", out, re.M)
    spectral = [float(v) for v in re.findall(r"(\d+\.\d+)", spec.group(0).split(":", 1)[1])]
    assert spectral[0] == float(spec.group(1)) == min(spectral)
    assert "4392" in out and "3264" in out                   # Eq. 5's d_wide at the paper's scale
    # the hand-made SVD (power iteration + deflation) is torch's
    assert "same s, U and V as torch (up to sign): True True True" in out
    # on real activations the whitened SVD beats the plain one (and loses on the weights), and gradient
    # descent on the activation error finds the whitened SVD's error, not the plain one's
    at = {k: (float(w), float(a)) for k, w, a in re.findall(
        r"^at r = d_low = 24: (plain|whitened) SVD\s+weight error (\d\.\d+), activation error (\d\.\d+)$", out, re.M)}
    assert at["whitened"][1] < at["plain"][1] < at["plain"][0] < at["whitened"][0], at
    fit = dict(re.findall(r"^expert 0, rank 24, (.+?)\s+error on val activations (\d\.\d+)", out, re.M))
    adam, white, plain = (float(fit[k]) for k in ("A @ B fitted by Adam on activations", "whitened SVD", "plain SVD"))
    assert abs(adam - white) < 0.01 < plain - adam, fit
    # the balanced split minimizes ||A||^2 + ||B||^2, to 2 ||W_r||_*
    nuclear = float(re.search(r"2 sum\(s_j\) = (\d+\.\d+)", out).group(1))
    splits = {float(a): float(v) for a, v in re.findall(r"alpha=(\d\.\d+): \|\|W_down\|\|\^2 \+ \|\|W_up\|\|\^2 =\s+(\d+\.\d+)", out)}
    assert len(splits) == 5 and splits[0.5] == nuclear == min(splits.values())
    assert images_of(nb) >= 2 and (workdir / "figures" / "01_spectrum.png").is_file()


def test_02_norm_ranking_runs(run_notebook, workdir):
    nb = run_notebook("02_norm_ranking")
    out = text_of(nb)
    assert "matches minimoe's AoE layer: True" in out
    assert "same experts as minimoe chose: True" in out
    logged = re.search(r"router val loss (\d+\.\d+); the run logged (\d+\.\d+)", out)
    assert logged and logged.group(1) == logged.group(2)
    # the 2-D toy: a linear node's norm cannot tell x from -x, a linear router always does
    assert re.search(r"^norm of a linear node.+x and -x at 100% of the points, for x and 3x at 100%$", out, re.M)
    assert re.search(r"^linear router.+x and -x at 0% of the points", out, re.M)
    ci = r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]"
    rows = re.findall(r"^(router \(trained\)|random experts|L\S+ norm of .+?)\s+" + ci +
                      r"\s+(-?\d+)% \[\s*(-?\d+)%,\s*(-?\d+)%\]\s+(\d\.\d\d)\s+(\d\.\d\d)\s+(\d\.\d\d)"
                      r"\s+(\d\.\d\d)\s+[+-]\d\.\d+ \[[+-]\d\.\d+, [+-]\d\.\d+\]$", out, re.M)
    assert len(rows) == 15, rows
    router = rows[0]
    assert router[0] == "router (trained)" and router[4:7] == ("100",) * 3 and router[7:10] == ("1.00",) * 3
    for row in rows:                                          # every bootstrap interval holds its estimate
        loss, lo, hi = map(float, row[1:4])
        gap, glo, ghi = map(int, row[4:7])
        assert lo <= loss <= hi and glo <= gap <= ghi, row
    # the controls: each norm rule's experts under three weightings, and the router's under equal gates
    weighted = re.findall(r"^(L\S+ norm of .+?)(\s+-?\d+% \[\s*-?\d+%,\s*-?\d+%\]){3}\s+"
                          r"[+-]\d\.\d+ \[[+-]\d\.\d+, [+-]\d\.\d+\]$", out, re.M)
    assert len(weighted) == 13, weighted
    equal = re.search(r"^router, equal gates\s+" + ci + r"\s+(\d+)%", out, re.M)
    assert equal and int(equal.group(4)) < 100                # any other weighting costs the router something
    # x and -x: linear nodes pick the same pair by construction, the router never does
    sym = dict(re.findall(r"^  (router \(trained\)|L2 norm of .+?)\s+(\d\.\d\d)$", out, re.M))
    assert sym["router (trained)"] == "0.00" and sym["L2 norm of x W_g"] == sym["L2 norm of x W_p"] == "1.00"
    assert sym["L2 norm of SiLU(x W_g)"] != "1.00"
    assert len(re.findall(r"^L2 norm of x W_[gp], (positive|negative) part\s+-?\d+% \[", out, re.M)) == 4
    assert (workdir / "figures" / "02_norm_ranking.png").is_file()
    check_02_seed_table(out)


def test_02_seed_claims_hold_on_the_committed_outputs():
    """The prose's claims about three trainings of the MoE, on the outputs the prose describes (the committed ones).
    Which rule wins on which seed depends on the trained models, and those differ in their last digits between CPUs
    (the committed run: Intel Xeon; CI's machine has given another MoE, val 1.8253 against 1.8361, from the same code),
    so a fresh execution is held to the table's structure only (check_02_seed_table)."""
    out = text_of(read("02_norm_ranking"))
    check_02_seed_table(out)
    check_02_seed_claims(out)


def check_02_seed_table(out):
    """Notebook 02's seed check, the parts that hold on any machine: three seeds, each the run it logged, 9 + 11
    rows whose mean is the mean of the per-seed gaps."""
    seeds = re.findall(r"^seed\s+(\d+): router (\d\.\d{4}) \(the run logged (\d\.\d{4})\)", out, re.M)
    assert [s for s, _, _ in seeds] == ["1337", "2", "3"] and all(a == b for _, a, b in seeds), seeds
    rows = re.findall(r"^(L\S+ norm of .+?)((?:\s+-?\d+%){3})\s+(-?\d+) ± (\d+)\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d)/3$",
                      out, re.M)
    assert len(rows) == 9 + 11, rows                         # softmax gates: 9 rules; equal: the 9 + 2 parts
    for label, per_seed, mean, _, batch, sd, _ in rows:
        gaps = [int(v) for v in re.findall(r"-?\d+", per_seed)]
        assert abs(sum(gaps) / 3 - int(mean)) <= 1, (label, gaps, mean)
    return rows


def check_02_seed_claims(out):
    """The claims notebook 02's prose makes about its three trainings (see test_02_seed_claims_hold_on_...)."""
    rows = check_02_seed_table(out)
    for label, per_seed, mean, _, batch, sd, _ in rows:
        assert float(sd) > float(batch), label               # the seed moves a gap more than the batches do
    softmax, equal = rows[:9], rows[9:]
    above = {label: int(a) for label, *_, a in softmax}
    assert above.pop("L1 norm of x W_g") == 2 and set(above.values()) == {3}, above   # only L1 ever below random
    assert all(int(row[-1]) == 3 for row in equal), equal
    best = re.search(r"^softmax gates, best rule: seed 1337: (.+?); seed 2: (.+?); seed 3: (.+)$", out, re.M)
    assert best.group(1) == "Linf norm of x W_g" and len(set(best.groups())) == 3, best.groups()
    num = r"([+-]\d+\.\d)"
    paired = {label: ([float(v) for v in d], float(m), float(ci), int(n)) for label, *d, m, ci, n in re.findall(
        rf"^  (.+?)\s+{num}\s+{num}\s+{num}\s+{num} ± (\d+\.\d)\s+(\d)/3$", out, re.M)}
    assert len(paired) == 9 + 4 + 3, paired
    holds = lambda name: paired[name][3]                     # seeds on which the difference is positive
    excludes_0 = {name for name, (_, m, ci, _) in paired.items() if abs(m) > ci}
    assert excludes_0 == {"x W_g positive part - negative part", "x W_down rank 16 - x W_g (L2)",
                          "L1 - L2 norm of x W_g"}, excludes_0
    assert holds("x W_g positive part - negative part") == 3 and holds("x W_g positive part - whole x W_g") == 0
    assert holds("x W_down rank 16 - x W_g (L2)") == holds("x W_down rank 16 - rank 4") == 3
    assert holds("L1 - L2 norm of x W_g") == 0 and holds("Linf - L2 norm of x W_g") in (1, 2)
    always = {r for r in ("L2 norm of x W_g", "L2 norm of x W_p", "L2 norm of SiLU(x W_g)",
                          "L2 norm of SiLU(x W_g) * x W_p", "L2 norm of E_i(x)",
                          "L2 norm of x W_down (rank-4 SVD of W_g)", "L2 norm of x W_down (rank-16 SVD of W_g)",
                          "L1 norm of x W_g", "Linf norm of x W_g") if holds(r) == 3}
    assert always == {"L2 norm of SiLU(x W_g) * x W_p", "L2 norm of x W_p", "L2 norm of x W_down (rank-4 SVD of W_g)",
                      "L1 norm of x W_g"}, always               # equal gates beat the softmax on all 3 seeds
    ranks = dict(re.findall(r"^(L\S+ norm of .+?)((?:\s+\d){6})$", out, re.M))
    soft = {label: [int(v) for v in r.split()[:3]] for label, r in ranks.items()}
    assert len(soft) == 9 and soft["L1 norm of x W_g"] == [9] * 3 and soft["L2 norm of x W_p"] == [7] * 3
    assert max(soft["L2 norm of E_i(x)"] + soft["L2 norm of x W_down (rank-16 SVD of W_g)"]) <= 3


def test_03_router_vs_autonomy_runs(run_notebook, workdir):
    nb = run_notebook("03_router_vs_autonomy")
    out = text_of(nb)
    # the budget table: AoE (Eq. 5) matches total parameters, not active ones; aoe=F matches active FLOPs
    acct = {m: (int(t.replace(",", "")), int(a.replace(",", "")), da)
            for m, t, a, da in re.findall(r"^(moe|aoe|aoe=F)\s+\d+\s+[\d,]+\s+[\d,]+\s+([\d,]+)\s+\S+\s+([\d,]+)\s+(\S+)",
                                          out, re.M)}
    assert set(acct) == {"moe", "aoe", "aoe=F"}, acct
    assert acct["aoe"][0] == acct["moe"][0] and acct["aoe"][1] > acct["moe"][1]
    assert abs(acct["aoe=F"][1] / acct["moe"][1] - 1) < 0.03 and acct["aoe=F"][0] < acct["moe"][0]
    # the seed study: every variant's mean +- CI over 3 paired seeds, and the paired differences
    assert len(re.findall(r"^(moe|aoe)\s+\d\.\d{4} ± \d\.\d{4}", out, re.M)) == 2
    assert len(re.findall(r"paired aoe - moe: [+-]\d\.\d{4} ± \d\.\d{4} \(n=3\)", out)) == 1
    # rescaling W_down by c and W_up by 1/c: the same experts, the same expert computation, another Ent_conf
    scale = re.findall(r"^(\d+(?:\.\d+)?)\s+(True|False)\s+(\d\.\de[+-]\d+)\s+\d\.\d{3}((?:\s+\d\.\d{3}){4})\s+\d\.\d{4}$",
                       out, re.M)
    assert len(scale) == 5, scale
    assert all(same == "True" and float(d) < 1e-4 for _, same, d, _ in scale)
    ent0 = [float(e.split()[0]) for *_, e in scale]
    assert ent0 == sorted(ent0, reverse=True) and ent0[0] - ent0[-1] > 0.5   # larger c: sharper softmax
    # mutual information per layer: bounded by H(E), and the shuffled control below the measured value
    mi = re.findall(r"^(MOE|AOE)\s+(\d)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+\d+%\s+[\d.]+%\s+(\d\.\d{3})\s+(\d\.\d{3})",
                    out, re.M)
    assert len(mi) == 8, mi
    for _, _, h, i_be, i_ctx, i_null in mi:
        assert 0 <= float(i_be) <= float(h) <= 3.0 and float(i_null) <= float(i_ctx)
    losses = dict(re.findall(r"^(MoE.+?|AoE.+?)\s{2,}(\d+\.\d{6})$", out, re.M))
    assert len(losses) == 6, losses
    converted = float(losses["MoE -> AoE by SVD, d_low=24, no training"])
    tuned = float(losses["MoE -> AoE d_low=24 + 100 steps"])
    assert tuned < converted                                  # fine-tuning recovers from the conversion
    assert images_of(nb) >= 5 and (workdir / "figures" / "03_bytes_by_expert.png").is_file()


def test_04_gradients_and_successors_runs(run_notebook, workdir):
    nb = run_notebook("04_gradients_and_successors")
    out = text_of(nb)
    g = r"(0 \(exactly\)|\d\.\d\de[+-]\d\d)"                  # a gradient norm as printed: exact zero or x.xxe-yy
    num = lambda v: 0.0 if v.startswith("0 (") else float(v)   # noqa: E731
    # 1: one token, LM loss only: the losers' W_up, W_p, W_o get exactly 0 in every layer, W_down at most rounding
    layers = re.findall(r"^layer \d: winners \[\d, \d\]; the 6 losers' W_up, W_p, W_o gradients == 0 exactly: (True|False); "
                        r"losers' W_down: largest " + g + r" \(the winners' smallest: (\d\.\d\de[+-]\d\d)\)$", out, re.M)
    assert len(layers) == 4, layers
    assert all(z == "True" and num(lo) < 1e-6 < 0.1 < float(w) for z, lo, w in layers), layers
    # 1b: the hand computation is the layer; the two paths add up to the total; the gate path is parallel to a_i,
    # carries less than the W_up path, and dL/d||a_i|| of the two winners cancel
    for check in ("same output as minimoe's layer: True", "same gradients as the model's backward for W_down, W_up, "
                  "W_p, W_o: True", "dL/dW_down^i == outer(x, dL/da_i): True", "gate part + W_up part == total: True"):
        assert check in out, check
    split = re.findall(r"^\d\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\de-\d\d)\s+([+-]\d\.\d{4})\s+([+-]1\.000)$",
                       out, re.M)
    assert len(split) == 2, split
    # the gate path carries less than the W_up path, and the two add up (so |total| <= |gate| + |up|; the paths can
    # partly cancel, so |up| may exceed |total|: it does for one winner on an AMD EPYC execution)
    assert all(float(gate) < float(up) and float(total) <= float(gate) + float(up) + 2e-4 and float(s_) < 1e-6
               for total, gate, up, s_, _, _ in split)
    assert sorted(c for *_, c in split) == ["+1.000", "-1.000"] and float(split[0][4]) == -float(split[1][4])
    assert abs(float(re.search(r"dL/d\|\|a_i\|\| of the two winners sums to ([+-]\d\.\de[+-]\d\d)", out).group(1))) < 1e-6
    # 1c: Alg. 2's softmax over the winners gives exactly 0; the renormalized softmax over all E only rounding
    assert "Alg. 2's form: the losers' W_down gradient == 0 exactly in every layer: True" in out
    fp32, fp64 = map(float, re.search(r"minimoe's form: at most (\S+) in fp32 and (\S+) in fp64", out).groups())
    assert fp32 < 1e-6 and fp64 < 1e-12
    # 2: the losers' expert weights stay exactly 0 in every setting; their scorer rows get a real gradient
    # without renormalization and with Eq. 6, only rounding otherwise
    rows = re.findall(r"^(AOE|MOE)\s+(renormalized|not renormalized)\s+(0|0\.01)\s+(W_down|W_r\[i\])\s+(\S+)\s+" + g +
                      r"\s+W_\w+, W_p, W_o\s+(True|False)$", out, re.M)
    assert len(rows) == 6, rows
    for model, gates, alpha, _, win, lose, rest in rows:
        assert rest == "True" and float(win) > 1e-3, (model, gates, alpha)
        if gates == "renormalized" and alpha == "0":
            assert num(lose) < 1e-6, (model, lose)
        else:
            assert num(lose) > 1e-3, (model, gates, alpha, lose)
    pairs = re.findall(r"^  layer \d: \|\|grad W_r\[i\]\|\| = (\d\.\d{4}) and (\d\.\d{4}), cosine (-?\d\.\d{4})$", out, re.M)
    assert len(pairs) == 4 and all(a == b and c == "-1.0000" for a, b, c in pairs), pairs
    assert "winners pushed down: True; losers pushed up: True" in out
    # 3: the bias is no parameter and gets no gradient; one update is the formula; on a skewed router the
    # load entropy rises to about log 8 through bias updates alone, and the gates stay unbiased
    for check in ("requires_grad: False; among the parameters the optimizer gets: False; in the state dict (saved with "
                  "the model): True", "expert_bias.grad is None: True", "update_biases gave b + gamma * sign(mean(c) - c): True",
                  "the scores never changed: True", "(the bias never enters them): True"):
        assert check in out, check
    ent = [float(e) for e in re.findall(r"^(?:0|1|10|50|100|200|300)\s+(\d\.\d{3})\s+\d+\.\d%\s+\d+\.\d%\s+[+-]", out, re.M)]
    assert len(ent) == 7 and ent[0] < ent[1] < ent[2] and ent[-1] > ent[0] + 0.05 and ent[-1] >= 2.07, ent
    # 4: ERC is zero when the margins hold; 50 steps of ERC alone, and ERC in training, satisfy every margin;
    # trained with ERC, the router agrees more with the experts' norm ranking (the notebook's claim, one seed)
    assert "M_ok: ERC loss (alpha = 1) = 0.0000" in out and "M_bad: ERC loss (alpha = 1) = 0.0556" in out
    after = re.findall(r"^\d\s+after 50 ERC steps\s+(\d\.\d{4})\s+(\d+)\s+(\d)\s+", out, re.M)
    assert len(after) == 4 and all(lo == "0.0000" and v == "0" and own == "8" for lo, v, own in after), after
    trained = re.findall(r"^\d\s+moe\+erc\s+(\d\.\d{4})\s+(\d+)\s+(\d\.\d{3})\s+(\d\.\d{3})$", out, re.M)
    assert len(trained) == 4 and all(lo == "0.0000" and v == "0" for lo, v, _, _ in trained), trained
    assert re.search(r"val loss at step 0: moe (\d\.\d{4}), moe\+erc \1 \(the same init\)", out)
    moe_ov, erc_ov = map(float, re.search(r"mean top-2 overlap over the 4 layers: moe (\d\.\d{3}), moe\+erc (\d\.\d{3})",
                                          out).groups())
    assert erc_ov > moe_ov
    # 5: the committed studies: seven one-seed variants, and the paired 5-seed rows
    assert len(re.findall(r"^(moe|aoe|moe\+bias|aoe\+bias|moe\+erc|moe-lowrank|moe-bigrouter)\s+\d\.\d{4}\s+(-|[+-]\d\.\d{4})"
                          r"\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.M)) == 7
    assert len(re.findall(r"[+-]\d\.\d{4} ± \d\.\d{4} \(n=5\)", out)) == 3
    assert images_of(nb) >= 4 and (workdir / "figures" / "04_gradients_and_successors.png").is_file()
