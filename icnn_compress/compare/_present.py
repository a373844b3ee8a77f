"""How a comparison is shown: the table (markdown and HTML), the figure grid, and the report section."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from icnn_compress.runtime.files import data_uri
from icnn_compress.runtime.templates import render

from ._explainers import REFERENCE_EXPLAINERS

__all__ = ["compare_html_section", "format_compare_table", "format_drift_table", "plot_grid"]

# (key in an explainer summary, column title, format); arrows say which way is better.
_COLUMNS = (
    ("pointing_game", "pointing ↑", "{:.2f}"),
    ("peak_distance_std", "dist. std ↓", "{:.3f}"),
    ("deletion_auc", "deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "insertion AUC ↑", "{:.3f}"),
    ("infidelity", "infidelity ↓", "{:.3g}"),
    ("sensitivity_max", "max-sens. ↓", "{:.3f}"),
    ("seconds_per_image", "ms / image", None),
    ("empty_fraction", "empty", "{:.0%}"),
)
_LANDMARK_COLOURS = ("#ffd400", "#00d5ff", "#ff3df5", "#5dff3d", "#ff8c00", "#ff4040", "#4060ff", "#c0c0c0")


def _cell(summary: Mapping[str, Any], key: str, fmt: str | None) -> str:
    value = summary.get(key)
    if value is None:
        return "-"
    if key == "seconds_per_image":
        return f"{value * 1000:.1f}"
    text = fmt.format(value)
    se = summary.get(f"{key}_se")
    if se is not None and key == "pointing_game":
        text += f" ± {se:.2f}"
    return text


def _rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes of the comparison table."""
    header = ["model", "explainer"] + [title for _, title, _ in _COLUMNS]
    rows, notes = [], []
    for model, summary in result["models"].items():
        for name, ex in summary["explainers"].items():
            label = f"{name} (ref.)" if name in REFERENCE_EXPLAINERS else name
            rows.append([model, label] + [_cell(ex, key, fmt) for key, _, fmt in _COLUMNS])
        excl = summary.get("exclusivity")
        line = (f"{model}: accuracy {summary['accuracy']:.1%} on these images, layer {summary['layer']}, "
                f"maps explain the {'true' if summary['target'] == 'label' else 'predicted'} class")
        if excl and excl.get("exclusivity") is not None:
            line += (f"; filter category exclusivity (conductance) {excl['exclusivity']:.2f}, strongest class = "
                     f"mask category for {excl['category_agreement']:.0%} of {excl['filters']} filters "
                     f"(chance {excl['chance']:.2f})")
        fpc = summary.get("filters_per_class")
        if fpc:
            line += "; filters per class " + ", ".join(f"{k} {v}" for k, v in fpc.items())
        notes.append(line)
    first = next(iter(result["models"].values()))
    notes.append(
        f"{result.get('num_images', first['num_images'])} {result.get('split', '')} images; pointing game: "
        f"peak within {first['radius_px']:.1f} px of a visible landmark (± standard error); dist. std: std of "
        "peak-to-landmark distance / image diagonal, per class and landmark, averaged; deletion / insertion: "
        "AUC of the class probability; infidelity and max-sensitivity (Captum) on the first "
        f"{max(e.get('robust_images', 0) for e in first['explainers'].values())} images; (ref.) rows are "
        "references: a fixed centre map and a random map (chance).")
    if not result.get("landmarks"):
        notes.append("the data has no landmarks: the pointing game and the distance spread were skipped (-); "
                     "deletion, insertion, infidelity and max-sensitivity need none")
    return header, rows, notes


def format_compare_table(result: Mapping[str, Any]) -> str:
    """Return the comparison as a markdown table with its footnotes (also readable as plain text)."""
    header, rows, notes = _rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines += [f"- {n}" for n in notes]
    if result.get("drift"):
        lines += ["", format_drift_table(result["drift"], result.get("drift_of", "model"))]
    return "\n".join(lines)


def format_drift_table(drift: Mapping[str, Mapping[str, Any]], model: str = "model") -> str:
    """The explanation drift (:func:`~icnn_compress.compare.explanation_drift`) as a markdown table."""
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    lines = [f"Explanation drift, parent → {model} (same images, same class):", "",
             "| explainer | rank corr. of maps ↑ | pointing parent → pruned | dist. std parent → pruned |",
             "|---|---|---|---|"]
    for name, d in drift.items():
        rho = f(d.get("rank_correlation"), "{:.3f}") + (f" ± {d['rank_correlation_se']:.3f}"
                                                          if d.get("rank_correlation_se") is not None else "")
        lines.append(f"| {name} | {rho} | {f(d.get('pointing_game_parent'), '{:.2f}')} → "
                     f"{f(d.get('pointing_game'), '{:.2f}')} | {f(d.get('peak_distance_std_parent'), '{:.3f}')} → "
                     f"{f(d.get('peak_distance_std'), '{:.3f}')} |")
    return "\n".join(lines)


