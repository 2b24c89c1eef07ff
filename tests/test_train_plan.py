"""scripts/train_plan.sh: the remaining training as one resumable queue. Its commands are recorded by a stand-in
interpreter (no training runs here): the steps run in the plan's order, a finished step is skipped on a rerun,
a failed step stops the queue without being marked done, and the SR arms wait for SR to beat bicubic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "scripts" / "train_plan.sh"

# Records `python -m mien.cli ARGS` as one line (and its LD_PRELOAD in a file beside); writes what sr-eval would (its
# margin from SR_MARGIN) and the card an export into models/ would (in MIEN_MODELS, naming the run folder it came
# from) and the calibration mien calibrate adds to it; fails the step named in FAIL_ON (exit status FAIL_CODE,
# default 1); runs `python -c` (the plan's own checks) with the real interpreter.
STAND_IN = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
if sys.argv[1] == "-c":
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
args = sys.argv[3:]
with open(os.environ["PLAN_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
with open(os.environ["PLAN_LOG"] + ".preload", "a") as log:  # the library each mien command was started with
    log.write(os.environ.get("LD_PRELOAD", "") + "\\n")
if os.environ.get("FAIL_ON") and os.environ["FAIL_ON"] in " ".join(args):
    sys.exit(int(os.environ.get("FAIL_CODE", "1")))
if args[0] == "export" and args[args.index("--out") + 1].startswith("models/"):  # the card mien export writes
    card = Path(os.environ["MIEN_MODELS"]) / args[args.index("--out") + 1].removeprefix("models/")
    card = card.with_name(card.name.removesuffix(".onnx") + ".card.json")
    card.parent.mkdir(parents=True, exist_ok=True)
    command = "mien train --config x.toml --out " + str(Path(args[1]).parent)
    card.write_text(json.dumps({{"model_id": card.name.split(".")[0], "training": {{"command": command}}}}))
if args[0] == "calibrate":  # what mien calibrate adds to the card beside the file it calibrates
    card = Path(os.environ["MIEN_MODELS"]) / args[1].removeprefix("models/")
    card = card.with_name(card.name.removesuffix(".onnx") + ".card.json")
    written = json.loads(card.read_text())
    written["calibration"] = {{"method": "top-label"}}
    card.write_text(json.dumps(written))
if args[0] == "sr-eval" and "--out" in args:
    margin = float(os.environ.get("SR_MARGIN", "1.0"))
    out = Path(args[args.index("--out") + 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({{"psnr_margin_db": {{"mean": margin, "ci95": [margin - 0.1, margin + 0.1]}}}}))
"""


def steps() -> list[str]:
    listed = subprocess.run([str(PLAN), "--list"], capture_output=True, text=True, check=True,
                            env={**os.environ, "MIEN_RUNS": "/nonexistent/plan-runs-for-listing"})  # fmt: skip
    return [line.split()[1] for line in listed.stdout.splitlines()]


@pytest.fixture
def plan(tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    runs, log = tmp_path / "runs", tmp_path / "calls.log"

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "MIEN_RUNS": str(runs), "MIEN_PYTHON": str(python), "PLAN_LOG": str(log),
                   "MIEN_DATA": "/data/fer2013.npz", "MIEN_PLAN_WAIT": "0", "MIEN_MODELS": str(tmp_path / "models"),
                   "MIEN_ALLOCATOR": "glibc",  # never apt-get from a test (the allocator's own test stands one in)
                   **env}  # fmt: skip
        return subprocess.run([str(PLAN), *args], capture_output=True, text=True, env=environ, timeout=120)

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return run, calls, runs


