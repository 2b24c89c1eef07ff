"""Export's subcommands of ``mien``: ``export`` (a checkpoint, ``detector`` or ``triton``), ``ensemble``,
``eval``, ``calibrate`` and ``results``. ``mien.cli`` only dispatches to :func:`add_commands`.

Heavy imports (torch, onnx) happen inside each command, so that ``mien --help`` is instant and
``mien serve`` works without the ``train`` extra; they also let tests replace a command's function
(e.g. ``mien.export.onnx_export.export_checkpoint``) after this module is imported.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mien.paths import DEFAULT_DATA
from mien.training.cli import comma_list

#: mien.export.calibration.METHODS, spelled out so that ``mien --help`` need not import onnxruntime (a test checks)
CALIBRATION_METHODS = ("top-label", "entropy", "temperature")

LABEL_SOURCES = ("fer2013", "ferplus", "ferplus7")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``ensemble``, ``eval``, ``calibrate``, ``results`` and ``recover`` to ``mien``'s subcommands."""
    for add in (_add_export, _add_ensemble, _add_eval, _add_calibrate, _add_results, _add_recover):
        add(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX with a parity check and a model card",
                       description="Checkpoint -> ONNX (dynamic batch) -> onnx.checker -> parity against PyTorch "
                       "on real faces and random input -> model card. Exits non-zero when parity fails.")  # fmt: skip
    p.add_argument("checkpoint", help="a best.pt written by `mien train` (or an sr.pt of `mien pretrain-sr`: its EDSR "
                   "front end, default --out models/frontends/edsr_x2.onnx), the word `detector` to export a face "
                   "detector (see --kind), or `triton` to write a Triton model repository of the bundled "
                   "models")  # fmt: skip
    p.add_argument("--kind", choices=("mtcnn", "yunet"), default="mtcnn",
                   help="`detector` only: mtcnn (from the installed facenet-pytorch wheel) or yunet (from the "
                   "yuface==2023.5.1 wheel, downloaded with pip unless --wheel names it)")  # fmt: skip
    p.add_argument("--wheel", default=None, help="`detector --kind yunet` only: the yuface wheel, already downloaded")
    p.add_argument(
        "--out",
        default=None,
        help="ONNX path (default models/<model id>.onnx); for `detector` a folder (default models/detector); "
        "for `triton` the repository folder (default triton_repo)",
    )
    p.add_argument("--model-dir", default="models", help="`triton` only: the folder whose *.onnx are exported")
    p.add_argument("--max-batch-size", type=int, default=64, help="`triton` only: max_batch_size of every model")
    p.add_argument("--data", default=DEFAULT_DATA, help="FER2013 for parity faces and accuracy")
    p.add_argument("--split", default="public_test", help="split whose faces drive parity and the card's accuracy")
    p.add_argument("--parity-faces", type=int, default=512, help="real faces in the parity check (>= 256)")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed between PyTorch and ONNX")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument(
        "--flip-tta",
        action="store_true",
        help="average each face's logits with its mirror image's, inside the ONNX graph (2x compute)",
    )
    p.add_argument("--ten-crop", type=int, default=0, metavar="SIZE",
                   help="average the logits of the ten SIZE x SIZE crops (corners, centre, and mirrored) inside "
                   "the ONNX graph (10x compute; for networks trained on random crops, e.g. --crop 40)")  # fmt: skip
    p.add_argument("--shift-tta", type=int, default=0, metavar="PIXELS",
                   help="average the logits of the face moved by PIXELS in the moves of --shift-pattern, inside "
                   "the ONNX graph (9x compute for grid, 5x otherwise; with --flip-tta each view is mirrored "
                   "too)")  # fmt: skip
    p.add_argument("--shift-pattern", default="grid", choices=("grid", "plus", "cross"),
                   help="grid: every move of a 3x3 grid; plus: the centre and the four moves along the axes; cross: "
                   "the centre and the four diagonal moves")  # fmt: skip
    p.add_argument("--model-id", default=None,
                   help="the id the file is served as (default: the checkpoint's network, e.g. mini_xception); "
                   "for a second seed or a distilled copy bundled beside the first")  # fmt: skip
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.checkpoint == "detector" and args.kind == "yunet":
        from mien.export.yunet_export import DEFAULT_OUT, export_yunet

        return 0 if export_yunet(args.out or DEFAULT_OUT, args.wheel, opset=args.opset, atol=args.atol).passed else 1
    if args.checkpoint == "detector":
        from mien.export.detector_export import DEFAULT_OUT, export_detector

        return 0 if export_detector(args.out or DEFAULT_OUT, opset=args.opset, atol=args.atol).passed else 1
    if args.checkpoint == "triton":
        from mien.export.triton import DEFAULT_REPO, export_triton

        result = export_triton(args.out or DEFAULT_REPO, args.model_dir, args.max_batch_size)
        for name, why in result.refused.items():
            print(f"left out {name}: {why}", file=sys.stderr)
        print(f"wrote {len(result.exported)} model(s) to {result.repo}: {', '.join(result.exported) or 'none'}")
        return 0 if result.exported and not result.refused else 1
    from mien.export.sr_export import DEFAULT_OUT as SR_OUT
    from mien.export.sr_export import export_sr_front_end, is_sr_checkpoint

    if is_sr_checkpoint(args.checkpoint):  # a pre-trained SR front end: kept in models/frontends/, not served
        parity = export_sr_front_end(args.checkpoint, args.out or SR_OUT, args.data, opset=args.opset, atol=args.atol)
        return 0 if parity.passed else 1
    from mien.export.onnx_export import ExportConfig, export_checkpoint

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, data=args.data, split=args.split,
                       parity_faces=args.parity_faces, atol=args.atol, opset=args.opset,
                       flip_tta=args.flip_tta, ten_crop=args.ten_crop, shift_tta=args.shift_tta,
                       shift_pattern=args.shift_pattern, model_id=args.model_id)  # fmt: skip
    return 0 if export_checkpoint(cfg).passed else 1


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class P/R/F1 and a confusion matrix on a split",
                       description="Evaluate a checkpoint (.pt) or an ONNX file on a split of FER2013; "
                       "writes <out>/report.json and <out>/confusion.png.")  # fmt: skip
    p.add_argument("model", help="a .pt checkpoint from `mien train` or an .onnx file from `mien export`")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--split", default="public_test")
    p.add_argument("--out", default=None, help="report folder (default reports/<model file stem>-<split>)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--label-source", default="fer2013", choices=LABEL_SOURCES,
                   help="truth labels: FER2013's, or the FER+ majority votes with 8 classes (ferplus) or FER2013's 7 "
                   "(ferplus7); a model is scored on the classes it shares with the label set")  # fmt: skip
    p.add_argument("--ferplus-votes", default="", help="FER+ votes csv (default: ferplus_votes.csv beside --data)")
    p.set_defaults(func=_run_eval)


