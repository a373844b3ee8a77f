"""ONNX export with the mask layers in the graph, a parity check in ONNX Runtime, and int8 quantisation.

The model (masks included: their argmax / centroid and rounding are ordinary ONNX ops) goes through
torch's current exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch axis into one
self-contained file, which ``onnx.checker`` checks in full. ONNX Runtime then runs it on real images of
the run's dataset at batch 1 and 8 against PyTorch; a difference above the tolerance is an error. The
int8 model must agree with PyTorch on the top-1 class of a stated fraction of the images.

Every file is written to a temp file next to it and renamed into place, so a kill leaves the old file or
the new one, never half. ``parity.json`` records the sha256 of each file it checked: :func:`verify_export`
(``icnn verify``) tells whether a file on disk is still the one that passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from icnn_compress.config import recipe_from_dict
from icnn_compress.data.recipe import open_split, relocate, task_object
from icnn_compress.errors import ExportError, ParityError, VerifyError
from icnn_compress.runs.folder import check_output
from icnn_compress.runs.open import load_run_model
from icnn_compress.runs.results import ExportRecord
from icnn_compress.runtime.files import atomic_path, atomic_write_text, sha256_file

__all__ = ["INT8_MIN_AGREEMENT", "ExportError", "ParityError", "VerifyError", "export_onnx", "onnx_accuracy",
           "ort_session", "providers", "verify_export"]

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_BATCHES = (1, 8)
# int8 moves logits by up to ~1 on the quickstart models, which flips the top-1 class of the few images
# whose two best classes are that close: 599 of 600 test images agree for the quickstart ICNN, 592 of 600
# for it pruned to 0.5 MACs without recovery. A model whose int8 weights went wrong agrees on ~1/classes.
INT8_MIN_AGREEMENT = 0.98


def providers() -> list[str]:
    """ONNX Runtime execution providers: CUDA first when a GPU is present and onnxruntime has it, then CPU."""
    import onnxruntime as ort

    chosen = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        chosen.insert(0, "CUDAExecutionProvider")
    return chosen


def ort_session(path: str | Path, *, provider: Sequence[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path``; fp32 kernels stay fp32 on CUDA (no TF32)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    chosen = list(provider or providers())
    with_options: list[Any] = [(p, {"use_tf32": 0}) if p == "CUDAExecutionProvider" else p for p in chosen]
    return ort.InferenceSession(str(path), options, providers=with_options)


def _load(run_or_model: str | Path | nn.Module, data_root: str | Path | None, trust_code: bool):
    """(model on CPU in eval mode, saved record or None, test split or None, train split or None)."""
    if isinstance(run_or_model, nn.Module):
        return run_or_model.cpu().eval(), None, None, None

    model, saved = load_run_model(run_or_model, device="cpu", trust_code=trust_code)
    recipe = recipe_from_dict(saved["recipe"], source=f"{run_or_model}/model.pt")
    data = relocate(recipe.data, data_root)
    obj = task_object(recipe.icnn)
    test = open_split(data, "test", progress=False, single_object=obj)
    return model, saved, test, (lambda: open_split(data, "train", progress=False, single_object=obj))


def _images(dataset, count: int, *, start: int = 0) -> Tensor:
    """``count`` images (N, 3, S, S) from ``dataset``, from index ``start`` on (cycling when it is short)."""
    n = len(dataset)
    return torch.stack([dataset[(start + i) % n]["image"] for i in range(count)]).float()


def _batches(dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for begin in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
        yield (torch.stack([it["image"] for it in items]).float().numpy(),
               np.asarray([int(it["label"]) for it in items]))


def onnx_accuracy(session, dataset, *, batch_size: int = 64) -> float:
    """Top-1 accuracy of an ONNX Runtime session over ``dataset``, a fraction in [0, 1]."""
    correct = total = 0
    name = session.get_inputs()[0].name
    for images, labels in _batches(dataset, batch_size):
        logits = session.run(None, {name: images})[0]
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def _export(model: nn.Module, example: Tensor, path: Path) -> None:
    """Write ``model`` (traced on ``example``) to ``path`` once onnx.checker passes it; else keep the old file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter prints its progress; keep it for the debug log
    with atomic_path(path, suffix=".onnx") as tmp:  # the exporter writes to a file name: a temp one
        try:
            with contextlib.redirect_stdout(chatter):
                program = torch.onnx.export(
                    model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},), optimize=True, verbose=False,
                )
                program.save(str(tmp), external_data=False)
        except Exception as exc:  # the exporter raises many types; the user needs the cause and the model
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
        finally:
            log.debug("torch.onnx.export: %s", chatter.getvalue())
        _check(tmp, path)


def _check(file: Path, shown: Path) -> None:
    """Raise ExportError naming ``shown`` unless ``file`` passes onnx.checker's full check."""
    import onnx

    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{shown} fails onnx.checker's full check: {exc}") from exc