def test_every_training_step_names_a_recipe_of_configs_experiments():
    names = steps()
    assert names[:3] == ["sr_pretrain", "sr_eval", "sr_export"]  # SR is checked and kept before any SR arm trains
    assert names.index("teachers") < names.index("vgg_fer_ba") < names.index("mini_xception_fm")
    for name in set(names[3:]) - {"teachers"}:
        assert (ROOT / "configs" / "experiments" / f"{name}.toml").is_file(), name
    # issue 17: the ablation's four arms first; then issue 14's runs, the born-again network (its first targets) before
    # the FER+ network (its second priority), all before issue 17's seed models
    first_seed_model = min(i for i, n in enumerate(names) if n.startswith("converged_"))
    assert names.index("ablation_stn_sr") < names.index("vgg_fer_ba") < names.index("vgg_fer_ferplus")
    assert max(names.index(n) for n in ("vgg_fer_ferplus", "mini_xception_fm")) < first_seed_model


def test_the_plan_runs_each_step_once_in_order_and_a_rerun_skips_what_is_done(plan):
    run, calls, runs = plan
    done = run("sr_pretrain", "sr_eval", "ablation_base_seed1")
    assert done.returncode == 0, done.stderr
    recorded = calls()
    assert recorded[0].startswith("pretrain-sr --data /data/fer2013.npz --epochs 40") and "--amp auto" in recorded[0]
    assert recorded[1].startswith("sr-eval") and "--split val" in recorded[1]
    assert recorded[2].startswith("sr-eval") and "--split public_test" in recorded[2]
    recipe = "configs/experiments/ablation_base_seed1.toml"
    assert recorded[3] == f"train --config {recipe} --data /data/fer2013.npz --out {runs}/ablation_base_seed1"
    assert [c.split()[0] for c in recorded[4:]] == ["export", "eval", "eval"]
    # a further seed goes to models/seeds/ under its own id (never served), not over the bundled arm
    assert "--out models/seeds/base_cnn_seed1.onnx" in recorded[4] and "--model-id base_cnn_seed1" in recorded[4]
    assert all("models/seeds/base_cnn_seed1.onnx" in c for c in recorded[5:])
    assert not any("models/base_cnn" in c for c in recorded)
    assert all((runs / f"{s}.done").is_file() for s in ("sr_pretrain", "sr_eval", "ablation_base_seed1"))
    # the code the runs import is a snapshot of HEAD outside the checkout
    (src,) = runs.glob("src-*")
    assert (src / "mien" / "training" / "sr_pretrain.py").is_file()

    again = run("sr_pretrain", "sr_eval", "ablation_base_seed1")
    assert again.returncode == 0 and len(calls()) == len(recorded)  # nothing rerun
    listed = run("--list").stdout.splitlines()
    assert "done  ablation_base_seed1" in listed and "todo  ablation_sr" in listed


def _front_end_exported(tmp_path: Path) -> None:
    """The SR front end's card in the models folder: SR pre-training, its check and its export count as finished."""
    card = tmp_path / "models" / "frontends" / "edsr_x2.card.json"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(json.dumps({"model_id": "edsr_x2", "kind": "sr_front_end"}))


