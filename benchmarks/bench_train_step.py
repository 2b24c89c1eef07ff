"""Training throughput on this CPU: NCHW vs channels-last, fp32 vs bf16 autocast, for several models.

    .venv/bin/python benchmarks/bench_train_step.py --models mini_xception,base_cnn,se_sepconv --threads 1

Each model is built with the model kwargs of its recipe (configs/<id>.toml) when there is one, i.e. the
bundled network. A step is what ``mien train`` does (the objective's CrossEntropy train_step: forward and
loss under the run's autocast, backward, Adam) on random input. The four set-ups are timed in interleaved
rounds and the median round is reported, so a machine shared with other work slows them alike.
Channels-last is skipped (and said so) for a model where torch 2.13 CPU would crash in it. Prints a
Markdown table of images per second, seconds per FER2013 epoch (28,709 images) and the speed-up over
NCHW fp32. A benchmark, not a test: its figures go to docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mien.machine import describe_cpu
from mien.training.hardware import channels_last_hazards
from mien.training.models import create_model, default_spec
from mien.training.objectives import CrossEntropy, StepContext
from mien.training.recipe import config_from_dict, load_recipe

FER2013_TRAIN_IMAGES = 28_709
SETUPS = [("NCHW", "none"), ("NCHW", "bf16"), ("channels-last", "none"), ("channels-last", "bf16")]


def bundled_kwargs(model_id: str) -> dict:
    """The model kwargs of the bundled model (its recipe), or the builder's defaults."""
    recipe = Path("configs") / f"{model_id}.toml"
    return load_recipe(recipe).get("model_kwargs", {}) if recipe.is_file() else {}


def make_step(
    model_id: str,
    batch: int,
    layout: str,
    amp: str,
    crop: int = 0,
    kwargs: dict | None = None,
    compiled: bool = False,
    freeze_sr: bool = False,
):
    """A closure running one optimiser step of ``model_id`` as the training loop does (through ``torch.compile`` of
    the model with ``compiled``: the optimiser and the objective stay eager; with ``freeze_sr`` the SR front end is
    fixed, as ``mien train --freeze-sr`` fixes it, so no gradient flows through it)."""
    kwargs = bundled_kwargs(model_id) if kwargs is None else kwargs
    spec = default_spec(model_id)
    torch.manual_seed(0)
    model = create_model(model_id, num_classes=spec.num_classes, **kwargs).train()
    if freeze_sr:
        if getattr(model, "sr", None) is None:
            raise SystemExit(f"--freeze-sr: {model_id} has no SR front end")
        model.sr.requires_grad_(False)
    channels_last = layout == "channels-last"
    cfg = config_from_dict({"model": model_id, "channels_last": channels_last, "batch_size": batch,
                            "augment": {"crop": crop}})  # fmt: skip
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = CrossEntropy(cfg, spec, model, torch.Generator().manual_seed(0))
    objective.set_context(StepContext(amp=amp))
    optimizer = objective.build_optimizer(model)
    images = torch.randint(0, 256, (batch, 48, 48), dtype=torch.uint8)
    labels = torch.randint(0, spec.num_classes, (batch,))
    runs = torch.compile(model) if compiled else model
    return lambda: objective.train_step(runs, optimizer, images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mini_xception", help="comma-separated model ids")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per set-up per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crop", type=int, default=0, help="train on random crops of this size (the recipe's --crop)")
    parser.add_argument("--model-kwargs", default=None, help="JSON builder kwargs for every model of --models "
                        "instead of the bundled ones ('{}': the builder's defaults, the papers' widths)")  # fmt: skip
    parser.add_argument("--setups", default=None, help="only these layout:precision pairs, e.g. "
                        "'channels-last:bf16,NCHW:none' (default: all four)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time each set-up with the model through "
                        "torch.compile (inductor; compiling is left out of the timing, as a warm-up)")  # fmt: skip
    parser.add_argument("--freeze-sr", action="store_true", help="fix the SR front end of sr_cnn/stn_sr_cnn "
                        "(mien train --freeze-sr): no gradient through it")  # fmt: skip
    args = parser.parse_args()
    chosen = [tuple(pair.split(":")) for pair in args.setups.split(",")] if args.setups else SETUPS
    chosen = [(*pair, False) for pair in chosen] + ([(*pair, True) for pair in chosen] if args.compile else [])
    override = json.loads(args.model_kwargs) if args.model_kwargs is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {describe_cpu()}; "
          f"median of {args.rounds} interleaved rounds of {args.steps} steps"
          + (f"; random {args.crop}x{args.crop} crops" if args.crop else "")
          + ("; SR front end frozen" if args.freeze_sr else ""))  # fmt: skip
    first = "{} {}".format(*chosen[0][:2])
    print(f"\n| model | layout | precision | images/s | s/epoch | speed-up vs {first} |\n|---|---|---|---|---|---|")
    for model_id in args.models.split(","):
        spec = default_spec(model_id)
        kwargs = bundled_kwargs(model_id) if override is None else override
        model = create_model(model_id, num_classes=spec.num_classes, **kwargs)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"<!-- {model_id} {json.dumps(kwargs)}: {parameters / 1e6:.2f} M parameters -->")
        hazards = channels_last_hazards(model, (spec.channels, *spec.input_size))
        setups = [s for s in chosen if not (hazards and s[0] == "channels-last")]
        steps = {s: make_step(model_id, args.batch_size, *s[:2], crop=args.crop, kwargs=kwargs, compiled=s[2],
                           freeze_sr=args.freeze_sr)
                 for s in setups}  # fmt: skip
        for step in steps.values():  # warm-up: oneDNN primitive creation, allocator
            for _ in range(2):
                step()
        times: dict[tuple[str, str, bool], list[float]] = {s: [] for s in setups}
        for _ in range(args.rounds):
            for setup, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[setup].append((time.perf_counter() - start) / args.steps)
        base = statistics.median(times[setups[0]])
        for (layout, amp, compiled), samples in times.items():
            t = statistics.median(samples)
            epoch = t * FER2013_TRAIN_IMAGES / args.batch_size
            precision = ("bf16 autocast" if amp == "bf16" else "fp32") + (", torch.compile" if compiled else "")
            print(
                f"| {model_id} | {layout} | {precision} | {args.batch_size / t:.0f} | {epoch:.0f} | {base / t:.2f}× |"
            )
        if hazards:
            print(f"| {model_id} | channels-last | — | skipped: would crash ({', '.join(hazards)}) | | |")


if __name__ == "__main__":
    main()