def _parity(model: nn.Module, session, images: Tensor, batches: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    name = session.get_inputs()[0].name
    for b in batches:
        x = images[:b]
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ParityError(f"ONNX Runtime returns shape {got.shape} at batch {b}, PyTorch {ref.shape}")
        out[str(b)] = {
            "max_abs_diff": float(np.abs(got - ref).max()),
            "max_abs_output": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        }
    return out


def _agreement(model: nn.Module, session, batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement of ``session`` with ``model`` and their max abs logit difference over ``batches``."""
    name = session.get_inputs()[0].name
    agree = total = 0
    worst = 0.0
    for x in batches:  # (B, 3, S, S)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {name: x})[0]
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        total += len(x)
        worst = max(worst, float(np.abs(got - ref).max()))
    return {"top1_agreement": agree / max(total, 1), "max_abs_diff": worst, "agreement_images": total}


def _calibration_reader(input_name: str, images: Tensor, batch_size: int = 16):
    """An onnxruntime ``CalibrationDataReader`` over ``images`` (N, 3, S, S) in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]
            self.pos = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos >= len(self.chunks):
                return None
            self.pos += 1
            return {input_name: self.chunks[self.pos - 1]}

        def rewind(self) -> None:
            self.pos = 0

    return Reader()


def _quantize_int8(fp32: Path, int8: Path, images: Tensor) -> None:
    """Static QDQ int8, per-channel weights, MinMax calibration on ``images``.

    Only Conv, Gemm and MatMul are quantised: the masks' peak search (argmax or centroid and rounding,
    gathers on the coordinate grid) stays in float, where int8 rounding would move the peaks.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _calibration_reader(INPUT_NAME, images)
    with atomic_path(int8, suffix=".onnx") as tmp:  # onnxruntime writes to file names: temp ones
        prepared = tmp.with_name(tmp.stem + ".prep.onnx")
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul"], per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except Exception as exc:
            raise ExportError(f"int8 quantisation of {fp32} failed: {exc}") from exc
        finally:
            prepared.unlink(missing_ok=True)


def export_onnx(
    run_or_model: str | Path | nn.Module,
    out: str | Path,
    *,
    quantize: str | None = None,
    calibration: int = 256,
    data_root: str | Path | None = None,
    inputs: Tensor | None = None,
    tolerance: float = 1e-4,
    int8_agreement: float = INT8_MIN_AGREEMENT,
    parity_json: str | Path | None = None,
    trust_code: bool = False,
) -> ExportRecord:
    """Export a run's model (or a model) to ONNX at ``out``, check it, prove parity; return the ``parity.json`` record.

    The record holds the sha256 of each file it checked (``sha256``, ``int8.sha256``); ``passed`` is the fp32
    check, ``int8.passed`` the int8 gate.

    Args:
        run_or_model: a run directory / ``model.pt`` (pruned or not), or an ``nn.Module`` with ``inputs``.
        out: the ``.onnx`` file (one file, weights inside). int8 goes next to it as ``<stem>.int8.onnx``.
        quantize: ``None`` or ``"int8"`` (static QDQ, per-channel weights, calibrated on real images).
        calibration: number of training images for the int8 calibration (at least 1 with ``quantize``).
        data_root: the dataset folder when it moved since training (default: the run's ``data.root``).
        inputs: the images for the parity check (and calibration) when ``run_or_model`` is a module;
            for a run, the first 8 test images are used.
        tolerance: largest allowed max-abs difference of fp32 logits, at batch 1 and batch 8.
        int8_agreement: smallest allowed fraction of images on which the int8 model's top-1 class is
            PyTorch's, over the test split of a run (the ``inputs`` for a module).
        parity_json: where the record goes (default ``parity.json`` next to ``out``).
        trust_code: for a run, see :func:`~icnn_compress.runs.open.load_run_model`.

    Raises:
        ParityError: ONNX Runtime differs from PyTorch by more than ``tolerance``, or the int8 model agrees
            with it on fewer than ``int8_agreement`` of the images (after writing parity.json).
        ExportError: bad arguments, or the export, the checker or the quantisation failed.
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and calibration < 1:
        raise ExportError(f"--calibration must be at least 1 image for int8 quantisation, got {calibration}")
    if quantize and not 0.0 <= int8_agreement <= 1.0:
        raise ExportError(f"--int8-agreement must be a fraction in [0, 1], got {int8_agreement}")
    out = check_output(out)
    if parity_json is not None:
        check_output(parity_json)
    began = time.perf_counter()
    model, saved, test, train = _load(run_or_model, data_root, trust_code)
    if test is not None:
        images = _images(test, max(PARITY_BATCHES))
        source = "test split, images 0-7"
    elif inputs is not None:
        images = inputs.float().cpu()
        if len(images) < max(PARITY_BATCHES):
            images = images.repeat((max(PARITY_BATCHES) + len(images) - 1) // len(images), 1, 1, 1)
        source = "given inputs"
    else:
        raise ExportError("export_onnx(model) needs inputs=(N, 3, S, S) images for the parity check")
    _export(model, images[:2], out)
    chosen = providers()
    session = ort_session(out, provider=chosen)
    parity = _parity(model, session, images, PARITY_BATCHES)
    worst = max(parity.values(), key=lambda r: r["max_abs_diff"])
    passed = worst["max_abs_diff"] <= tolerance
    record: dict[str, Any] = {
        "onnx": str(out),
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        "providers": session.get_providers(),
        "inputs": source,
        "tolerance": tolerance,
        "parity": parity,
        "passed": passed,
        "pruned_macs_ratio": ((saved or {}).get("pruning") or {}).get("macs_ratio"),
        "torch": torch.__version__,
    }
    json_path = Path(parity_json) if parity_json else out.with_name("parity.json")
    if passed and quantize == "int8":
        calib = _images(train(), calibration) if train is not None else inputs.float().cpu()
        int8 = out.with_name(out.stem + ".int8.onnx")
        _quantize_int8(out, int8, calib)
        q_session = ort_session(int8, provider=chosen)
        if test is not None:
            agreement = _agreement(model, q_session, (x for x, _ in _batches(test, 64)))
            agreement_inputs = "test split"
        else:
            agreement = _agreement(model, q_session, [images.numpy()])
            agreement_inputs = source
        quant: dict[str, Any] = {"onnx": str(int8), "sha256": sha256_file(int8), "bytes": int8.stat().st_size,
                                 "calibration_images": len(calib),
                                 "format": "QDQ, per-channel int8 weights, int8 activations (MinMax)",
                                 "parity": _parity(model, q_session, images, PARITY_BATCHES),
                                 **agreement, "agreement_inputs": agreement_inputs,
                                 "min_top1_agreement": int8_agreement,
                                 "passed": agreement["top1_agreement"] >= int8_agreement}
        if test is not None:
            acc32 = onnx_accuracy(session, test)
            acc8 = onnx_accuracy(q_session, test)
            quant.update(accuracy_fp32=acc32, accuracy_int8=acc8, accuracy_change=acc8 - acc32,
                         accuracy_split="test")
        record["int8"] = quant
    record["seconds"] = time.perf_counter() - began
    log.info("exported %s: max |ONNX Runtime - PyTorch| = %.3g (batch 1, 8)", out, worst["max_abs_diff"])
    atomic_write_text(json_path, json.dumps(record, indent=1))
    if not passed:
        b = max(parity, key=lambda k: parity[k]["max_abs_diff"])
        raise ParityError(
            f"ONNX Runtime ({record['providers'][0]}) differs from PyTorch by {worst['max_abs_diff']:.3g} "
            f"(max abs logit difference at batch {b}; tolerance {tolerance:g}); see {json_path}"
        )
    quant = record.get("int8")
    if quant is not None and not quant["passed"]:
        raise ParityError(
            f"the int8 model {quant['onnx']} gives PyTorch's top-1 class on {quant['top1_agreement']:.1%} of "
            f"{quant['agreement_images']} images ({quant['agreement_inputs']}), under the {int8_agreement:.1%} "
            f"required (max abs logit difference {quant['max_abs_diff']:.3g}); see {json_path}; calibrate on more "
            "images (--calibration), or ship the fp32 model"
        )
    return record


def verify_export(onnx_file: str | Path, *, parity_json: str | Path | None = None) -> dict[str, Any]:
    """Return the parity.json entry of ``onnx_file`` once the file's sha256 is the recorded one and it passed.

    The entry is the record itself for the fp32 model, its ``"int8"`` part for ``<stem>.int8.onnx``. A file
    cut short by a kill, edited or replaced since its check, or recorded as failed is not verified.

    Args:
        onnx_file: the ``.onnx`` file to check.
        parity_json: its record (default ``parity.json`` next to ``onnx_file``).

    Raises:
        VerifyError: the file or the record is missing or unreadable, the record names no such file, holds
            no sha256 for it, another sha256, or a failed check.
    """
    path = Path(onnx_file)
    json_path = Path(parity_json) if parity_json else path.with_name("parity.json")
    again = "export the run again (icnn export RUN --out MODEL.onnx)"
    if not path.is_file():
        raise VerifyError(f"{path} does not exist; {again}")
    if not json_path.is_file():
        raise VerifyError(f"{path} has no parity record {json_path}; {again}")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerifyError(f"cannot read the parity record {json_path} ({exc}); {again}") from exc
    if not isinstance(record, dict):
        raise VerifyError(f"{json_path} is not a parity record (a JSON object); {again}")
    entries = [e for e in (record, record.get("int8")) if isinstance(e, dict)]
    entry = next((e for e in entries if Path(str(e.get("onnx", ""))).name == path.name), None)
    if entry is None:
        recorded = ", ".join(Path(str(e.get("onnx", "?"))).name for e in entries) or "nothing"
        raise VerifyError(f"{json_path} records no check of {path.name} (it records {recorded}); {again}")
    if "sha256" not in entry:
        raise VerifyError(f"{json_path} holds no sha256 of {path.name} (an older icnn-compress wrote it); {again}")
    found = sha256_file(path)
    if found != entry["sha256"]:
        raise VerifyError(f"{path} has sha256 {found[:12]}... but {json_path} records {str(entry['sha256'])[:12]}...: "
                          f"the file changed after its parity check; {again}")
    if entry.get("passed") is not True:
        raise VerifyError(f"{json_path} records a failed parity check of {path.name}; {again}")
    return entry
