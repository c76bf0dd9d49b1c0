"""The methods the benchmark runs, as data: a method is (name, family, how to run it).

* ``cli``: arguments appended to ``solar compress --base {base} --adapter {adapter} --out FILE``;
  the file is restored with ``solar decompress FILE --base {base} --out DIR``. Arguments may use
  the placeholders ``{base}``, ``{adapter}``, ``{model}`` and ``{workdir}`` (e.g. a calibrated
  variant: ``Method("spectral-cal t=0.05", "solar-spectral-cal", cli=["--mode", "spectral",
  "--target-error", "0.05", "--calib", "{workdir}/calib.safetensors"])``).
* ``codec``: a Python codec, ``encode(adapter, path, **params) -> dict`` and
  ``decode(adapter, path) -> state dict`` (bench/baselines.py has the built-in ones); ``params``
  are passed to ``encode``.

To add a family, append to ``EXTRA_METHODS`` (or edit ``methods_for``); ``--only`` filters by
family and ``--match`` by a regular expression on the name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bench import baselines


@dataclass
class Method:
    name: str
    family: str
    cli: list[str] | None = None
    codec: tuple[Callable, Callable] | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        assert (self.cli is None) != (self.codec is None), f"{self.name}: give exactly one of cli / codec"

    @property
    def kind(self) -> str:
        return "cli" if self.cli is not None else "python"


def codec(name: str, family: str, kind: str, **params) -> Method:
    return Method(name, family, codec=baselines.CODECS[kind], params=params)


# Extra methods appended for every model: list of callables (model, smoke) -> list[Method].
EXTRA_METHODS: list[Callable[[str, bool], list[Method]]] = []

FAMILY_ORDER = ["peft", "int-quant", "svd-fp16", "svd+int8", "svd+int4", "svd+int3/2", "compeft", "nola",
                "solar-paper", "solar-paper-refit", "solar-paper-omp", "solar-spectral", "solar-spectral-abs", "solar-spectral-w",
                "solar-spectral-wgram", "solar-spectral-cal", "solar-spectral-mix", "solar-spectral-selfcal",
                "solar-spectral-rw", "solar-spectral-refine", "solar-spectral-polish"]

# Calibrated spectral: K-FAC statistics from bench/calibration.py (computed once, cached).
# Finer steps where the retention levels of the headline (90 / 95 / 99 %) are crossed.
SPECTRAL_CAL_TARGETS = [0.45, 0.4, 0.375, 0.35, 0.325, 0.3, 0.275, 0.27, 0.26, 0.25, 0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05,
                        0.04, 0.03]

# Data-free spectral, default balance (1: every layer's relative error counts the same), so the
# target is the root mean square of the layers' relative errors.
SPECTRAL_TARGETS = [0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.07, 0.05, 0.03, 0.02]
# The same with --balance 0 (the whole adapter's relative error; the default before balance).
SPECTRAL_ABS_TARGETS = [0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01]
SPECTRAL_W_TARGETS = [0.5, 0.35, 0.2, 0.1, 0.05, 0.02]
# What W alone can stand in for: errors weighted by W^T W instead of calibration statistics.
SPECTRAL_WGRAM_TARGETS = [0.3, 0.2, 0.1, 0.05, 0.02]


# SmolLM2 points cost a ~15 s evaluation each (and a 538 MB base read for the modes that use W):
# fewer points per family, the same range.
SMOLLM2_SUBSETS = {
    "solar-spectral": [0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03],
    "solar-spectral-abs": [0.4, 0.3, 0.2, 0.12, 0.07, 0.03],
    "solar-spectral-w": [0.35, 0.1],
    "solar-spectral-wgram": [0.2, 0.05],
    "solar-spectral-cal": [0.4, 0.3, 0.275, 0.27, 0.26, 0.25, 0.2, 0.15, 0.1, 0.07, 0.06, 0.05, 0.03],
    # The same with the sizes near 90% that the attention-mixed statistics reach at other targets
    # (their t = 0.4 / 0.3 files are 3,136 / 4,279 B).
    "solar-spectral-mix": [0.4, 0.375, 0.35, 0.325, 0.3, 0.275, 0.27, 0.26, 0.25, 0.2, 0.15, 0.1, 0.07, 0.06, 0.05,
                           0.03],
    "compeft": [0.1, 0.3],
}


def paper_grid(model: str, smoke: bool) -> list[tuple[int, float, int]]:
    """(N, keep fraction, bits) points for paper mode and its NOLA-style twin."""
    if smoke:
        return [(1000, 0.3, 8)]
    grid = [(n, f, b) for n in (100, 1000, 4000) for f in (0.1, 0.3, 1.0) for b in (8, 4)]
    if model == "minilm_sst2":
        # A MiniLM factor has r*n = 3072 entries: N = 100 spans at most 3 % of it (retention ~0
        # whatever k and b): one point. N = 4000 costs a 3072 x 4000 least squares per factor per
        # point (measured: 8 min wall for the whole adapter on 2 busy cores): one point.
        grid = [g for g in grid if (g[0] == 100 and g[1:] == (1.0, 8)) or (g[0] == 1000 and g[1:] != (0.1, 4)) or
                (g[0] == 4000 and g[1:] == (0.3, 8))]
    elif model == "smollm2_e2e":
        # 60 modules, factors of up to r*n = 4608 entries. Measured (2 threads): N = 100 5 s, N = 1000
        # 36 s per point; N = 4000 had not finished one point after 15 min: left out.
        grid = [g for g in grid if (g[0] == 100 and g[1:] == (1.0, 8)) or (g[0] == 1000 and g[1:] != (0.1, 4))]
    return grid


def methods_for(model: str, rank: int, smoke: bool = False) -> list[Method]:
    ms: list[Method] = [
        codec("PEFT fp32", "peft", "peft", dtype="fp32"),
        codec("PEFT fp16", "peft", "peft", dtype="fp16"),
    ]
    for b in ((8, 4) if smoke else (8, 4, 3, 2)):
        ms.append(codec(f"int{b} per-channel", "int-quant", "quant", bits=b))
    ranks = [max(1, rank // 2)] if smoke else list(range(1, rank))
    if model in ("minilm_sst2", "smollm2_e2e") and not smoke:
        ranks = [1, 2, 4, 6]  # of 1..7: each MiniLM point costs a ~15 s evaluation, each SmolLM2 point ~30 s
    for k in ranks:
        ms.append(codec(f"SVD rank {k} fp16", "svd-fp16", "svd", rank=k))
        ms.append(codec(f"SVD rank {k} int8", "svd+int8", "svd", rank=k, bits=8))
        if not smoke:
            ms.append(codec(f"SVD rank {k} int4", "svd+int4", "svd", rank=k, bits=4))
            # Coarser still, as a user squeezing the rank cut would try (MiniLM: rank 1 int3
            # keeps 93.7% at 4,368 B, smaller than rank 1 int4 at the 90% level).
            for b in (3, 2):
                ms.append(codec(f"SVD rank {k} int{b}", "svd+int3/2", "svd", rank=k, bits=b))
    for d in ((0.2,) if smoke else (0.05, 0.1, 0.2, 0.3)):
        ms.append(codec(f"ComPEFT d={d:g}", "compeft", "compeft", density=d))
    for n, f, b in paper_grid(model, smoke):
        ms.append(codec(f"NOLA N={n} keep={f:g} b={b}", "nola", "nola", pool=n, keep_fraction=f, bits=b, seed=0))
        ms.append(Method(f"paper N={n} keep={f:g} b={b}", "solar-paper",
                         cli=["--mode", "paper", "--pool", str(n), "--keep-fraction", f"{f:g}", "--bits", str(b),
                              "--seed", "0"]))
    for t in ((0.2, 0.05) if smoke else SPECTRAL_TARGETS):
        ms.append(spectral_method(model, "solar-spectral", target_error=t))
    if not smoke:
        for t in SPECTRAL_ABS_TARGETS:
            ms.append(Method(f"spectral balance=0 t={t:g}", "solar-spectral-abs",
                             cli=["--mode", "spectral", "--balance", "0", "--target-error", f"{t:g}"]))
    for t in ((0.05,) if smoke else SPECTRAL_W_TARGETS):
        ms.append(Method(f"spectral-w t={t:g}", "solar-spectral-w",
                         cli=["--mode", "spectral-w", "--target-error", f"{t:g}"]))
    if not smoke:
        for t in SPECTRAL_WGRAM_TARGETS:
            ms.append(Method(f"spectral base-gram t={t:g}", "solar-spectral-wgram",
                             cli=["--mode", "spectral", "--proxy", "base-gram", "--target-error", f"{t:g}"]))
        # The paper's method with its solver repaired (same file format, same decoder).
        for n, f in ((1000, 0.1), (1000, 0.3)):
            ms.append(Method(f"paper-refit N={n} keep={f:g} b=8", "solar-paper-refit",
                             cli=["--mode", "paper", "--solver", "refit", "--pool", str(n), "--keep-fraction", f"{f:g}",
                                  "--bits", "8", "--seed", "0"]))
        if model == "stories260k":  # OMP costs k passes over the pool: too slow for MiniLM's 3072-entry factors
            for k in (50, 100, 200):
                ms.append(Method(f"paper-omp N=1000 k={k} b=8", "solar-paper-omp",
                                 cli=["--mode", "paper", "--solver", "omp", "--pool", "1000", "--keep", str(k),
                                      "--bits", "8", "--seed", "0"]))
        for t in SPECTRAL_CAL_TARGETS:
            ms.append(spectral_method(model, "solar-spectral-cal", target_error=t))
        for t in SPECTRAL_CAL_TARGETS:  # the same data, value projections' moments mixed by attention
            ms.append(spectral_method(model, "solar-spectral-mix", target_error=t))
        from bench.calibration import REWEIGH_BYTES
        if model in REWEIGH_BYTES:  # the K-FAC statistics re-weighed with the model in the loop, once
            for t in SPECTRAL_CAL_TARGETS:
                ms.append(spectral_method(model, "solar-spectral-rw", target_error=t))
        from bench.self_calibration import SELF_CALIBRATED
        if model in SELF_CALIBRATED:  # causal LMs: statistics from the model's own samples, no data
            for t in SPECTRAL_CAL_TARGETS:
                ms.append(spectral_method(model, "solar-spectral-selfcal", target_error=t))
    for extra in EXTRA_METHODS:
        ms.extend(extra(model, smoke))
    if model == "smollm2_e2e" and not smoke:
        ms = [m for m in ms if _in_subset(m, SMOLLM2_SUBSETS)]
    return ms


# The families a user would aim by size (`--target-bytes`): data-free, calibrated, calibrated with
# attention-mixed value statistics (`solar.calibrate(attention_mixing=True)`), self-calibrated,
# calibrated with statistics re-weighed by the model once (`solar.reweigh`), and calibrated with the
# model in the loop for each file (`solar.refine`; half-size checks only, ~100 s a point), and the
# data-free file with its integers moved against the model (`solar.polish`; half-size checks only).
SPECTRAL_PREFIX = {"solar-spectral": "spectral", "solar-spectral-cal": "spectral+calib",
                   "solar-spectral-mix": "spectral+calib+mix",
                   "solar-spectral-selfcal": "spectral+selfcal", "solar-spectral-rw": "spectral+calib+reweigh",
                   "solar-spectral-refine": "spectral+calib+refine", "solar-spectral-polish": "spectral+polish"}
# Where refine and polish run in the report: stories260K. On MiniLM refine kept less of the gain than plain
# compress at 4,325 B with every objective tried (bench.refine_check); SmolLM2's rounds take minutes each.
REFINED = {"stories260k"}


def _model_setup(adapter, model: str):
    """refine_check's (PeftModel, training batches, output_fn, compress options) for the model,
    with the run's passthrough coding."""
    from bench.refine_check import SETUPS

    peft_model, batches, output_fn, options = SETUPS[model]()
    if adapter.passthrough_coding != "matched":
        options["passthrough"] = adapter.passthrough_coding
    return peft_model, batches, output_fn, options


