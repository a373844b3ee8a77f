"""Generated "creatures" dataset with exact part landmarks and masks, written in the CUB-200-2011 layout.

Each category is a creature made of 3-4 parts (``head``, ``body``, ``tail``, ``leg``) whose *shapes and
arrangement* tell the category; colours are random per part and per image, so colour alone tells nothing
(a colour-coded dataset was too easy to measure anything on, see METHOD.md section 8, "Headroom"). Each image
holds one creature at a random position, scale and pose over a textured background, plus 0-2 distractors:
lone limbs (heads, tails, legs) of random categories, so that a limb alone does not tell the category.

Landmarks are the part centres (a designated point inside each part), the box is the creature's extent, and
each part mask holds the part's visible pixels (a pixel counts when the part covers at least half of it).
A landmark whose pixel is not in its part's visible mask (occluded) is written as not visible.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from icnn_compress.data._layout import LayoutRecord, class_folder, finish_output_folder, new_output_folder, write_layout
from icnn_compress.errors import DatasetError

LANDMARK_NAMES: tuple[str, ...] = ("head", "body", "tail", "leg")
_SUPERSAMPLE = 4
_MASK_COVERAGE = 0.5

Polygon = np.ndarray  # (M, 2) float64, (x, y)


# ---------------------------------------------------------------------------------------------------------
# Shapes, in the creature's own frame: it faces +x, y points down, the whole creature is about 1 unit long.


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> Polygon:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _regular(cx: float, cy: float, r: float, sides: int, phase: float = 0.0) -> Polygon:
    t = phase + np.arange(sides) * 2.0 * math.pi / sides
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int = 5) -> Polygon:
    t = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _rect(cx: float, cy: float, w: float, h: float, angle_deg: float = 0.0) -> Polygon:
    pts = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return _rotate(pts, math.radians(angle_deg)) + (cx, cy)


def _band(xs: np.ndarray, ys: np.ndarray, thickness: float) -> Polygon:
    """A band of constant vertical thickness along the polyline (xs, ys)."""
    upper = np.stack([xs, ys - thickness / 2], axis=1)
    lower = np.stack([xs, ys + thickness / 2], axis=1)[::-1]
    return np.concatenate([upper, lower])


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


@dataclass(frozen=True)
class _Part:
    polygon: Polygon
    centre: tuple[float, float]  # a point inside the polygon: the landmark


def _glider() -> dict[str, _Part]:
    return {
        "body": _Part(_ellipse(0, 0, 0.30, 0.14), (0.0, 0.0)),
        "head": _Part(np.array([[0.24, -0.13], [0.24, 0.13], [0.50, 0.0]]), (0.33, 0.0)),
        "tail": _Part(np.array([[-0.24, 0.0], [-0.50, -0.21], [-0.41, 0.0], [-0.50, 0.21]]), (-0.36, 0.0)),
    }


def _walker() -> dict[str, _Part]:
    return {
        "body": _Part(_rect(0, 0, 0.50, 0.24), (0.0, 0.0)),
        "head": _Part(_ellipse(0.34, -0.22, 0.11, 0.11), (0.34, -0.22)),
        "tail": _Part(_rect(-0.34, -0.20, 0.32, 0.07, 40.0), (-0.34, -0.20)),
        "leg": _Part(_rect(0.05, 0.25, 0.09, 0.30), (0.05, 0.28)),
    }


def _roller() -> dict[str, _Part]:
    return {
        "body": _Part(_ellipse(0, 0, 0.24, 0.24), (0.0, 0.0)),
        "head": _Part(_rect(0.0, -0.33, 0.19, 0.19), (0.0, -0.34)),
        "leg": _Part(np.array([[-0.15, 0.17], [0.15, 0.17], [0.0, 0.48]]), (0.0, 0.31)),
    }


def _spiker() -> dict[str, _Part]:
    xs = np.linspace(-0.18, -0.58, 7)
    ys = np.where(np.arange(7) % 2 == 0, -0.05, 0.05)
    return {
        "body": _Part(_regular(0, 0, 0.22, 6), (0.0, 0.0)),
        "head": _Part(_star(0.36, 0.0, 0.15, 0.07), (0.36, 0.0)),
        "tail": _Part(_band(xs, ys, 0.08), (float(xs[3]), float(ys[3]))),
        "leg": _Part(
            np.array([[-0.04, 0.16], [0.04, 0.16], [0.04, 0.36], [0.15, 0.36], [0.15, 0.43], [-0.04, 0.43]]),
            (0.0, 0.32),
        ),
    }


def _crawler() -> dict[str, _Part]:
    dome = _ellipse(0, 0, 0.30, 0.20, 28)
    dome = dome[dome[:, 1] <= 1e-9]  # the upper half, closed by its flat bottom
    comb = [[-0.28, 0.0], [0.28, 0.0]]
    for i in reversed(range(4)):  # four teeth hanging from a bar, right to left
        left = -0.28 + i * 0.49 / 3
        comb += [[left + 0.07, 0.07], [left + 0.07, 0.17], [left, 0.17], [left, 0.07]]
    return {
        "body": _Part(dome, (0.0, -0.08)),
        "head": _Part(_regular(0.40, -0.04, 0.12, 4), (0.40, -0.04)),
        "leg": _Part(np.array(comb), (0.0, 0.035)),
    }


def _slither() -> dict[str, _Part]:
    xs = np.linspace(-0.36, 0.30, 15)
    ys = 0.08 * np.sin((xs + 0.36) / 0.66 * 2.0 * math.pi)
    return {
        "body": _Part(_band(xs, ys, 0.11), (float(xs[7]), float(ys[7]))),
        "head": _Part(_ellipse(0.38, 0.0, 0.10, 0.07), (0.38, 0.0)),
        "tail": _Part(np.array([[-0.34, -0.045], [-0.34, 0.045], [-0.62, 0.0]]), (-0.43, 0.0)),
    }


_CATEGORIES: dict[str, Callable[[], dict[str, _Part]]] = {
    "glider": _glider,
    "walker": _walker,
    "roller": _roller,
    "spiker": _spiker,
    "crawler": _crawler,
    "slither": _slither,
}
CATEGORY_NAMES: tuple[str, ...] = tuple(_CATEGORIES)
# Parts are drawn body first, so the limbs attached to it stay whole.
_DRAW_ORDER = ("body", "tail", "leg", "head")


# ---------------------------------------------------------------------------------------------------------
# Rendering


def textured_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Return a random textured RGB square (stripes, blobs or smooth noise around a random base colour)."""
    base = rng.integers(30, 226, size=3)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        img = Image.new("RGB", (size, size), tuple(int(v) for v in base))
        draw = ImageDraw.Draw(img)
        other = np.clip(base + rng.integers(-70, 71, size=3), 0, 255)
        period = rng.uniform(0.06, 0.2) * size
        angle = rng.uniform(0, math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        centre = np.array([size / 2, size / 2])
        for k in range(-int(size / period) - 2, int(size / period) + 3):
            a = centre + normal * k * period
            b = a + normal * period / 2
            far = 2 * size * direction
            corners = [a - far, a + far, b + far, b - far]
            draw.polygon([tuple(p) for p in corners], fill=tuple(int(v) for v in other))
        return img
    if kind == 1:  # blobs
        img = Image.new("RGB", (size, size), tuple(int(v) for v in base))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(8, 20))):
            cx, cy = rng.uniform(0, size, size=2)
            rx, ry = rng.uniform(0.03, 0.15, size=2) * size
            colour = np.clip(base + rng.integers(-80, 81, size=3), 0, 255)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in colour))
        return img
    cells = int(rng.integers(3, 9))  # smooth colour noise
    noise = np.clip(base + rng.integers(-70, 71, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)


def _random_colour(
    rng: np.random.Generator, avoid: np.ndarray | None = None, distance: float = 0.0
) -> tuple[int, int, int]:
    """Return a random RGB colour, at least ``distance`` away from ``avoid`` if a few tries allow it."""
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if avoid is None or np.linalg.norm(colour - avoid) >= distance:
            break
    return tuple(int(v) for v in colour)


def _pose(pts: np.ndarray, *, angle: float, flip: bool, scale: float, shift: np.ndarray) -> np.ndarray:
    """Flip (about the vertical axis), rotate, scale, then shift the points (M, 2)."""
    if flip:
        pts = pts * (-1.0, 1.0)
    return _rotate(pts, angle) * scale + shift


def _extent(polys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    allpts = np.concatenate(polys)
    return allpts.min(axis=0), allpts.max(axis=0)


def _jittered(parts: dict[str, _Part], rng: np.random.Generator) -> dict[str, _Part]:
    """Scale each part by ±15% about its centre and the whole creature by ±10% per axis."""
    aspect = rng.uniform(0.9, 1.1, size=2)
    out = {}
    for name, part in parts.items():
        c = np.array(part.centre)
        k = rng.uniform(0.85, 1.15)
        out[name] = _Part((c + (part.polygon - c) * k) * aspect, tuple(c * aspect))
    return out


def _box_overlap(lo1: np.ndarray, hi1: np.ndarray, lo2: np.ndarray, hi2: np.ndarray) -> float:
    inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None)
    return float(inter[0] * inter[1])


def _render(rng: np.random.Generator, category: int, size: int) -> tuple[Image.Image, np.ndarray, LayoutRecord]:
    """Draw one image; return it, its part masks (P, S, S) bool, and its record (image/class left blank)."""
    ss = _SUPERSAMPLE
    big = size * ss
    names = list(_CATEGORIES)
    parts = _jittered(_CATEGORIES[names[category]](), rng)

    # Creature pose: fit its rotated extent to a random fraction of the canvas, at a random place.
    angle, flip = rng.uniform(-math.radians(40), math.radians(40)), bool(rng.integers(2))
    posed = {n: _pose(p.polygon, angle=angle, flip=flip, scale=1.0, shift=np.zeros(2)) for n, p in parts.items()}
    lo, hi = _extent(list(posed.values()))
    scale = rng.uniform(0.55, 0.85) * big / float(np.max(hi - lo))
    margin = 0.02 * big
    lo, hi = lo * scale, hi * scale
    shift = np.array([rng.uniform(margin - lo[d], big - margin - hi[d]) for d in range(2)])
    polys = {n: p * scale + shift for n, p in posed.items()}
    centres = {
        n: _pose(np.array([p.centre]), angle=angle, flip=flip, scale=scale, shift=shift)[0]
        for n, p in parts.items()
    }
    c_lo, c_hi = lo + shift, hi + shift

    img = textured_background(rng, big)
    draw = ImageDraw.Draw(img)

    # Distractors: lone parts of random categories, under the creature and mostly beside it.
    for _ in range(int(rng.integers(0, 3))):
        # Limbs only: a lone body would be a whole category's main cue, and too strong a confounder.
        cat = _CATEGORIES[names[int(rng.integers(len(names)))]]()
        limbs = [p for n, p in cat.items() if n != "body"]
        part = limbs[int(rng.integers(len(limbs)))]
        pts = part.polygon - np.array(part.centre)
        pts = _pose(
            pts, angle=rng.uniform(0, 2 * math.pi), flip=bool(rng.integers(2)),
            scale=scale * rng.uniform(0.7, 1.1), shift=np.zeros(2),
        )
        d_lo, d_hi = pts.min(axis=0), pts.max(axis=0)
        area = float(np.prod(d_hi - d_lo)) + 1e-9
        best, best_overlap = None, 0.35  # accept at most this fraction of the distractor's box on the creature
        for _ in range(12):
            room_lo, room_hi = -d_lo, big - d_hi
            if np.any(room_hi <= room_lo):
                break
            offset = rng.uniform(room_lo, room_hi)
            overlap = _box_overlap(d_lo + offset, d_hi + offset, c_lo, c_hi) / area
            if overlap < best_overlap:
                best, best_overlap = offset, overlap
                if overlap < 0.1:
                    break
        if best is not None:
            draw.polygon([tuple(p) for p in pts + best - 0.5], fill=_random_colour(rng))

    # The creature, and a label map of which part owns each supersampled pixel (later parts occlude).
    # Colours are random, but not the background's own colour: a creature nobody can see is label noise.
    x0, y0 = (int(v) for v in np.clip(c_lo, 0, big - 1))
    x1, y1 = (int(v) + 1 for v in np.clip(c_hi, 0, big - 1))
    backdrop = np.asarray(img, dtype=np.float64)[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    labels = Image.new("L", (big, big), 0)
    label_draw = ImageDraw.Draw(labels)
    for name in _DRAW_ORDER:
        if name in polys:
            # PIL puts integer coordinates at pixel centres; our frame has pixel i spanning [i, i + 1).
            outline = [tuple(p) for p in polys[name] - 0.5]
            draw.polygon(outline, fill=_random_colour(rng, backdrop, 60.0))
            label_draw.polygon(outline, fill=LANDMARK_NAMES.index(name) + 1)

    small = np.asarray(img.reduce(ss), dtype=np.float64)
    small = small + rng.normal(0.0, rng.uniform(2.0, 10.0), size=small.shape)  # sensor-like noise
    image = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))

    lab = np.asarray(labels).reshape(size, ss, size, ss)
    masks = np.stack([(lab == k + 1).mean(axis=(1, 3)) >= _MASK_COVERAGE for k in range(len(LANDMARK_NAMES))])

    points: list[tuple[float, float, bool]] = []
    for k, name in enumerate(LANDMARK_NAMES):
        if name not in centres:
            points.append((0.0, 0.0, False))
            continue
        x, y = centres[name] / ss
        col, row = int(math.floor(x)), int(math.floor(y))
        visible = 0 <= col < size and 0 <= row < size and bool(masks[k, row, col])
        points.append((float(x), float(y), visible))
    box_lo = np.clip(c_lo / ss, 0, size)
    box_hi = np.clip(c_hi / ss, 0, size)
    box = (float(box_lo[0]), float(box_lo[1]), float(box_hi[0] - box_lo[0]), float(box_hi[1] - box_lo[1]))
    record = LayoutRecord(image="", class_id=category + 1, is_train=True, box=box, parts=points)
    return image, masks, record


