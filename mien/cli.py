"""The ``mien`` command: ``train``, ``recipe``, ``pretrain-sr``, ``export``, ``ensemble``, ``eval`` and ``serve``.

Heavy imports (torch, onnx, uvicorn) happen inside each subcommand so that ``mien serve`` works in
an environment without the ``train`` extra and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys


def _label_list(text: str) -> tuple[str, ...]:
    """``angry,sad,happy`` → ('angry', 'sad', 'happy')."""
    labels = tuple(name.strip() for name in text.split(",") if name.strip())
    if len(labels) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two comma-separated labels, got {text!r}")
    return labels


def _label_map(text: str) -> dict[str, str]:
    """``surprise=happy,contempt=angry`` → {'surprise': 'happy', 'contempt': 'angry'}."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected old=new[,old=new...], got {text!r}")
    return {old.strip(): new.strip() for old, new in pairs}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"sr_kwargs\": {{}}}}', got {text!r}")
    return value


def _add_train(sub: argparse._SubParsersAction) -> None:
    # Every option defaults to "not given" so that a recipe's values stand unless a flag overrides them;
    # the defaults shown are TrainConfig's (training/train.py).
    p = sub.add_parser("train", help="train a model on FER2013 (resumes from <out>/last.pt)",
                       argument_default=argparse.SUPPRESS,
                       description="Train a registered model on the train split, keep the best checkpoint by "
                       "validation (PublicTest) accuracy. Rerun the same command to resume. Runs unchanged under "
                       "torchrun (one process per CPU socket or GPU).")  # fmt: skip
    p.add_argument("--config", default="", help="a recipe, e.g. configs/mini_xception.toml: every training choice "
                   "of a bundled model; flags given beside it override its values")  # fmt: skip
    p.add_argument("--data", help="fer2013.csv, fer2013.npz or image-folder root (default ../shared/data/fer2013.npz)")
    p.add_argument("--model", help="model id (default mini_xception; see `mien train --list-models`)")
    p.add_argument("--out", help="run folder (default runs/<model>)")
    p.add_argument("--epochs", type=int, help="default 100")
    p.add_argument("--batch-size", type=int, help="the global batch, over all torchrun processes (default 64)")
    p.add_argument("--lr", type=float, help="Adam peak learning rate (default 2e-3)")
    p.add_argument("--warmup-epochs", type=int, help="linear warm-up before the schedule (default 2)")
    p.add_argument("--weight-decay", type=float, help="default 1e-4")
    p.add_argument("--label-smoothing", type=float, help="default 0.05")
    p.add_argument("--train-split", help="default train")
    p.add_argument("--val-split", help="default public_test")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default 0 = torch's default)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory layout (default on; NCHW where torch 2.13 CPU crashes)")  # fmt: skip
    p.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="mixed precision: bf16 autocast (CPU or GPU), fp16 autocast + GradScaler (GPU only); "
                   "default none (see docs/training.md for what bf16 does on a CPU)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: this rank's GPU if any")
    p.add_argument("--limit", type=int, help="use only the first N training images (smoke tests)")
    s = p.add_argument_group("schedule, early stopping, clipping (training/schedule.py)")
    s.add_argument("--schedule", choices=("cosine", "step", "plateau"), help="after warm-up (default cosine)")
    s.add_argument("--lr-step-epochs", type=int, help="step: epochs between cuts (default 30)")
    s.add_argument("--lr-step-gamma", type=float, help="step: the cut (default 0.1)")
    s.add_argument("--plateau-patience", type=int, help="plateau: epochs without a better val_acc (default 5)")
    s.add_argument("--plateau-factor", type=float, help="plateau: the cut (default 0.5)")
    s.add_argument("--early-stop", type=int, help="stop after N epochs without a better val_acc (default 0 = never)")
    s.add_argument("--grad-clip", type=float, help="max global L2 norm of the gradients (default 0 = off)")
    p.add_argument(
        "--labels",
        type=_label_list,
        help="train on these classes only, in this output order, e.g. angry,sad,happy,fear,neutral",
    )
    p.add_argument(
        "--label-map",
        type=_label_map,
        help="rename or merge classes before --labels picks, e.g. surprise=happy",
    )
    p.add_argument("--label-source", choices=("fer2013", "ferplus", "ferplus7"),
                   help="FER2013's labels (default), or the FER+ votes: 8 FER+ classes (ferplus) or FER2013's 7 "
                   "(ferplus7, contempt votes dropped); see training/ferplus.py")  # fmt: skip
    p.add_argument("--ferplus-votes", help="FER+ votes csv (default: ferplus_votes.csv beside --data)")
    p.add_argument("--ferplus-target", choices=("majority", "soft"),
                   help="train on the majority label (default) or on the distribution of the votes")  # fmt: skip
    p.add_argument(
        "--model-kwargs",
        type=_json_object,
        help='builder options as JSON, e.g. \'{"sr_kwargs": {"num_blocks": 16, "features": 128}}\'',
    )
    p.add_argument("--sr-init", help="SR front end weights from `mien pretrain-sr` (sr_cnn, stn_sr_cnn)")
    p.add_argument("--freeze-sr", action="store_true", help="keep the --sr-init front end fixed (recommended)")
    p.add_argument("--init", help="warm start from a best.pt: copy its layers that match by name and "
                   "shape (e.g. base_cnn's classifier into sr_cnn)")  # fmt: skip
    g = p.add_argument_group("objective options (see training/objectives.py)")
    g.add_argument("--triplet-weight", type=float, help="λ of the triplet loss (stn_resnet10_triplet; default 1)")
    g.add_argument("--triplet-margin", type=float, help="default 0.2")
    g.add_argument("--triplet-per-class", type=int, help="K faces per class in a balanced batch (default 8)")
    g.add_argument("--occlusion-prob", type=float, help="share of training faces given a grey patch (default 0.5)")
    g.add_argument("--occlusion-area", type=float, help="the patch's share of the face area (default 0.25)")
    g.add_argument("--sgan-unsupervised-weight", type=float, help="real-vs-fake loss weight (sgan; default 1)")
    p.add_argument("--list-models", action="store_true", default=False, help="print the registered model ids and exit")
    p.set_defaults(func=_run_train)