def _refine_encode(adapter, path, model: str, target_bytes: int) -> dict:
    import solar
    from bench.calibration import stats_path

    peft_model, batches, output_fn, options = _model_setup(adapter, model)
    packed = solar.refine(peft_model, batches, None, target_bytes=target_bytes, output_fn=output_fn,
                          calibration=str(stats_path(model)), **options)
    packed.save(path)
    return {"divergence": packed.refinement["divergence"], "best_round": packed.refinement["best"]}


def _polish_encode(adapter, path, model: str, target_bytes: int) -> dict:
    """The data-free file at the budget (uniform quantiser: the only one polish can move), its
    integers then moved against the divergence on refine's training windows."""
    import solar

    peft_model, batches, output_fn, options = _model_setup(adapter, model)
    plain = solar.compress(peft_model, None, target_bytes=target_bytes, quantiser="uniform", **options)
    packed = solar.polish(peft_model, batches, plain, output_fn=output_fn)
    packed.save(path)
    h = packed.refinement["polish"]
    return {"divergence": h["divergence"][h["best"]], "divergence_before": h["divergence"][0],
            "best_step": h["best"], "moved": h["moved"]}


def _restore_file(adapter, path) -> dict:
    import solar

    return solar.restore(path, None)


# The families that run the model for each file (aimed by size only), and their encoders.
MODEL_IN_LOOP = {"solar-spectral-refine": _refine_encode, "solar-spectral-polish": _polish_encode}