def generate_parts_dataset(
    out: str | Path,
    *,
    seed: int = 0,
    num_classes: int = 4,
    train_per_class: int = 600,
    test_per_class: int = 150,
    image_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write the generated creatures dataset in the CUB-200-2011 layout (with part masks) and return its folder.

    The files are byte-identical for the same arguments. Image ``j`` of a class and split depends only on
    (seed, split, class, j), so changing a count keeps the other images.

    Args:
        out: the folder to create (it must not exist, or be empty).
        seed: the random seed.
        num_classes: how many categories, 2 to 6 (the first ones of ``CATEGORY_NAMES``).
        train_per_class, test_per_class: images per category in each split.
        image_size: side of the square images in pixels.
        progress: show a tqdm progress bar (only on a terminal).
    """
    if not 2 <= num_classes <= len(_CATEGORIES):
        raise DatasetError(f"num_classes must be between 2 and {len(_CATEGORIES)}, got {num_classes}")
    if image_size < 16:
        raise DatasetError(f"image_size must be at least 16 pixels, got {image_size}")
    if train_per_class < 0 or test_per_class < 0:
        raise DatasetError("train_per_class and test_per_class must not be negative")
    out = Path(out).expanduser()
    tmp = new_output_folder(out)
    try:
        class_names = list(CATEGORY_NAMES[:num_classes])
        folders = [class_folder(c + 1, n) for c, n in enumerate(class_names)]
        for folder in folders:
            (tmp / "images" / folder).mkdir(parents=True)
            (tmp / "masks" / folder).mkdir(parents=True)
        # Classes interleaved, so that the first N images of a split are balanced.
        jobs = [
            (split, j, c)
            for split, count in (("train", train_per_class), ("test", test_per_class))
            for j in range(count)
            for c in range(num_classes)
        ]
        records = []
        for split, j, c in tqdm(jobs, desc="parts dataset", disable=None if progress else True):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, c, j])
            image, masks, record = _render(rng, c, image_size)
            stem = f"{folders[c]}/{split}_{j:05d}"
            image.save(tmp / "images" / f"{stem}.png")
            for k, name in enumerate(LANDMARK_NAMES):
                if masks[k].any():
                    rel = f"masks/{stem}_{name}.png"
                    Image.fromarray(masks[k]).save(tmp / rel)
                    record.masks[k] = rel
            record.image = f"{stem}.png"
            record.is_train = split == "train"
            records.append(record)
        write_layout(tmp, class_names=class_names, landmark_names=LANDMARK_NAMES, records=records)
        meta = {
            "generator": "icnn_compress.data.generate_parts_dataset",
            "seed": seed,
            "num_classes": num_classes,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "image_size": image_size,
            "landmarks": list(LANDMARK_NAMES),
        }
        (tmp / "generated.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        finish_output_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
