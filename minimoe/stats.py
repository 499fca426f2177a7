"""The statistics of the studies: means with Student-t 95% confidence intervals, paired differences.

    mean_ci(values)            (mean, half-width of its 95% CI), t_{0.975, n-1} * s / sqrt(n)
    paired_difference(a, b)    the same for a[s] - b[s] over the seeds both have: the pairing removes
                               the noise two runs of one seed share (same init draws, same batches)
    fmt_ci(m, ci)              "1.2345 ± 0.0012"
    t_quantile_975(df)         exact to 7 digits for df <= 10 (tables), Cornish-Fisher beyond

No numpy or scipy: a reader can check every number by hand.
"""

import math
import statistics

# t_{0.975, df}: the two-sided 95% quantile of Student's t, exact to 7 digits for df <= 10
# (standard tables); beyond, the Cornish-Fisher expansion below (error < 1e-5 for df > 10).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 6: 2.4469119,
        7: 2.3646243, 8: 2.3060041, 9: 2.2621572, 10: 2.2281389}
Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df), the multiplier of the standard error in a 95% CI from df+1 samples."""
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"degrees of freedom df={df!r} is invalid: must be an integer >= 1")
    if df in T975:
        return T975[df]
    z, n = Z975, float(df)            # Cornish-Fisher expansion of t in powers of 1/df (A&S 26.7.5)
    return (z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4))


def mean_ci(values) -> tuple[float, float | None]:
    """(mean, half-width of its 95% CI): mean +- t_{0.975,n-1} * s / sqrt(n). One value: no CI."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value")
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired_difference(a: dict, b: dict) -> tuple[float | None, float | None, int]:
    """a, b: {seed: value}. Mean and 95% CI half-width of a[s] - b[s] over the seeds both have,
    and how many those are. The pairing removes the noise the two runs of one seed share."""
    common = sorted(set(a) & set(b))
    if not common:
        return None, None, 0
    m, ci = mean_ci([a[s] - b[s] for s in common])
    return m, ci, len(common)


def fmt_ci(m, ci, digits=4, sign=False) -> str:
    """'m ± ci' with `digits` decimals ('+' shown when sign=True); '-' for no value, 'm' for no CI."""
    if m is None:
        return "-"
    s = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return s if ci is None else f"{s} ± {ci:.{digits}f}"
