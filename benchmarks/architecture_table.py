"""The README's architecture table from what tests/test_architectures.py measured.

    ICNN_ARCH_REPORT=/tmp/arch.jsonl python -m pytest tests/test_architectures.py -q
    python benchmarks/architecture_table.py /tmp/arch.jsonl

Each line of the report is one model: the stages it passed (with seconds) and, for a model listed in the
test's EXPECTED, the stage it stopped at and the error the code raised.
"""

from __future__ import annotations

import json
import sys

STAGES = ("surgery", "finetune", "analyze", "prune", "export")


def table(rows: list[dict]) -> str:
    head = "| model | px | top block (masked there) | surgery | fine-tune | analyze | prune 0.5 MACs | export parity | s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        done = r.get("stages", {})
        layout = done.get("layout") or r.get("layout") or {}
        top = layout.get("top_layer", "?")
        if layout.get("rectify"):
            top += " (rectified)"
        cells = []
        for stage in STAGES:
            if stage in done:
                cells.append("yes")
            elif r.get("failed") == stage:
                cells.append(f"**no**: {r.get('why', r.get('error', ''))}")
            else:
                cells.append("-")
        lines.append(f"| {r['arch']} | {r['size']} | `{top}` | " + " | ".join(cells) + f" | {r.get('seconds', '')} |")
    return "\n".join(lines)


def main(path: str) -> None:
    rows: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[r["arch"]] = r  # the last run of each model
    print(table(list(rows.values())))
    total = sum(float(r.get("seconds") or 0) for r in rows.values())
    print(f"\n{len(rows)} models, {total:.0f} s in the stages")


if __name__ == "__main__":
    main(sys.argv[1])
