"""The notebooks: committed with their outputs, and they run top to bottom, headless, without error.

Executing them trains two small models (shared by the three notebooks through a cache in a temporary
folder), and notebook 02 two more (its seed check), so this is the slowest file of the suite: about 5 minutes
on two CPU cores. The
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
NOTEBOOKS = ["01_low_rank_factorization", "02_norm_ranking", "03_router_vs_autonomy"]
# What a notebook may import: minimoe, the numeric/plotting stack and the standard library.
ALLOWED_IMPORTS = {"minimoe", "torch", "numpy", "matplotlib", "IPython", "copy", "math", "sys", "pathlib",
                   "tempfile", "time", "dataclasses"}


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
    """The three notebooks train with the same settings, so the cache trains each model once."""
    settings = []
    for name in NOTEBOOKS:
        code = code_of(read(name))
        tiny = re.search(r"^TINY = .*$", code, re.M)
        run = re.search(r"^RUN = TrainConfig\((.*?)\)$", code, re.M | re.S)
        assert tiny and run, name
        settings.append((tiny.group(0), " ".join(run.group(1).split())))
    assert settings[0] == settings[1] == settings[2]


@pytest.mark.parametrize("name,figure", [("01_low_rank_factorization", "01_spectrum.png"),
                                         ("02_norm_ranking", "02_norm_ranking.png"),
                                         ("03_router_vs_autonomy", "03_bytes_by_expert.png")])
def test_readme_figures_exist(name, figure):
    path = NB_DIR / "figures" / figure
    assert path.is_file() and path.stat().st_size < 300_000
    assert f'FIG_DIR / "{figure}"' in code_of(read(name))


# --------------------------------------------------------------------------- executing them

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory and a model cache shared by the three executions."""
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
    check_02_seeds(out)


def check_02_seeds(out):
    """Notebook 02's seed check: the claims its prose makes about three trainings of the MoE."""
    seeds = re.findall(r"^seed\s+(\d+): router (\d\.\d{4}) \(the run logged (\d\.\d{4})\)", out, re.M)
    assert [s for s, _, _ in seeds] == ["1337", "2", "3"] and all(a == b for _, a, b in seeds), seeds
    rows = re.findall(r"^(L\S+ norm of .+?)((?:\s+-?\d+%){3})\s+(-?\d+) ± (\d+)\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d)/3$",
                      out, re.M)
    assert len(rows) == 9 + 11, rows                         # softmax gates: 9 rules; equal: the 9 + 2 parts
    for label, per_seed, mean, _, batch, sd, _ in rows:
        gaps = [int(v) for v in re.findall(r"-?\d+", per_seed)]
        assert abs(sum(gaps) / 3 - int(mean)) <= 1, (label, gaps, mean)
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