def spectral_method(model: str, family: str, target_error: float | None = None,
                    target_bytes: int | None = None) -> Method:
    """A point of one of the SPECTRAL_PREFIX families, aimed by --target-error (named "t=...") or
    by --target-bytes (named "B=...")."""
    assert (target_error is None) != (target_bytes is None)
    if family in MODEL_IN_LOOP:
        assert target_bytes is not None, f"{family} is aimed by size only"
        return Method(f"{SPECTRAL_PREFIX[family]} B={target_bytes}", family, codec=(MODEL_IN_LOOP[family], _restore_file),
                      params={"model": model, "target_bytes": target_bytes})
    args = ["--mode", "spectral"]
    if family == "solar-spectral-cal":
        from bench.calibration import stats_path
        args += ["--calib", str(stats_path(model))]
    elif family == "solar-spectral-mix":
        from bench.calibration import stats_path
        args += ["--calib", str(stats_path(model, mixed=True))]
    elif family == "solar-spectral-selfcal":
        from bench.self_calibration import self_stats_path
        args += ["--calib", str(self_stats_path(model))]
    elif family == "solar-spectral-rw":
        from bench.calibration import reweighed_path
        args += ["--calib", str(reweighed_path(model))]
    if target_bytes is None:
        return Method(f"{SPECTRAL_PREFIX[family]} t={target_error:g}", family, cli=args + ["--target-error", f"{target_error:g}"])
    return Method(f"{SPECTRAL_PREFIX[family]} B={target_bytes}", family, cli=args + ["--target-bytes", str(target_bytes)])


def method_of_point(model: str, rank: int, smoke: bool, point: dict) -> Method:
    """The method that made a point of the results JSON (a grid point, or a half-size check's)."""
    if "target_bytes" in point:
        return spectral_method(model, point["family"], target_bytes=point["target_bytes"])
    return next(m for m in methods_for(model, rank, smoke) if m.name == point["name"])


def _in_subset(m: Method, subsets: dict[str, list[float]]) -> bool:
    """Whether a point's target (t=..., d=...) is in its family's subset (families not listed: all)."""
    family = "solar-spectral-cal" if m.family == "solar-spectral-selfcal" else m.family
    if family not in subsets:
        return True
    value = float(m.name.rsplit("=", 1)[1])
    return any(abs(value - v) < 1e-9 for v in subsets[family])