_OBJECTIVE_FLAGS = ("triplet_weight", "triplet_margin", "triplet_per_class", "occlusion_prob", "occlusion_area",
                    "sgan_unsupervised_weight")  # fmt: skip


def train_config_from_args(args: argparse.Namespace):
    """(TrainConfig, recipe path): TrainConfig's defaults, then the recipe's values, then the flags given."""
    from mien.training.recipe import config_from_dict, load_recipe

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "list_models")}
    objective = {k: given.pop(k) for k in _OBJECTIVE_FLAGS if k in given}
    if objective:
        given["objective"] = objective
    recipe = load_recipe(args.config) if args.config else {}
    cfg = config_from_dict(given, base=config_from_dict(recipe))
    if "out" not in given and "out" not in recipe:
        cfg.out = f"runs/{cfg.model}"
    return cfg, args.config


def _run_train(args: argparse.Namespace) -> int:
    from mien.training.models import list_models
    from mien.training.train import train

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    cfg, recipe = train_config_from_args(args)
    best = train(cfg, recipe=recipe)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        where = f"at epoch {best['epoch']}; checkpoint {cfg.out}/best.pt"
        print(f"best {cfg.val_split} accuracy {best['val_acc']:.4f} {where}")
    return 0


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="training recipes (configs/<model>.toml) made from model cards",
                       description="Make and check the recipe of a bundled model. `sync` is the one command to run "
                       "after a model is retrained and exported: it rewrites configs/<model id>.toml from the card "
                       "and points the card at it.")  # fmt: skip
    rsub = p.add_subparsers(dest="recipe_command", required=True)
    f = rsub.add_parser("from-card", help="print the TOML recipe of a card's training.config")
    f.add_argument("card")
    k = rsub.add_parser("link", help="set a card's training.recipe after checking the recipe gives its config")
    k.add_argument("card")
    k.add_argument("recipe")
    y = rsub.add_parser("sync", help="write configs/<model id>.toml from each card and link the card to it")
    y.add_argument("cards", nargs="*", help="model cards (default: every card in --model-dir)")
    y.add_argument("--model-dir", default="models")
    y.add_argument("--configs", default="configs")
    c = rsub.add_parser("check", help="exit 1 when a card's training.config differs from what its recipe gives")
    c.add_argument("cards", nargs="*", help="model cards (default: every card in --model-dir)")
    c.add_argument("--model-dir", default="models")
    p.set_defaults(func=_run_recipe)