def _add_recover(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recover", help="rebuild a bundled model's training checkpoint from its ONNX file",
                       description="Rebuild the checkpoint a bundled .onnx was exported from (its best.pt, e.g. to "
                       "teach with --teacher after its run folder was lost): the network of its card's training "
                       "config with the file's weights, batch norms folded back as identity plus bias. Written only "
                       "when the rebuilt network gives the file's uncalibrated logits on real faces and random input "
                       "(the exporter's parity check); exits non-zero otherwise.")  # fmt: skip
    p.add_argument("model", help="a bundled .onnx file with its .card.json beside it")
    p.add_argument("--out", required=True, help="the checkpoint to write, e.g. ~/mien-runs/vgg_fer/best.pt")
    p.add_argument("--data", default=DEFAULT_DATA, help="FER2013, for the parity check's real faces")
    p.add_argument("--split", default="val", help="the split the parity faces come from")
    p.add_argument("--atol", type=float, default=1e-3, help="largest |rebuilt - file| logit difference allowed")
    p.set_defaults(func=_run_recover)


def _run_recover(args: argparse.Namespace) -> int:
    from mien.export.recover import RecoveryError, recover

    try:
        parity = recover(args.model, args.out, args.data, args.split, atol=args.atol)
    except RecoveryError as exc:
        print(f"mien recover: {exc}", file=sys.stderr)
        return 2
    if not parity.passed:
        print(f"mien recover: the rebuilt network does not give {args.model}'s logits "
              f"(max difference {parity.max_abs_diff:.2e}); nothing written", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{args.out}: rebuilt from {args.model}; max |rebuilt - file| {parity.max_abs_diff:.2e}, "
          f"top label the same on all {parity.real_faces} real and {parity.random_inputs} random inputs")  # fmt: skip
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a temperature on the validation split and put it inside the ONNX graph",
                       description="Temperature scaling fitted on --fit-split (the split carved from Training), "
                       "applied inside the graph as a division of the logits: by one temperature fitted by NLL "
                       "(--method temperature), by a temperature per face T·exp(b·h) that follows the face's entropy h "
                       "(--method entropy, by NLL), or by T·exp(b·h + c·h²) fitted by the top label's log loss, what "
                       "ECE measures (--method top-label, the default). The card records it with ECE/NLL/Brier "
                       "before and after on --fit-split and --test-split.")  # fmt: skip
    p.add_argument("model", help="an .onnx file from `mien export`, or an .ensemble.json from `mien ensemble` (the "
                   "temperature then goes into that file, applied after averaging); its card is updated")  # fmt: skip
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--fit-split", default="val", help="the split the temperature is fitted on (default val)")
    p.add_argument("--test-split", default="public_test", help="the split the card reports too")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="top-label",
                   help="top-label: T, b and c by the top label's log loss (default); entropy: T and b by NLL; "
                   "temperature: T alone by NLL")  # fmt: skip
    p.add_argument("--out", default=None, help="write here instead of in place")
    p.add_argument("--force", action="store_true", help="calibrate even when the card does not show the fit "
                   "split was held out from training")  # fmt: skip
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from mien.export.calibrate import CalibrationError, calibrate

    try:
        block = calibrate(args.model, args.data, args.fit_split, args.test_split, args.out, args.force, args.method)
    except CalibrationError as exc:
        print(f"mien calibrate: {exc}", file=sys.stderr)
        return 2
    split = args.test_split
    print(f"{block['method']}: temperature {block['temperature']:.4f}, entropy slope {block['entropy_slope']:.4f}, "
          f"curve {block['entropy_curve']:.4f} (fitted on {args.fit_split}); {split}: "
          f"ECE {block['before'][split]['ece']:.4f} -> {block['after'][split]['ece']:.4f}, "
          f"NLL {block['before'][split]['nll']:.4f} -> {block['after'][split]['nll']:.4f}")  # fmt: skip
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from mien.export.evaluate import evaluate_path

    report = evaluate_path(
        args.model, args.data, args.split, args.out, args.batch_size, args.label_source, args.ferplus_votes
    )
    print(f"{args.split}: accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  "
          f"({report['num_images']} images, {args.label_source} labels, {len(report['labels'])} classes) "
          f"-> {report['report_path']}")  # fmt: skip
    return 0


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="define a served ensemble of bundled models and score it",
                       description="Write <model-dir>/<id>.ensemble.json (served as model id <id>) and its card "
                       "with the ensemble's accuracy on a split.")  # fmt: skip
    p.add_argument("members", type=comma_list, help="comma-separated model ids of bundled .onnx files")
    p.add_argument("--model-dir", default="models")
    p.add_argument("--model-id", default="ensemble")
    p.add_argument("--flip", action="store_true", help="also average over mirrored faces (test-time augmentation)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--split", default="public_test", help="the split the card reports (the test split)")
    p.add_argument("--weights", type=_weights, default=None,
                   help="`fit` (minimise the NLL on --fit-split), or one comma-separated weight per member; "
                   "default equal weights")  # fmt: skip
    p.add_argument("--fit-split", default="val", help="the split --weights fit is fitted on (default val)")
    p.add_argument(
        "--force",
        action="store_true",
        help="fit weights even on members whose cards do not say --fit-split was held out from training",
    )
    p.set_defaults(func=_run_ensemble)