def _card(path: Path, out: str) -> None:
    """A committed card, as the plan publishes it: exported from the run folder ``out``, then calibrated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = f"mien train --config configs/experiments/x.toml --data /data/fer2013.npz --out {out}"
    path.write_text(json.dumps({"model_id": path.name.split(".")[0], "training": {"command": command},
                                "calibration": {"method": "top-label"}}))  # fmt: skip


def test_a_step_whose_exported_card_is_in_the_repository_is_done_after_its_run_folder_is_lost(plan, tmp_path):
    """A machine that comes back without ~/mien-runs loses the .done marks, not what was committed."""
    run, calls, runs = plan
    models = tmp_path / "models"
    _card(models / "seeds" / "base_cnn_seed1.card.json", "/root/mien-runs/ablation_base_seed1")
    _card(models / "sr_cnn.card.json", "/elsewhere/ablation_sr")
    _card(models / "base_cnn.card.json", "/root/mien-runs/ablation_base")  # not a step of the plan
    listed = run("--list").stdout.splitlines()
    assert "done  ablation_base_seed1  (its exported card is in " + str(models) + ")" in listed
    assert "done  ablation_sr  (its exported card is in " + str(models) + ")" in listed
    assert "todo  ablation_stn_seed1" in listed and "todo  ablation_stn_sr" in listed
    assert "todo  sr_pretrain" in listed  # SR pre-training is needed until both SR arms are exported
    done = run("ablation_base_seed1", "ablation_sr", "ablation_stn_seed1")
    assert done.returncode == 0, done.stderr
    assert [c.split()[:3] for c in calls() if c.startswith("train")] == [
        ["train", "--config", "configs/experiments/ablation_stn_seed1.toml"]
    ]
    assert "skip ablation_sr: its exported card is in" in done.stdout
    _card(models / "stn_sr_cnn.card.json", "/root/mien-runs/ablation_stn_sr")
    listed = run("--list").stdout.splitlines()
    assert listed[:3] == [f"done  {s}  (its exported card is in {models})"
                          for s in ("sr_pretrain", "sr_eval", "sr_export")]  # fmt: skip


def test_an_exported_sr_front_end_in_the_repository_spares_the_pre_training(plan, tmp_path):
    """The SR arms start from models/frontends/edsr_x2.onnx (their recipes' sr_init): once it is exported, a machine
    that lost its run folders goes straight to the arms; before that, the export is the step after the check."""
    run, calls, runs = plan
    assert run("sr_export").returncode != 0 and calls() == []  # it needs SR to have beaten bicubic first
    (runs / "sr_eval.done").write_text("done")
    assert run("sr_export").returncode == 0
    assert calls() == [f"export {runs}/sr_pretrain/sr.pt --out models/frontends/edsr_x2.onnx --data /data/fer2013.npz"]
    for recipe in ("ablation_sr", "ablation_stn_sr"):
        text = (ROOT / "configs" / "experiments" / f"{recipe}.toml").read_text()
        assert 'sr_init = "models/frontends/edsr_x2.onnx"' in text, recipe
    card = tmp_path / "models" / "frontends" / "edsr_x2.card.json"
    assert card.is_file()  # the export wrote it (the stand-in writes what mien export would)
    card.write_text(json.dumps({"model_id": "edsr_x2", "kind": "sr_front_end"}))
    for step in ("sr_pretrain", "sr_eval", "sr_export"):
        (runs / f"{step}.done").unlink(missing_ok=True)
    listed = run("--list").stdout.splitlines()
    assert listed[:3] == [f"done  {s}  (its exported card is in {tmp_path / 'models'})"
                          for s in ("sr_pretrain", "sr_eval", "sr_export")]  # fmt: skip
    assert "todo  ablation_sr" in listed


def test_the_list_shows_how_far_a_run_under_way_is_and_how_long_it_has_left(plan):
    """Epochs done out of the recipe's, and the time left at the median of the last epochs' seconds (one epoch
    slowed by a pause does not move it)."""
    import json

    run, _, runs = plan
    (runs / "ablation_sr").mkdir(parents=True)
    seconds = [400.0, 420.0, 1800.0, 410.0]  # the third paused for a measurement
    lines = [json.dumps({"epoch": e, "seconds": s}) for e, s in enumerate(seconds, start=1)]
    (runs / "ablation_sr" / "history.jsonl").write_text("\n".join(lines) + "\n")
    listed = run("--list").stdout.splitlines()
    epochs = 50  # configs/experiments/ablation_sr.toml
    assert f"epochs = {epochs}" in (ROOT / "configs" / "experiments" / "ablation_sr.toml").read_text()
    left = (epochs - 4) * 415.0 / 3600
    assert f"todo  ablation_sr  (4/{epochs} epochs, ≈ {left:.1f} h left at 415 s an epoch)" in listed
    assert "todo  ablation_stn_sr" in listed  # not started: no progress shown


def test_a_failed_step_is_left_unmarked_and_what_needs_it_never_starts(plan):
    run, calls, runs = plan
    failed = run("sr_pretrain", "sr_eval", FAIL_ON="pretrain-sr")
    assert failed.returncode != 0 and "FAILED sr_pretrain" in failed.stdout
    assert not (runs / "sr_pretrain.done").exists() and len(calls()) == 1  # sr_eval never started
    assert "skip sr_eval: it needs sr_pretrain" in failed.stdout

    (runs / "sr_pretrain.done").write_text("done")
    gated = run("sr_eval", "sr_export", "ablation_sr", SR_MARGIN="-0.5")  # an SR arm that loses to bicubic never trains
    assert gated.returncode != 0 and "SR does not beat bicubic" in gated.stderr
    assert not (runs / "sr_eval.done").exists()
    assert not any(c.startswith(("train", "export")) for c in calls())
    assert "not finished: sr_eval sr_export ablation_sr" in gated.stdout


def test_the_steps_that_do_not_need_a_failed_one_still_run(plan):
    """A step that fails (a bug, a full disk) leaves the machine training on the steps after it that do not need it."""
    run, calls, runs = plan
    result = run("converged_row_lstm", "converged_se_sepconv", FAIL_ON="converged_row_lstm.toml")
    assert result.returncode != 0 and "FAILED converged_row_lstm" in result.stdout
    trained = [c.split()[2] for c in calls() if c.startswith("train")]
    assert trained == ["configs/experiments/converged_row_lstm.toml", "configs/experiments/converged_se_sepconv.toml"]
    assert not (runs / "converged_row_lstm.done").exists() and (runs / "converged_se_sepconv.done").is_file()
    # inside a failed step nothing runs after the failing command: the failed training is never exported
    assert not any("models/row_lstm" in c for c in calls()) and any("models/se_sepconv" in c for c in calls())


def test_an_sr_arm_is_published_over_its_bundled_id(plan, tmp_path):
    run, calls, runs = plan
    _front_end_exported(tmp_path)
    assert run("ablation_stn_sr").returncode == 0
    recorded = calls()
    assert recorded[0].startswith("train --config configs/experiments/ablation_stn_sr.toml")
    export = recorded[1].split()
    assert export[:2] == ["export", f"{runs}/ablation_stn_sr/best.pt"] and "--flip-tta" in export
    assert export[export.index("--model-id") + 1] == "stn_sr_cnn" and "models/stn_sr_cnn.onnx" in export
    assert [c.split()[0] for c in recorded[2:]] == ["eval", "calibrate", "recipe", "sr-eval"]
    assert "--split val" in recorded[2] and "--fit-split val" in recorded[3]


def test_the_ferplus_network_is_published_as_its_own_id_and_scored_on_the_ferplus_labels(plan):
    run, calls, runs = plan
    assert run("vgg_fer_ferplus").returncode == 0
    recorded = calls()
    assert recorded[0].startswith("train --config configs/experiments/vgg_fer_ferplus.toml")
    export = recorded[1].split()
    assert export[export.index("--model-id") + 1] == "vgg_ferplus" and "models/vgg_ferplus.onnx" in export
    assert recorded[2].startswith("eval models/vgg_ferplus.onnx") and "--label-source ferplus" in recorded[2]
    assert [c.split()[0] for c in recorded[3:]] == ["calibrate", "recipe"]
    assert not any("models/vgg_fer.onnx" in c for c in recorded)  # the FER2013 network stays as it is


def test_an_unknown_step_starts_nothing(plan):
    run, calls, runs = plan
    result = run("sr_pretrain", "no_such_step")
    assert result.returncode == 2 and "unknown step no_such_step" in result.stderr
    assert calls() == [] and not list(runs.glob("src-*"))


def test_the_teachers_are_rebuilt_once_then_both_distillations_learn_from_them(plan):
    run, calls, runs = plan
    (runs / "vgg_fer").mkdir(parents=True)
    (runs / "vgg_fer" / "best.pt").write_text("kept")  # a teacher whose run folder survived is not rebuilt
    assert run("teachers", "vgg_fer_ba", "mini_xception_fm").returncode == 0
    recorded = calls()
    data = "--data /data/fer2013.npz"
    assert recorded[0] == f"recover models/vgg_fer_seed1.onnx --out {runs}/vgg_fer_seed1/best.pt {data}"
    teachers = f"--teacher {runs}/vgg_fer/best.pt,{runs}/vgg_fer_seed1/best.pt"
    trains = [c for c in recorded if c.startswith("train")]
    for call, recipe in zip(trains, ("vgg_fer_ba", "mini_xception_fm"), strict=True):
        assert call == f"train --config configs/experiments/{recipe}.toml {data} --out {runs}/{recipe} {teachers}"
    assert len(recorded) == 1 + 2 * 4  # the recovery, then per student: train, export, eval on val and PublicTest


def test_a_distilled_student_is_exported_as_a_trial_id_not_over_a_served_model(plan, tmp_path):
    """A student's run is not lost with a machine that comes back without its run folder: it is exported to
    models/trials/ under its own id (flip averaging, like every served file) and scored on val, where a session
    decides whether it replaces a bundled model; until then nothing served changes, and its card marks it done."""
    run, calls, runs = plan
    (runs / "teachers.done").parent.mkdir(parents=True)
    (runs / "teachers.done").write_text("done")
    assert run("vgg_fer_ba", "mini_xception_fm").returncode == 0
    recorded = calls()
    for student in ("vgg_fer_ba", "mini_xception_fm"):
        (export,) = [c.split() for c in recorded if c.startswith(f"export {runs}/{student}/best.pt")]
        assert export[export.index("--out") + 1] == f"models/trials/{student}.onnx"
        assert export[export.index("--model-id") + 1] == student and "--flip-tta" in export
        evals = [c for c in recorded if c.startswith(f"eval models/trials/{student}.onnx")]
        assert [e.split()[e.split().index("--split") + 1] for e in evals] == ["val", "public_test"]
    assert not any(c.startswith(("calibrate", "recipe")) for c in recorded)  # nothing served is touched
    assert not any("--out models/vgg_fer" in c or "--out models/mini_xception" in c for c in recorded)
    for student in ("vgg_fer_ba", "mini_xception_fm"):
        (runs / f"{student}.done").unlink()
    listed = run("--list").stdout.splitlines()
    assert f"done  vgg_fer_ba  (its exported card is in {tmp_path / 'models'})" in listed
    assert f"done  mini_xception_fm  (its exported card is in {tmp_path / 'models'})" in listed


def test_the_seed_models_are_published_over_their_bundled_ids_dcnn_with_ten_crop_averaging(plan, tmp_path):
    """Issue 17's converged seed models replace the budget-trained bundled ones as each finishes (a lost machine then
    costs nothing of a finished run); dcnn keeps the seed paper's ten-crop test protocol inside its graph; the 5-class
    variant is scored, not served."""
    run, calls, runs = plan
    seed_models = [s for s in steps() if s.startswith("converged_")]
    assert run(*seed_models).returncode == 0
    exports = {c.split()[c.split().index("--model-id") + 1]: c.split() for c in calls() if c.startswith("export")}
    assert sorted(exports) == ["dcnn", "dcnn5", "row_lstm", "se_sepconv", "sgan", "stn_resnet10_triplet"]
    for model_id, export in exports.items():
        run_folder = "converged_dcnn5" if model_id == "dcnn5" else f"converged_{model_id}"
        assert export[1] == f"{runs}/{run_folder}/best.pt", model_id
        if model_id.startswith("dcnn"):
            assert export[export.index("--ten-crop") + 1] == "42" and "--flip-tta" not in export
        else:
            assert "--flip-tta" in export and "--ten-crop" not in export
    assert "models/dcnn.onnx" in exports["dcnn"] and "models/variants/dcnn5.onnx" in exports["dcnn5"]
    recorded = calls()
    assert any(c.startswith("calibrate models/dcnn.onnx") for c in recorded)
    assert not any(c.startswith("calibrate models/variants") for c in recorded)
    assert [c.split()[:2] for c in recorded if "variants/dcnn5.onnx" in c and c.startswith("eval")] == [
        ["eval", "models/variants/dcnn5.onnx"]] * 2  # fmt: skip
    # the cards mark the steps done, a variant's like a bundled model's, with or without the .done marks
    for step in seed_models:
        (runs / f"{step}.done").unlink()
    listed = run("--list").stdout.splitlines()
    assert f"done  converged_dcnn5  (its exported card is in {tmp_path / 'models'})" in listed


def test_a_done_step_whose_exported_card_is_gone_exports_again(plan, tmp_path):
    """A work tree laid anew before the export was committed keeps the run folder and its .done mark but not the
    card: the step runs again (the finished run resumes at its end) and exports again, instead of counting as done
    while the bundled model stays the old one."""
    run, calls, runs = plan
    _front_end_exported(tmp_path)
    assert run("ablation_sr").returncode == 0 and (runs / "ablation_sr.done").is_file()
    listed = run("--list").stdout.splitlines()
    assert "done  ablation_sr" in listed
    (tmp_path / "models" / "sr_cnn.card.json").unlink()
    assert "todo  ablation_sr" in run("--list").stdout.splitlines()
    before = len(calls())
    assert run("ablation_sr").returncode == 0
    again = calls()[before:]
    assert again[0].startswith("train --config configs/experiments/ablation_sr.toml")
    assert again[1].startswith(f"export {runs}/ablation_sr/best.pt --out models/sr_cnn.onnx")
    # a step that exports nothing stays done by its mark
    (runs / "teachers.done").write_text("done")
    assert "done  teachers" in run("--list").stdout.splitlines()


def test_the_runs_preload_the_allocator_the_plan_finds_and_glibc_stays_when_asked(plan, tmp_path):
    """glibc's malloc maps and unmaps every large activation on each step; the plan preloads tcmalloc for its mien
    commands where the library is (MIEN_ALLOCATOR names one here: an empty file, which the loader skips with a
    warning), and leaves glibc's in place on MIEN_ALLOCATOR=glibc or where none is installed."""
    run, calls, runs = plan
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    done = run("sr_pretrain", "sr_eval", MIEN_ALLOCATOR=str(library), LD_PRELOAD="")
    assert done.returncode == 0, done.stderr
    preloaded = (tmp_path / "calls.log.preload").read_text().splitlines()
    assert len(preloaded) == len(calls()) == 3 and set(preloaded) == {str(library)}
    assert f"memory allocator: {library}" in done.stdout

    (tmp_path / "calls.log.preload").unlink()
    done = run("ablation_base_seed1", MIEN_ALLOCATOR="glibc", LD_PRELOAD="")
    assert done.returncode == 0, done.stderr
    assert set((tmp_path / "calls.log.preload").read_text().splitlines()) == {""}
    assert "memory allocator: glibc (MIEN_ALLOCATOR)" in done.stdout

    # --list starts nothing and says nothing of the allocator
    missing = run("--list", MIEN_ALLOCATOR=str(tmp_path / "nowhere.so"), LD_PRELOAD="")
    assert missing.returncode == 0 and "allocator" not in missing.stdout
    gone = run("ablation_stn_seed1", MIEN_ALLOCATOR=str(tmp_path / "nowhere.so"), LD_PRELOAD="")
    assert gone.returncode == 0, gone.stderr  # a library that is not there: glibc's, said so, and the plan goes on
    assert "nowhere.so not found" in gone.stdout