def _run_recipe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mien.training.recipe import link_card, load_recipe, recipe_differences, recipe_text, sync

    if args.recipe_command == "from-card":
        sys.stdout.write(recipe_text(json.loads(Path(args.card).read_text()), args.card))
        return 0
    if args.recipe_command == "link":
        link_card(args.card, args.recipe)
        print(f"{args.card}: training.recipe = {args.recipe}")
        return 0
    cards = args.cards or sorted(str(p) for p in Path(args.model_dir).glob("*.card.json"))
    if args.recipe_command == "sync":
        for recipe in sync(cards, args.configs):
            print(f"wrote {recipe}")
        return 0
    failed = 0
    for card_path in cards:
        training = json.loads(Path(card_path).read_text()).get("training") or {}
        if not training.get("config"):
            continue
        if not training.get("recipe"):
            print(f"{card_path}: no training.recipe (run `mien recipe sync {card_path}`)")
            failed += 1
            continue
        diffs = recipe_differences(training["config"], load_recipe(training["recipe"]))
        print(f"{card_path}: " + ("; ".join(diffs) if diffs else f"matches {training['recipe']}"))
        failed += bool(diffs)
    return 1 if failed else 0


def _add_pretrain_sr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-sr", help="pre-train the SR front end (24->48 faces, L1) for --sr-init",
                       description="Train the EDSR front end of sr_cnn/stn_sr_cnn to undo a x2 downscale of "
                       "FER2013 Training faces; for `mien train --sr-init X --freeze-sr`.")  # fmt: skip
    p.add_argument("--data", default="../shared/data/fer2013.npz")
    p.add_argument("--out", default="runs/sr_pretrain/sr.pt")
    p.add_argument("--sr-kwargs", type=_json_object, default={}, help="EDSR options, e.g. '{\"num_blocks\": 16}'")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit", type=int, default=0)
    p.set_defaults(func=_run_pretrain_sr)


