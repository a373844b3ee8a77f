"""Per-filter analysis in one streaming pass: what each filter does, and which filters are dead weight.

The measures follow Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks" (CVPR 2018,
https://arxiv.org/abs/1710.00935); METHOD.md sections 3, 6 and 8 give the exact rules. Every measure is
accumulated as running sums (float64) in one dict of tensors per layer, so that memory does not grow
with the dataset (``O(D²)`` for the correlations) and so that the dicts of several processes can be
combined with :func:`merge_states` (sums add, log-sum-exps ``logaddexp``, top-k lists merge,
histograms are re-binned to the coarser scale and added); the ``N × D`` peaks are concatenated. The only per-image state is
``N × D`` peak values and peak positions (small scalars) for the location instability.

Definitions (``x`` is a filter's ``(h, w)`` map on one image, clamped at 0 like the post-ReLU maps the
method works on; the "peak" is ``max_ij x``):

* ``activation_rate``: fraction of images whose peak exceeds ``silent_threshold``; ``silent``: the rate
  is below ``silent_fraction``.
* ``category``: the given filter category (the mask's ``.category``), else the class with the largest
  mean peak. ``exclusivity``: the share of the peak activation mass on that category, class-balanced:
  ``m_c / Σ_c m_c`` with ``m_c`` the mean peak over images of class ``c`` (the raw mass share on
  balanced data; 1 = fires only on its category, ``1/C`` = indifferent).
* ``inter_category_entropy`` = H(T′|X) and ``mi_spatial_entropy`` = Σ_x p(T⁺,x)·H(T⁺|X=x), the two
  terms of METHOD.md section 3 with the paper's templates (τ = 0.5/n², β = 4, uniform prior over the
  n²+1 templates), in nats. ``Z_T`` is "estimated from many maps and updated gradually" as the paper
  says: each batch uses the running mean of ``exp(tr(x·T))`` over all images seen so far (this batch
  included), and ``p(x) ∝ Σ_T p(T)·exp(tr(x·T))/mean(exp(tr(x·T)))`` weights each image. In the paper's
  units (τ = 0.5/n²) maps of small magnitude make every template nearly equally likely, so these two
  terms sit close to their maxima for any filter on a small network; they are reported for fidelity.
* ``spatial_entropy`` (the headline spatial measure): the entropy of the map normalised to a
  distribution over cells, ``−Σ p log p`` with ``p = x / Σx``, divided by ``log(h·w)`` (0 = one cell,
  1 = uniform), averaged over images weighted by the peak (images where the filter is silent do not
  count). It is the spatial term with the posterior over positions taken proportional to the activation,
  which is scale-free.
* ``peak_correlation``: Pearson correlation over images of two filters' peaks. ``map_correlation``: the
  mean over images (where both maps are non-constant) of the Pearson correlation over cells of the two
  maps, i.e. the correlation of per-image standardised maps accumulated as sums. Two filters are
  redundant when ``min(peak_correlation, map_correlation) ≥ redundancy_threshold``: they fire on the same
  images at the same places. ``cluster``: leader clusters of that relation, best filter first (highest
  ``exclusivity − spatial_entropy``: most exclusive, best localised): a filter redundant with a leader
  already taken joins it (its ``best``), else it leads its own, so every member is redundant with the best
  itself (connected components would chain unlike filters through intermediate ones).
* ``mis``: the mutual information (nats) between the filter's spatially averaged activation and the
  one-vs-rest label of class ``c``, max over ``c`` (``mis_class``). Plug-in estimate on a streaming
  histogram of ``mis_bins`` equal-width bins over ``[0, hi]``, where ``hi`` doubles (merging bin pairs,
  exact) whenever a larger value arrives; its positive bias is about ``(bins − 1)/(2N)``.
* ``location_instability``: :func:`~icnn_compress.method.metrics.location_instability` per filter and landmark,
  "cls" rule (top images of the filter's category), from the per-image peak cells.
* ``part_interpretability`` (METHOD.md section 6): the region ``x > q`` with ``q`` the filter's top 0.5%
  quantile over all cells of all images, up-sampled to the image by nearest neighbour (exactly, on the map
  grid: part masks are area-pooled onto the cells); a filter counts on an image when the IoU with a part
  mask exceeds 0.2; ``P_f`` = max over parts of the fraction of images of the filter's category that
  contain the part on which it counts. ``q`` comes from a streaming doubling histogram of all cell values
  (``quantile_bins`` bins) and is the running estimate after the current batch: early batches use a
  quantile estimated on fewer images (shuffle the loader; :func:`analyze_run` does).
* ``estimate_stride`` (default 4): the map correlation, the spatial entropy, the two template terms and
  the part quantile's histogram are estimated on every 4th image of each batch (a fixed subsample of the
  data); every other measure (peaks, peak correlation, exclusivity, MIS, instability, the part IoU
  counts) uses every image. This keeps the pass near 0.85× of plain inference
  (``benchmarks/bench_analyze.py``).

On a GPU the whole pass stays on the device: the running statistics and the per-image peaks are summed
there, the end-of-pass reductions (correlations, cluster labels, MIS, location instability, part scores)
run there, and each layer's results come to the host in one copy; nothing waits for the device per batch
or per filter.

``analysis.json`` schema (written by :func:`analyze_run`, the dict :func:`analyze` returns minus the
tensors under ``"matrices"`` and ``"top"``)::

    {"summary": {"num_images", "classes", "landmark_names", "image_size", "settings": {...},
                 "run", "arm", "split", "accuracy" (a fraction, when computed),
                 "layers": {layer: {"num_filters", "map_size", "geometry", "num_silent", "mean_activation_rate",
                     "mean_exclusivity", "mean_spatial_entropy", "mean_inter_category_entropy",
                     "mean_mi_spatial_entropy", "mean_mis", "location_instability",
                     "instability_per_landmark": {name: v}, "part_interpretability",
                     "part_threshold_quantile", "category_histogram": {class: n},
                     "part_interpretability_per_part": {part: v} (mean over live filters),
                     "landmark_tracking": {name: n}, "landmark_entropy", "landmark_coverage" (the histogram's
                     entropy / log K and the share of landmarks tracked by >= 10 % of the filters),
                     "clusters": [{"members": [i, ...], "best": i}]
                     (clusters of two or more), "num_redundant" (filters a pruner could drop: Σ (size − 1))}}},
     "filters": [{"layer", "filter", "category", "category_name", "activation_rate", "silent",
                  "mean_peak", "exclusivity", "inter_category_entropy", "mi_spatial_entropy",
                  "spatial_entropy", "mis", "mis_class", "cluster" (id, -1 = alone), "cluster_best" (bool),
                  "max_redundancy" (largest min-correlation with another filter), "redundant_with" (its
                  closest filter), "location_instability", "instability_per_landmark": {name: v},
                  "tracked_landmark", "part_interpretability", "best_part",
                  "top_images": [{"index", "value", "x", "y"}]}, ...]}

Undefined values (a silent filter's exclusivity, a measure without landmarks) are ``null``.

The package: ``_statistics`` (the running sums and their merge), ``_summaries`` (per-filter measures and
the layer summary from the sums), ``_outputs`` (``analysis.json``, ``filters.csv``, the gallery), ``_run``
(the pass over a loader and the ``icnn analyze`` stage).
"""

from ._outputs import write_analysis, write_gallery
from ._run import analyze, analyze_run
from ._statistics import merge_states

__all__ = ["analyze", "analyze_run", "merge_states", "write_analysis", "write_gallery"]