def test_a_new_machine_without_tcmalloc_gets_it_from_debian_before_the_runs(plan, tmp_path):
    """As root with apt-get (the plan's machine), a missing libtcmalloc-minimal4 is installed, then preloaded."""
    run, calls, runs = plan
    bin_, library = tmp_path / "bin", tmp_path / "lib" / "libtcmalloc_minimal.so.4"
    bin_.mkdir()
    library.parent.mkdir()
    stand_ins = {
        "id": "echo 0",
        "apt-get": f'echo "$*" >> {tmp_path}/apt.log; [ "$1" = update ] || touch {library}',
        # the match first, then a listing as long as a real one: the plan must read it all (under pipefail, a reader
        # that stopped at the match would leave ldconfig to die of SIGPIPE and fail the plan)
        "ldconfig": f'[ -e {library} ] && echo "\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {library}"; '
        'for i in $(seq 1 20000); do echo "\tlibother$i.so (libc6,x86-64) => /usr/lib/libother$i.so"; done',
    }
    for name, body in stand_ins.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    path = f"{bin_}:{os.environ['PATH']}"
    done = run("sr_pretrain", MIEN_ALLOCATOR="", LD_PRELOAD="", PATH=path)
    assert done.returncode == 0, done.stderr
    apt = (tmp_path / "apt.log").read_text().splitlines()
    assert apt[0] == "update -qq" and "libtcmalloc-minimal4" in apt[1].split()
    assert f"memory allocator: {library}" in done.stdout
    assert (tmp_path / "calls.log.preload").read_text().splitlines() == [str(library)]

    again = run("sr_eval", MIEN_ALLOCATOR="", LD_PRELOAD="", PATH=path)  # installed now: found, not installed again
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "apt.log").read_text().splitlines()) == 2