def _run_pretrain_sr(args: argparse.Namespace) -> int:
    from mien.training.sr_pretrain import SRPretrainConfig, pretrain_sr

    cfg = SRPretrainConfig(data=args.data, out=args.out, sr_kwargs=args.sr_kwargs, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                           limit=args.limit)  # fmt: skip
    m = pretrain_sr(cfg)
    print(f"SR {m['split']} L1 {m['val_l1']:.4f} (bicubic {m['bicubic_l1']:.4f}); checkpoint {cfg.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX with a parity check and a model card",
                       description="Checkpoint -> ONNX (dynamic batch) -> onnx.checker -> parity against PyTorch "
                       "on real faces and random input -> model card. Exits non-zero when parity fails.")  # fmt: skip
    p.add_argument("checkpoint", help="a best.pt written by `mien train`, the word `detector` to export the "
                   "MTCNN face detector from the installed facenet-pytorch wheel, or `triton` to write a Triton "
                   "model repository of the bundled models")  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        help="ONNX path (default models/<model id>.onnx); for `detector` a folder (default models/detector); "
        "for `triton` the repository folder (default triton_repo)",
    )
    p.add_argument("--model-dir", default="models", help="`triton` only: the folder whose *.onnx are exported")
    p.add_argument("--max-batch-size", type=int, default=64, help="`triton` only: max_batch_size of every model")
    p.add_argument("--data", default="../shared/data/fer2013.npz", help="FER2013 for parity faces and accuracy")
    p.add_argument("--split", default="public_test", help="split whose faces drive parity and the card's accuracy")
    p.add_argument("--parity-faces", type=int, default=512, help="real faces in the parity check (>= 256)")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed between PyTorch and ONNX")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument(
        "--flip-tta",
        action="store_true",
        help="average each face's logits with its mirror image's, inside the ONNX graph (2x compute)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
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
    from mien.export.onnx_export import ExportConfig, export_checkpoint

    cfg = ExportConfig(checkpoint=args.checkpoint, out=args.out, data=args.data, split=args.split,
                       parity_faces=args.parity_faces, atol=args.atol, opset=args.opset,
                       flip_tta=args.flip_tta)  # fmt: skip
    return 0 if export_checkpoint(cfg).passed else 1


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class P/R/F1 and a confusion matrix on a split",
                       description="Evaluate a checkpoint (.pt) or an ONNX file on a split of FER2013; "
                       "writes <out>/report.json and <out>/confusion.png.")  # fmt: skip
    p.add_argument("model", help="a .pt checkpoint from `mien train` or an .onnx file from `mien export`")
    p.add_argument("--data", default="../shared/data/fer2013.npz")
    p.add_argument("--split", default="public_test")
    p.add_argument("--out", default=None, help="report folder (default reports/<model file stem>-<split>)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--label-source", default="fer2013", choices=("fer2013", "ferplus", "ferplus7"),
                   help="truth labels: FER2013's, or the FER+ majority votes with 8 classes (ferplus) or FER2013's 7 "
                   "(ferplus7); a model is scored on the classes it shares with the label set")  # fmt: skip
    p.add_argument("--ferplus-votes", default="", help="FER+ votes csv (default: ferplus_votes.csv beside --data)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from mien.training.evaluate import evaluate_path

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
    p.add_argument("members", type=_label_list, help="comma-separated model ids of bundled .onnx files")
    p.add_argument("--model-dir", default="models")
    p.add_argument("--model-id", default="ensemble")
    p.add_argument("--flip", action="store_true", help="also average over mirrored faces (test-time augmentation)")
    p.add_argument("--data", default="../shared/data/fer2013.npz")
    p.add_argument("--split", default="public_test")
    p.set_defaults(func=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> int:
    from mien.export.ensemble import write_ensemble

    card = write_ensemble(list(args.members), args.model_dir, args.model_id, args.flip, args.data, args.split)
    print(f"{card['model_id']}: {args.split} accuracy {card['metrics']['accuracy']:.4f}  "
          f"macro-F1 {card['metrics']['macro_f1']:.4f}")  # fmt: skip
    return 0


def _add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="measure every bundled model and write docs/results.md with figures",
                       description="Accuracy, macro-F1, occluded accuracy, parameters, MACs and ms per face of "
                       "every model in --model-dir, the STN/SR ablation, confusion matrices, training curves, "
                       "STN warps and a t-SNE of the triplet embeddings.")  # fmt: skip
    p.add_argument("--model-dir", default="models")
    p.add_argument("--data", default="../shared/data/fer2013.npz")
    p.add_argument("--split", default="public_test")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--figures", default="docs/figures/results")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timing")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per batch size (median reported)")
    p.set_defaults(func=_run_results)


def _run_results(args: argparse.Namespace) -> int:
    from mien.training.results import ResultsConfig, write_results

    cfg = ResultsConfig(model_dir=args.model_dir, data=args.data, split=args.split, out=args.out,
                        figures=args.figures, threads=args.threads, repeats=args.repeats)  # fmt: skip
    rows = write_results(cfg, "mien " + shlex.join(sys.argv[1:]))
    for row in sorted(rows, key=lambda r: -r["accuracy"]):
        print(f"{row['model_id']:24s} accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}  "
              f"occluded {row['occluded_accuracy']:.4f}  {row['ms_per_face_b1']:.2f} ms/face")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the ONNX models over HTTP (settings from MIEN_* variables)",
                       description="Start the FastAPI service. Every option can also be set by an environment "
                       "variable MIEN_<NAME> (e.g. MIEN_MODEL_DIR); flags win over the environment.")  # fmt: skip
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--default-model", default=None)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from mien.service.config import Settings
    from mien.service.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_dir": args.model_dir,
                                   "default_model": args.default_model}.items() if v is not None}  # fmt: skip
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"MIEN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"mien serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mien", description="Facial expression recognition: train, export, eval, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_recipe,
        _add_pretrain_sr,
        _add_export,
        _add_ensemble,
        _add_eval,
        _add_results,
        _add_serve,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
