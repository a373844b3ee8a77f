"""The same runs measured under every protocol: how much of an instability ratio is the measuring point.

    python benchmarks/protocol_compare.py runs/q/arms [--protocols official paper masked-output]

For every ``<arm>-s<seed>/`` run of an ``arm_seeds.py`` folder, evaluates the run's test split under each
protocol of :mod:`icnn_compress.method.protocol` (``eval-<protocol>.json`` in the run, reused when present) and
prints, per protocol and masked layer, each arm's mean instability ratio to the baseline of its own seed.
Writes ``<folder>/protocol_compare.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.method.protocol import PROTOCOLS


def evaluated(run: Path, protocol: str, trust_code: bool) -> dict:
    """The run's test-split evaluation under ``protocol`` (computed once, then read back)."""
    path = run / f"eval-{protocol}.json"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "icnn_compress.cli", "-q", "evaluate", str(run), "--protocol",
                        protocol, "--json", str(path), *(["--trust-code"] if trust_code else [])],
                       check=True, capture_output=True)
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--trust-code", action="store_true",
                        help="import the builder the runs' model files name, as icnn --trust-code")
    args = parser.parse_args()
    runs = {}
    for run in sorted(args.folder.iterdir()):
        match = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if match and (run / "model.pt").is_file():
            runs[match.group(1), int(match.group(2))] = run
    order = ["baseline", "masks-only", "icnn"]
    arms = sorted({a for a, _ in runs}, key=lambda a: order.index(a) if a in order else len(order))
    seeds = sorted({s for a, s in runs if ("baseline", s) in runs})
    lines = ["| protocol | layer (measured at) | " + " | ".join(f"{a} ratio" for a in arms) + " | accuracy % (ICNN) |",
             "|---|---|" + "---|" * (len(arms) + 1)]
    for protocol in args.protocols:
        res = {key: evaluated(run, protocol, args.trust_code) for key, run in runs.items()}
        base = res["baseline", seeds[0]]
        for layer, entry in base["layers"].items():
            ratios = []
            for arm in arms:
                r = [res[arm, s]["layers"][layer]["location_instability"]
                     / res["baseline", s]["layers"][layer]["location_instability"] for s in seeds if (arm, s) in res]
                ratios.append(f"{statistics.fmean(r):.2f} ({len(r)} seeds)")
            acc = [100 * res["icnn", s]["accuracy"] for s in seeds if ("icnn", s) in res]
            accuracy = f"{statistics.fmean(acc):.2f}" if acc else "–"
            lines.append(f"| {protocol} | {layer} ({entry.get('measured_at', '?')}) | " + " | ".join(ratios)
                         + f" | {accuracy} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.folder / "protocol_compare.md", table)
    print(table)


if __name__ == "__main__":
    main()