def test_a_step_ended_by_a_signal_stops_the_plan_instead_of_starting_the_next_run(plan):
    """mien train exits 143 after a SIGTERM (last.pt written): the machine's training was stopped on purpose, so the
    plan does not go on to train the next recipe; rerun, it resumes the stopped step first."""
    run, calls, runs = plan
    stopped = run("ablation_base_seed1", "ablation_stn_seed1", FAIL_ON="ablation_base_seed1", FAIL_CODE="143")
    assert stopped.returncode == 143
    assert "STOPPED ablation_base_seed1 by signal 15" in stopped.stdout
    assert not any("ablation_stn_seed1" in c for c in calls()) and not (runs / "ablation_base_seed1.done").exists()
    again = run("ablation_base_seed1", "ablation_stn_seed1")
    assert again.returncode == 0, again.stderr
    assert [c.split()[2] for c in calls() if c.startswith("train")] == [
        "configs/experiments/ablation_base_seed1.toml",
        "configs/experiments/ablation_base_seed1.toml",
        "configs/experiments/ablation_stn_seed1.toml",
    ]


def test_a_publication_cut_short_before_its_calibration_publishes_again(plan, tmp_path):
    """A session that ends (or a calibrate that fails) between a seed model's export and its calibration leaves the
    new card without a calibration: the step is not done, and the rerun exports and calibrates it again rather than
    leaving the served model uncalibrated. A variant that is scored, not served, is done without one."""
    run, calls, runs = plan
    assert run("converged_sgan", FAIL_ON="calibrate models/sgan.onnx").returncode != 0
    card = tmp_path / "models" / "sgan.card.json"
    assert "calibration" not in json.loads(card.read_text())
    assert "todo  converged_sgan" in run("--list").stdout.splitlines()
    before = len(calls())
    assert run("converged_sgan").returncode == 0
    again = [c.split()[0] for c in calls()[before:]]
    assert again == ["train", "export", "eval", "calibrate", "recipe"]
    assert "calibration" in json.loads(card.read_text())
    assert "done  converged_sgan" in run("--list").stdout.splitlines()
    assert run("converged_dcnn5").returncode == 0
    assert "done  converged_dcnn5" in run("--list").stdout.splitlines()
