"""The aggregate functions a query may name, and the shape of each call: how many fields,
which parameters, which named options. Checked by `spec.AggSpec`; shared by the daemon
and the client."""

from __future__ import annotations

from dataclasses import dataclass

from stimnet.query.voxeltests import VOXEL_TESTS


@dataclass(frozen=True)
class FuncShape:
    min_fields: int
    max_fields: int | None  # None: unbounded
    params: str | None = None  # "edges" | "probs" | "maxit" | None
    # Named options (`min_n => 10`) the aggregate accepts: stimnet/query/voxeltests.py.
    options: frozenset[str] = frozenset()


# The options every voxel-wise test takes (N-threshold, correction across voxels).
TEST_OPTIONS = frozenset({"min_n", "min_frac", "correction", "alpha"})

FUNCS: dict[str, FuncShape] = {
    "count": FuncShape(0, 1),
    "sum": FuncShape(1, 1),
    "mean": FuncShape(1, 1),
    "var": FuncShape(1, 1),
    "sd": FuncShape(1, 1),
    "histogram": FuncShape(1, 1, "edges"),
    "quantiles": FuncShape(1, 1, "probs"),
    "corr": FuncShape(2, 2),
    "contingency": FuncShape(2, 2),
    "regression": FuncShape(2, None),  # (y, x1, ..., xp)
    "count_map": FuncShape(1, 1),
    "mean_map": FuncShape(1, 2),  # (image, [weight])
    "roi_overlap": FuncShape(1, 1),
    # Voxel-wise tests from per-voxel n, Σw, Σw² (stimnet/query/voxeltests.py):
    # (image, weight); prop_map's weight is its condition (AggSpec.condition).
    "tmap": FuncShape(2, 2, options=frozenset({"mu", *TEST_OPTIONS})),
    "tmap2": FuncShape(2, 2, options=TEST_OPTIONS),
    # (continuous image, weight): Pearson r per voxel over the cohort.
    "corr_map": FuncShape(2, 2, options=TEST_OPTIONS),
    "prop_map": FuncShape(1, 1, options=TEST_OPTIONS),
    # Models (stimnet/query/models.py): the only aggregate of their query, no GROUP BY.
    # glm_*: (response, term, ...), params (maxit,) optional; meta_*: each site's own fit.
    "glm_binomial": FuncShape(2, None, "maxit"),
    "glm_poisson": FuncShape(2, None, "maxit"),
    "glm_gaussian": FuncShape(2, None, "maxit"),
    "meta_mean": FuncShape(1, 1),
    "meta_regression": FuncShape(2, None),
    "meta_glm_binomial": FuncShape(2, None, "maxit"),
    "meta_glm_poisson": FuncShape(2, None, "maxit"),
    "meta_glm_gaussian": FuncShape(2, None, "maxit"),
    # Quantiles by bisection on pooled counts of x <= t (multi-round, stimnetd/jobs/quantiles.py).
    "quantiles_bisect": FuncShape(1, 1, "probs"),
}


IMAGE_FUNCS = frozenset({"count_map", "mean_map", "roi_overlap", *VOXEL_TESTS})
MODEL_PREFIXES = ("glm_", "meta_", "quantiles_bisect")
