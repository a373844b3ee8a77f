"""Plots and a self-contained ``report.html`` for one or several filter analyses.

An analysis directory is what :func:`icnn_compress.analyze.analyze_run` writes (``analysis.json``,
``matrices.pt``, ``gallery/<layer>.jpg``). :func:`render_analysis` adds ``plots/*.png`` and
``report.html`` to it; :func:`build_report` puts several analyses side by side in one page (e.g. ICNN and
baseline) and appends further ``(title, html_fragment)`` sections, so that a later stage (the Captum
comparison) can add its own; :func:`report_sections` returns one analysis's sections for such a page.
Every image is embedded as a base64 ``data:`` URI, so the page is one file that opens anywhere, offline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from markupsafe import Markup

from icnn_compress.runtime.files import atomic_write_text, data_uri
from icnn_compress.runtime.templates import macro, render

__all__ = ["build_report", "render_analysis", "report", "report_sections", "write_plots"]

_TEMPLATE = "analysis.html.j2"

_SUMMARY_ROWS = [
    ("num_filters", "filters"),
    ("num_silent", "silent filters"),
    ("mean_activation_rate", "mean activation rate"),
    ("mean_exclusivity", "mean category exclusivity ↑"),
    ("mean_spatial_entropy", "mean spatial entropy ↓"),
    ("mean_inter_category_entropy", "mean H(T′|X) (nats) ↓"),
    ("mean_mi_spatial_entropy", "mean spatial term Σp(T⁺,x)H(T⁺|x) (nats) ↓"),
    ("mean_mis", "mean MIS (nats) ↑"),
    ("location_instability", "location instability ↓"),
    ("part_interpretability", "part interpretability ↑"),
    ("num_redundant", "redundant filters (Σ cluster size − 1)"),
]
_FILTER_COLUMNS = [("filter", "#"), ("category_name", "category"), ("activation_rate", "rate"),
                   ("exclusivity", "excl."), ("spatial_entropy", "sp. ent."), ("mis", "MIS"),
                   ("location_instability", "instab."), ("tracked_landmark", "tracks"),
                   ("part_interpretability", "part IoU"), ("best_part", "part"), ("cluster", "cluster"),
                   ("silent", "silent")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _load(analysis_dir: str | Path) -> dict[str, Any]:
    path = Path(analysis_dir) / "analysis.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `icnn analyze RUN --out {analysis_dir}` first")
    return json.loads(path.read_text())


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "model"


def _values(filters: list[dict], layer: str, key: str) -> list[float]:
    return [f[key] for f in filters if f["layer"] == layer and f.get(key) is not None and not f.get("silent")]


def write_plots(analysis_dir: str | Path, *, baseline: str | Path | None = None) -> dict[str, Path]:
    """Write ``plots/<layer>_distributions.png``, ``_redundancy.png`` and (with ``baseline``) ``_instability.png``.

    ``baseline`` is another analysis directory (e.g. the baseline run's) whose per-filter location
    instability is drawn against this one's. Returns the written files by name.
    """
    plt = _pyplot()
    root = Path(analysis_dir)
    doc = _load(root)
    base = _load(baseline) if baseline is not None else None
    out = root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    mats_path = root / "matrices.pt"
    mats = torch.load(mats_path, map_location="cpu", weights_only=True)["matrices"] if mats_path.is_file() else {}
    written: dict[str, Path] = {}
    for layer, summ in doc["summary"]["layers"].items():
        fig, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
        panels = [("exclusivity", "category exclusivity", (0, 1)), ("spatial_entropy", "spatial entropy", (0, 1)),
                  ("activation_rate", "activation rate", (0, 1)), ("mis", "MIS (nats)", None),
                  ("location_instability", "location instability", None)]
        for ax, (key, title, rng) in zip(axes.flat, panels):
            v = _values(doc["filters"], layer, key)
            if v:
                lo, hi = min(v), max(v)
                if rng is None and hi - lo < 1e-9 * max(1.0, abs(hi)):
                    # values equal up to rounding (e.g. every MIS ~1e-17): numpy cannot cut 20 bins from that
                    rng = (lo - 0.5, hi + 0.5)
                ax.hist(v, bins=20, range=rng, color="#3b6ea5")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            ax.set_ylabel("filters")
        ax = axes.flat[5]
        hist = summ.get("category_histogram", {})
        ax.bar(range(len(hist)), list(hist.values()), color="#a5533b")
        ax.set_xticks(range(len(hist)), list(hist), rotation=45, ha="right", fontsize=8)
        ax.set_title("filters per category")
        fig.suptitle(f"{layer}: {summ['num_filters']} filters, {summ['num_silent']} silent")
        written[f"{layer}_distributions"] = _save(fig, out / f"{_safe(layer)}_distributions.png", plt)

        if layer in mats:
            m = mats[layer]
            red = torch.minimum(m["peak_correlation"], m["map_correlation"]).nan_to_num(0.0)
            order = m["order"]
            red = red[order][:, order]
            fig, ax = plt.subplots(figsize=(6, 5.2), constrained_layout=True)
            im = ax.imshow(red.numpy(), vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
            fig.colorbar(im, ax=ax, label="min(peak corr., map corr.)")
            pos = 0
            for c in summ.get("clusters", []):
                size = len(c["members"])
                ax.add_patch(plt.Rectangle((pos - 0.5, pos - 0.5), size, size, fill=False, ec="black", lw=1))
                pos += size
            ax.set_title(f"{layer}: redundancy, ordered by cluster ({len(summ.get('clusters', []))} clusters)")
            ax.set_xlabel("filter (cluster order)")
            written[f"{layer}_redundancy"] = _save(fig, out / f"{_safe(layer)}_redundancy.png", plt)

        if base is not None and layer in base["summary"]["layers"]:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
            mine = _values(doc["filters"], layer, "location_instability")
            theirs = _values(base["filters"], layer, "location_instability")
            label_me = doc["summary"].get("arm") or root.name
            label_base = base["summary"].get("arm") or Path(baseline).name
            if mine or theirs:
                hi = max(mine + theirs)
                ax1.hist([theirs, mine], bins=20, range=(0, hi), label=[label_base, label_me],
                         color=["#999999", "#3b6ea5"])
                ax1.legend()
            ax1.set_title("per-filter location instability")
            ax1.set_xlabel("instability (lower: more stable)")
            names = list(summ.get("instability_per_landmark", {}))
            b_lm = base["summary"]["layers"][layer].get("instability_per_landmark", {})
            x = list(range(len(names) + 1))
            mv = [summ.get("instability_per_landmark", {}).get(n) or 0 for n in names] + [summ.get("location_instability") or 0]
            bv = [b_lm.get(n) or 0 for n in names] + [base["summary"]["layers"][layer].get("location_instability") or 0]
            ax2.bar([i - 0.2 for i in x], bv, 0.4, label=label_base, color="#999999")
            ax2.bar([i + 0.2 for i in x], mv, 0.4, label=label_me, color="#3b6ea5")
            ax2.set_xticks(x, names + ["mean"])
            ax2.set_title("mean instability per landmark")
            ax2.legend()
            fig.suptitle(f"{layer}: location instability, {label_me} vs {label_base}")
            written[f"{layer}_instability"] = _save(fig, out / f"{_safe(layer)}_instability.png", plt)
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    """A table cell's text (escaped by the template): – for a missing or non-finite value."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def report_sections(analysis_dir: str | Path, *, baseline: str | Path | None = None,
                    max_table_rows: int = 512) -> list[tuple[str, str]]:
    """Return one analysis's report as ``(title, html_fragment)`` sections (plots are written when missing)."""
    root = Path(analysis_dir)
    doc = _load(root)
    plots = root / "plots"
    if not plots.is_dir() or (baseline is not None and not any(plots.glob("*_instability.png"))):
        write_plots(root, baseline=baseline)
    s = doc["summary"]
    name = s.get("arm") or root.name
    accuracy = s.get("accuracy")
    sections: list[tuple[str, str]] = [
        (f"{name}: summary", str(macro(_TEMPLATE, "summary")(s, None if accuracy is None else 100 * accuracy,
                                                             _SUMMARY_ROWS, _fmt)))]
    for layer, summ in s["layers"].items():
        images = [(data_uri(p), f"{layer} {alt}") for suffix, alt in (
            ("distributions", "distributions"), ("redundancy", "redundancy heat map"),
            ("instability", "instability vs baseline")) if (p := plots / f"{_safe(layer)}_{suffix}.png").is_file()]
        sections.append((f"{name}: {layer}", str(macro(_TEMPLATE, "layer")(images, summ.get("clusters", [])))))
        filters = [f for f in doc["filters"] if f["layer"] == layer][:max_table_rows]
        gallery = root / "gallery" / f"{_safe(layer)}.jpg"
        sections.append((f"{name}: {layer} filters", str(macro(_TEMPLATE, "filters")(
            _FILTER_COLUMNS, filters, _fmt, data_uri(gallery) if gallery.is_file() else None, layer))))
    return sections


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }
.columns { display: grid; grid-template-columns: repeat(var(--n), minmax(0, 1fr)); gap: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0; }
.scroll { max-height: 420px; overflow: auto; margin: 0.5em 0; }
code { font-size: 0.9em; }
"""


def build_report(out: str | Path, *, analyses: Sequence[str | Path], extra_sections: Sequence[tuple[str, str]] = (),
                 baseline: str | Path | None = None, title: str = "Filter analysis") -> Path:
    """Write ``out/report.html`` with the ``analyses`` side by side, then ``extra_sections``; return its path.

    Args:
        out: output directory (created), or a path ending in ``.html``.
        analyses: analysis directories, one column each (left to right).
        extra_sections: ``(title, html_fragment)`` appended full width, e.g.
            ``[("", compare_html_section(compare_dir))]``; an empty title adds no heading. The fragments are
            HTML and go in as they are; everything else on the page is escaped.
        baseline: an analysis directory whose instability the others are plotted against.
        title: the page title.
    """
    out = Path(out)
    page = out if out.suffix == ".html" else out / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    if not analyses and not extra_sections:
        raise ValueError("nothing to report: pass at least one analysis directory")
    columns = []
    for a in analyses:
        base = baseline if baseline is not None and Path(baseline).resolve() != Path(a).resolve() else None
        columns.append([(t, Markup(frag)) for t, frag in report_sections(a, baseline=base)])
    text = render("report.html.j2", title=title, css=Markup(_CSS), columns=columns,
                  side_by_side=_comparison_table(analyses) if len(analyses) > 1 else None,
                  extra_sections=[(t, Markup(frag)) for t, frag in extra_sections])
    atomic_write_text(page, text.rstrip("\n") + "\n")
    return page


def _comparison_table(analyses: Sequence[str | Path]) -> Markup:
    docs = [(_load(a)["summary"], Path(a)) for a in analyses]
    layers = [layer for layer in docs[0][0]["layers"] if all(layer in d["layers"] for d, _ in docs)]
    return macro(_TEMPLATE, "side_by_side")(layers, [(d, d.get("arm") or p.name) for d, p in docs],
                                            _SUMMARY_ROWS, _fmt)


def render_analysis(analysis_dir: str | Path, *, baseline: str | Path | None = None) -> Path:
    """Write the plots and ``report.html`` of one analysis directory (against ``baseline`` when given)."""
    write_plots(analysis_dir, baseline=baseline)
    return build_report(analysis_dir, analyses=[analysis_dir], baseline=baseline,
                        title=f"Filter analysis: {Path(analysis_dir).name}")


def report(analysis_dirs: Sequence[str | Path], out: str | Path, *,
           extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Put analyses side by side in ``out/report.html`` (``icnn report A B --out DIR``); the last is the baseline.

    With two or more analyses, the instability of each is plotted against the last one's.
    """
    dirs = list(analysis_dirs)
    baseline = dirs[-1] if len(dirs) > 1 else None
    for d in dirs:
        write_plots(d, baseline=baseline if d != baseline else None)
    return build_report(out, analyses=dirs, baseline=baseline, extra_sections=extra_sections,
                        title="Filter analysis: " + " vs ".join(Path(d).name for d in dirs))