def _weights(text: str) -> str | list[float]:
    if text == "fit":
        return text
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected `fit` or comma-separated numbers, got {text!r}") from None


def _run_ensemble(args: argparse.Namespace) -> int:
    from mien.export.ensemble import write_ensemble

    card = write_ensemble(list(args.members), args.model_dir, args.model_id, args.flip, args.data, args.split,
                          args.weights, args.fit_split, args.force)  # fmt: skip
    print(f"{card['model_id']}: {args.split} accuracy {card['metrics']['accuracy']:.4f}  "
          f"macro-F1 {card['metrics']['macro_f1']:.4f}")  # fmt: skip
    return 0


def _add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="measure every bundled model and write docs/results.md with figures",
                       description="Accuracy, macro-F1, occluded accuracy, parameters, MACs and ms per face of "
                       "every model in --model-dir, calibration (ECE, NLL, Brier, reliability diagrams), the STN/SR "
                       "ablation, confusion matrices, training curves, STN warps and a t-SNE of the triplet "
                       "embeddings.")  # fmt: skip
    p.add_argument("--model-dir", default="models")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--split", default="public_test")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--figures", default="docs/figures/results")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timing")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per batch size (median reported)")
    p.add_argument("--reference", default="docs/figures/fer_package.json",
                   help="another package's figures on the same faces, drawn in the speed plot "
                   "(benchmarks/fer_package_accuracy.py writes it; '' for none)")  # fmt: skip
    p.add_argument("--default-model", default="mini_xception",
                   help="the model the service serves by default: its reliability diagram is shown")  # fmt: skip
    p.add_argument("--seed-dir", default=None,
                   help="further seeds of the ablation arms, put beside them (default: MODEL_DIR/seeds)")  # fmt: skip
    p.add_argument("--variant-dir", default=None,
                   help="models trained on a subset of the classes, in a table of their own "
                   "(default: MODEL_DIR/variants)")  # fmt: skip
    p.add_argument("--readme", default="README.md",
                   help="the README whose tables between '<!-- mien results: NAME -->' markers are rewritten "
                   "('' for none)")  # fmt: skip
    p.add_argument("--cache", default=None,
                   help="a folder keeping each model's probabilities on the faces it scored: a model file left "
                   "unchanged is not scored again on the same faces (timings are always measured)")  # fmt: skip
    p.set_defaults(func=_run_results)


def _run_results(args: argparse.Namespace) -> int:
    from mien.export.results import ResultsConfig, write_results

    cfg = ResultsConfig(model_dir=args.model_dir, data=args.data, split=args.split, out=args.out,
                        figures=args.figures, threads=args.threads, repeats=args.repeats,
                        reference=args.reference, default_model=args.default_model,
                        seed_dir=args.seed_dir, variant_dir=args.variant_dir,
                        readme=args.readme or None, cache=args.cache)  # fmt: skip
    rows = write_results(cfg, "mien " + shlex.join(sys.argv[1:]))
    for row in sorted(rows, key=lambda r: -r["accuracy"]):
        print(f"{row['model_id']:24s} accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}  "
              f"occluded {row['occluded_accuracy']:.4f}  ECE {row['ece']:.4f}  NLL {row['nll']:.3f}  "
              f"{row['ms_per_face_b1']:.2f} ms/face")  # fmt: skip
    print(f"wrote {args.out}" + (f" and the tables of {args.readme}" if args.readme else ""))
    return 0