def _denormalise(image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    img = image.float()
    if mean is not None and std is not None:
        img = img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0)  # (S, S, 3)


def plot_grid(
    examples: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    landmark_names: Sequence[str],
    classes: Sequence[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    include_references: bool = False,
) -> Path:
    """Draw images × explainers (per model) as a JPEG: each map over its image, landmarks and the peak marked.

    Args:
        examples: per model, :attr:`Comparison.examples` (same images for every model, matched by index).
        path: the JPEG written.
        methods: column order (default: the maps present); references are left out unless asked.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    models = list(examples)
    by_index = {m: {int(e["index"]): e for e in examples[m]} for m in models}
    order = [int(e["index"]) for e in examples[models[0]]] if models else []
    cols: list[tuple[str, str]] = []
    for m in models:
        names = list(methods) if methods is not None else (list(examples[m][0]["maps"]) if examples[m] else [])
        cols += [(m, n) for n in names if include_references or n not in REFERENCE_EXPLAINERS]
    rows = max(len(order), 1)
    fig = Figure(figsize=(1.3 * (len(cols) + 1), 1.4 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, len(cols) + 1, squeeze=False)
    for r, idx in enumerate(order):
        ref = by_index[models[0]][idx]
        img = _denormalise(ref["image"], mean, std).numpy()
        lm, vis = ref["landmarks"], ref["visible"]
        for c in range(len(cols) + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            s = img.shape[0]
            ax.set_xlim(0, s)
            ax.set_ylim(s, 0)
            if c == 0:
                ax.imshow(img, extent=(0, s, s, 0))
                ax.set_ylabel(f"{classes[ref['label']]}\n#{idx}", fontsize=6)
            else:
                model, name = cols[c - 1]
                ex = by_index[model].get(idx)
                heat = ex["maps"].get(name) if ex else None
                ax.imshow(img.mean(axis=2), cmap="gray", extent=(0, s, s, 0), vmin=0, vmax=1)
                if heat is not None:
                    h = heat.float()
                    h = (h - h.min()) / (h.max() - h.min()).clamp(min=1e-12)
                    ax.imshow(h.numpy(), cmap="jet", alpha=0.55, extent=(0, s, s, 0), vmin=0, vmax=1)
                    peak = ex.get("peaks", {}).get(name)
                    if peak is None:  # examples made elsewhere: the first maximal pixel
                        flat = int(torch.argmax(heat.reshape(-1)))
                        peak = torch.tensor([flat % s + 0.5, flat // s + 0.5])
                    ax.plot(float(peak[0]), float(peak[1]), marker="x", color="white", ms=5, mew=1.5)
            for k in range(len(landmark_names)):
                if bool(vis[k]):
                    ax.plot(float(lm[k, 0]), float(lm[k, 1]), marker="o", ms=3.5, mfc="none", mew=1.2,
                            color=_LANDMARK_COLOURS[k % len(_LANDMARK_COLOURS)])
            if r == 0:
                ax.set_title("image" if c == 0 else f"{cols[c - 1][0]}\n{cols[c - 1][1]}", fontsize=6)
    handles = [Line2D([], [], marker="o", ls="", mfc="none", color=_LANDMARK_COLOURS[k % len(_LANDMARK_COLOURS)],
                      label=name) for k, name in enumerate(landmark_names)]
    handles.append(Line2D([], [], marker="x", ls="", color="black", label="map peak"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=6, frameon=False)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.93, bottom=0.6 / (1.4 * rows + 0.6), wspace=0.05, hspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # JPEG: heat maps over images are photo-like, 5x smaller than as PNG, and report.html embeds the figure.
    fig.savefig(tmp, format="jpeg", pil_kwargs={"quality": 85})
    os.replace(tmp, path)
    return path


def compare_html_section(compare_dir: str | Path) -> str:
    """Return a self-contained HTML fragment of ``compare_dir``'s comparison: the table and the figure inline.

    The figure is embedded as a base64 ``data:`` URI, so the fragment can be pasted into any page
    (``report.html``) without copying files. Raises ``FileNotFoundError`` with the command to run when
    ``compare.json`` is missing.
    """
    folder = Path(compare_dir)
    file = folder / "compare.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; run `icnn compare RUN --out {folder}` first")
    result = json.loads(file.read_text())
    header, rows, notes = _rows(result)
    figure = folder / result["figure"]
    return render("compare.html.j2", header=header, rows=rows, notes=notes,
                  figure=data_uri(figure) if figure.is_file() else None).rstrip("\n")
