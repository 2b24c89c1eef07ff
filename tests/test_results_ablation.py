"""`mien results` on issue 17's ablation: the four arms' table with intervals, paired tests, verdicts and the
STN warps, the SR front end against bicubic, further seeds beside their arm, and the precision of each run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mien.export.onnx_export import ExportConfig, export_checkpoint
from mien.export.results import ResultsConfig, write_results
from mien.runtime import OnnxClassifier
from tests.conftest import CPU

ARM_KWARGS = {"widths": (8, 16, 16, 32), "hidden": 16, "sr_blocks": 1, "sr_features": 8}
#: The warp given to the +STN arm's transformer before export: zoom to 0.9 and turn the grid by 10°.
STN_SCALE, STN_DEGREES = 0.9, 10.0


@pytest.fixture(scope="module")
def ablation(tiny_npz, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """The four ablation arms at a tiny width, each trained for two short epochs by the project's training (so
    they answer differently on some faces), the +STN arm then given a fixed warp (zoom 0.9, 10°), exported
    by the project's export into one folder, and the results written from it."""
    import math

    from mien.export.sr_export import export_sr_front_end
    from mien.training.config import SRPretrainConfig
    from mien.training.models.base_cnn import ablation_model_kwargs
    from mien.training.sr_pretrain import pretrain_sr
    from mien.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ablation")
    folder = root / "models"
    folder.mkdir()
    c, s = math.cos(math.radians(STN_DEGREES)), math.sin(math.radians(STN_DEGREES))
    warp = torch.tensor([STN_SCALE * c, -STN_SCALE * s, 0.0, STN_SCALE * s, STN_SCALE * c, 0.0])
    for model_id, kwargs in ablation_model_kwargs(**ARM_KWARGS).items():
        run = root / "runs" / model_id
        train(TrainConfig(data=str(tiny_npz), out=str(run), model=model_id, epochs=2, batch_size=32, lr=5e-3,
                          warmup_epochs=0, threads=1, limit=256, model_kwargs=kwargs,
                          stn_reg=0.01, stn_lr_scale=0.01))  # the ablation's (no effect without an STN)  # fmt: skip
        if model_id == "stn_cnn":
            ckpt = torch.load(run / "best.pt", weights_only=False)
            ckpt["state_dict"]["stn.fc.weight"].zero_()
            ckpt["state_dict"]["stn.fc.bias"].copy_(warp)
            torch.save(ckpt, run / "best.pt")
        export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), out=str(folder / f"{model_id}.onnx"),
                                       data=str(tiny_npz), parity_faces=256))  # fmt: skip
    # the SR arms' pre-trained front end, exported where the repository keeps it
    pretrain_sr(SRPretrainConfig(data=str(tiny_npz), out=str(root / "runs" / "sr.pt"), epochs=1, batch_size=16,
                                 sr_kwargs={"num_blocks": 1, "features": 8}, threads=1))  # fmt: skip
    assert export_sr_front_end(root / "runs" / "sr.pt", folder / "frontends" / "edsr_x2.onnx", tiny_npz).passed
    cfg = ResultsConfig(model_dir=str(folder), data=str(tiny_npz), out=str(root / "docs" / "results.md"),
                        figures=str(root / "docs" / "figures" / "results"), repeats=3)  # fmt: skip
    rows = write_results(cfg)
    return root, rows, (root / "docs" / "results.md").read_text()


def _correct(path: Path, tiny_npz) -> np.ndarray:
    data = np.load(tiny_npz)
    test = data["split"] == 1
    classifier = OnnxClassifier.from_path(path, providers=CPU)
    return classifier.predict_crops(list(data["images"][test])).argmax(1) == data["labels"][test]


def test_the_ablation_table_has_intervals_paired_tests_stn_warps_and_verdicts(ablation, tiny_npz):
    from mien.export.stats import bootstrap_ci, mcnemar, paired_bootstrap_diff, verdict

    root, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    assert "public_test accuracy % [95% CI]" in section and "McNemar vs Base" in section and "verdict" in section
    base = _correct(root / "models" / "base_cnn.onnx", tiny_npz)
    for model_id, name in {"base_cnn": "Base", "stn_cnn": "+STN", "sr_cnn": "+SR", "stn_sr_cnn": "+STN+SR"}.items():
        r = by_id[model_id]
        correct = _correct(root / "models" / f"{model_id}.onnx", tiny_npz)
        assert r["accuracy"] == pytest.approx(correct.mean())
        np.testing.assert_array_equal(r["correct"], correct)  # kept in memory for the paired tests
        low, high = bootstrap_ci(correct)
        assert r["accuracy_ci95"] == pytest.approx([low, high])
        line = next(line for line in section.splitlines() if line.startswith(f"| {name} | `{model_id}` |"))
        assert f"| {100 * r['accuracy']:.2f} [{100 * low:.2f}, {100 * high:.2f}] |" in line
        if model_id == "base_cnn":
            assert line.endswith("| reference |")
            continue
        test = mcnemar(base, correct)
        difference = correct.mean() - base.mean()
        d_low, d_high = paired_bootstrap_diff(base, correct)
        assert f"| {100 * difference:+.2f} [{100 * d_low:+.2f}, {100 * d_high:+.2f}] |" in line
        assert f"| {test['b10']} / {test['b01']}, p = " in line
        assert line.endswith(f"| {verdict(difference, test['p_value'])} |")


def test_the_sr_front_end_is_reported_against_bicubic_as_its_card_scored_it_and_is_not_served(ablation):
    root, rows, md = ablation
    card = json.loads((root / "models" / "frontends" / "edsr_x2.card.json").read_text())
    assert "edsr_x2" not in {r["model_id"] for r in rows}  # models/frontends/ holds no classifier
    section = md.split("### The SR front end against bicubic upsampling")[1].split("\n## ")[0]
    for split in ("val", "public_test"):
        e = card["evaluation"][split]
        (line,) = [row for row in section.splitlines() if f"| {split} |" in row]
        assert f"| {e['psnr_db']['sr']['mean']:.2f} ({e['psnr_db']['bicubic']['mean']:.2f}) |" in line
        assert f"{e['ssim_margin']['mean']:+.4f} [{e['ssim_margin']['ci95'][0]:+.4f}," in line
        assert "EDSR B=1, F=8" in line and "| 1 epoch, " in line


def test_an_arm_trained_with_another_recipe_than_base_is_not_called_an_ablation(ablation):
    """The fixture's arms share one recipe but for the model: each gets a verdict. Give +SR the old budget runs'
    differences (fewer epochs, a lower rate, a classifier started from Base) and its verdict names them instead;
    the Δ and McNemar cells stay, since the faces are the same."""
    import copy

    from mien.export.ablation import ablation_table, recipe_differences

    _, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    base = by_id["base_cnn"]["train_config"]
    assert base["model"] == "base_cnn" and base["epochs"] == 2  # what the card recorded from mien train
    for model_id in ("stn_cnn", "sr_cnn", "stn_sr_cnn"):
        assert recipe_differences(base, by_id[model_id]["train_config"]) == ""
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    for model_id, r in by_id.items():  # the epochs column: the schedule, the epoch kept, the precision trained in
        if model_id in ("base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn"):
            assert r["precision"] == "fp32"  # what every epoch of the fixture's runs recorded
            assert f"| `{model_id}` | 2, kept {r['epochs']}, fp32 |" in section and 1 <= r["epochs"] <= 2
    assert "not comparable" not in section

    changed = copy.deepcopy(by_id)
    arm = changed["sr_cnn"]["train_config"]
    arm.update(epochs=1, lr=5e-4, init="runs/base_cnn/best.pt", sr_init="sr.pt", threads=2)
    del arm["augment"]["erasing"]  # an older card without the key: its absence is a difference
    arm["augment"]["mixup"] = 0.2
    found = recipe_differences(base, arm)
    assert found == "epochs 1 vs 2, lr 0.0005 vs 0.005, augment.erasing — vs 0.0, augment.mixup 0.2 vs 0.0 and 1 more"
    every = recipe_differences(base, arm, shown=10)
    assert every == found.replace(" and 1 more", ", init runs/base_cnn/best.pt vs —")  # base's init is ""
    assert "sr_init" not in every and "threads" not in every  # the front end and the machine may differ
    # so may when the SR front end trains, and the precision (amp = "auto": the machine's; the first arms' cards
    # say "bf16", what auto gave there): the +SR arm of issue 17 against the Base card it is compared with
    assert recipe_differences({**base, "amp": "bf16"}, {**base, "amp": "auto", "sr_finetune_epochs": 10}) == ""
    assert recipe_differences(base, {**base, "init": ""}) == ""  # an empty value means what an absent key means
    assert recipe_differences(None, arm).startswith("unknown")

    lines = ablation_table(changed, "public_test")
    sr_line = next(line for line in lines if line.startswith("| +SR | `sr_cnn` |"))
    assert sr_line.endswith(f"| not comparable, trained differently: {found} |")
    assert "p = " in sr_line  # the paired test is still shown
    stn_line = next(line for line in lines if line.startswith("| +STN | `stn_cnn` |"))
    assert "not comparable" not in stn_line and stn_line == next(
        line for line in ablation_table(by_id, "public_test") if line.startswith("| +STN | `stn_cnn` |")
    )


def test_the_stn_warp_learnt_is_read_from_the_onnx_graph_into_the_row_and_the_table(ablation, tiny_npz):
    from mien.export.figures import stn_thetas

    root, rows, text = ablation
    by_id = {r["model_id"]: r for r in rows}
    assert by_id["base_cnn"]["stn_affine"] is None and by_id["sr_cnn"]["stn_affine"] is None
    warp = by_id["stn_cnn"]["stn_affine"]
    assert warp["scale"] == pytest.approx(STN_SCALE, abs=1e-4) and warp["rotation_deg"] == pytest.approx(STN_DEGREES)
    assert warp["faces"] == 280 and warp["scale_std"] == pytest.approx(0.0, abs=1e-5)
    trained = by_id["stn_sr_cnn"]["stn_affine"]  # two short epochs from the identity, with the ablation's stn_reg
    assert abs(trained["scale"] - 1) < 0.3 and abs(trained["rotation_deg"]) < 30
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    assert f"| {STN_SCALE:.3f} / +{STN_DEGREES:.1f}° |" in section
    assert f"| {trained['scale']:.3f} / {trained['rotation_deg']:+.1f}° |" in section
    # the same θ whether read from AffineGrid's input or fitted to GridSample's grid
    path = root / "models" / "stn_cnn.onnx"
    classifier = OnnxClassifier.from_path(path, providers=CPU)
    faces = np.load(tiny_npz)["images"][-4:]
    from_graph = stn_thetas(path, classifier, faces)
    import mien.export.figures as figures

    real_has_op = figures.has_op
    figures.has_op = lambda p, op: False if op == "AffineGrid" else real_has_op(p, op)
    try:
        fitted = stn_thetas(path, classifier, faces)
    finally:
        figures.has_op = real_has_op
    np.testing.assert_allclose(fitted, from_graph, atol=1e-4)
    saved = json.loads((root / "docs" / "figures" / "results" / "results.json").read_text())
    assert all("correct" not in r and "accuracy_ci95" in r for r in saved)  # per-face answers stay in memory
    assert next(r for r in saved if r["model_id"] == "stn_cnn")["stn_affine"] == pytest.approx(warp)


@pytest.fixture(scope="module")
def seeds(ablation, tiny_npz) -> tuple[Path, list[dict], str]:
    """The ablation's folder with a second seed of Base and +STN in ``models/seeds/`` (trained like the arms, with
    seed 1, exported under their own ids), and the results written again from it."""
    from mien.training.models.base_cnn import ablation_model_kwargs
    from mien.training.train import TrainConfig, train

    root, _, _ = ablation
    kwargs = ablation_model_kwargs(**ARM_KWARGS)
    (root / "models" / "seeds").mkdir()
    for model_id in ("base_cnn", "stn_cnn"):
        run = root / "runs" / f"{model_id}_seed1"
        train(TrainConfig(data=str(tiny_npz), out=str(run), model=model_id, epochs=2, batch_size=32, lr=5e-3,
                          warmup_epochs=0, threads=1, limit=256, model_kwargs=kwargs[model_id], stn_reg=0.01,
                          seed=1))  # fmt: skip
        export_checkpoint(ExportConfig(checkpoint=str(run / "best.pt"), data=str(tiny_npz), parity_faces=256,
                                       out=str(root / "models" / "seeds" / f"{model_id}_seed1.onnx"),
                                       model_id=f"{model_id}_seed1"))  # fmt: skip
    (root / "README.md").write_text(README)
    cfg = ResultsConfig(model_dir=str(root / "models"), data=str(tiny_npz), out=str(root / "docs" / "seeds.md"),
                        figures=str(root / "docs" / "figures" / "seeds"), repeats=3,
                        readme=str(root / "README.md"))  # fmt: skip
    rows = write_results(cfg)
    return root, rows, (root / "docs" / "seeds.md").read_text()


README = """# A project

<!-- mien results: headline -->
old headline
<!-- /mien results: headline -->

Prose between the tables.

<!-- mien results: ablation -->
<!-- /mien results: ablation -->
"""


def test_the_ablation_is_saved_and_written_into_the_readme_with_the_verdict_over_seeds(seeds):
    from mien.export.readme import ablation, blocks_in, headline

    root, rows, text = seeds
    table = json.loads((root / "docs" / "figures" / "seeds" / "ablation.json").read_text())
    assert table["split"] == "public_test"
    section = text.split("## STN / SR ablation")[1].split("\n## ")[0]
    for c in table["arms"]:  # the saved cells are the ones results.md shows
        assert (f"| {c['arm']} | `{c['model_id']}` | {c['epochs']} | {c['accuracy']} | {c['delta']} | {c['test']} "
                f"| {c['paper']} |") in section  # fmt: skip
    assert [c["arm"] for c in table["over_seeds"]] == ["Base", "+STN", "+SR", "+STN+SR"]
    for c in table["over_seeds"]:
        assert f"| {c['arm']} | {c['seeds']} | {c['mean_accuracy']} | {c['mean_delta']} | {c['verdict']} |" in section
    readme = (root / "README.md").read_text()
    assert readme.startswith("# A project\n") and "\nProse between the tables.\n" in readme
    found = blocks_in(readme)
    assert found["ablation"] == "\n".join(ablation(table["arms"], table["over_seeds"], "public_test")) + "\n"
    assert found["headline"] == "\n".join(headline(rows, "public_test", "mini_xception")) + "\n"
    stn = next(line for line in found["ablation"].splitlines() if line.startswith("| +STN (`stn_cnn`"))
    assert "learnt warp: scale / rotation" in stn and "| +STN | 2 |" in found["ablation"]


def test_further_seeds_are_scored_beside_their_arm_against_base_of_the_same_seed(seeds, tiny_npz):
    from mien.export.stats import mcnemar, paired_bootstrap_diff, verdict

    root, rows, text = seeds
    assert {r["model_id"] for r in rows} == {"base_cnn", "stn_cnn", "sr_cnn", "stn_sr_cnn"}  # seeds are not served
    saved = json.loads((root / "docs" / "figures" / "seeds" / "seeds.json").read_text())
    assert [(r["model_id"], r["arm"], r["seed"]) for r in saved] == [("base_cnn_seed1", "base_cnn", 1),
                                                                     ("stn_cnn_seed1", "stn_cnn", 1)]  # fmt: skip
    assert all("correct" not in r and "train_config" not in r for r in saved)
    section = text.split("### Every seed of each arm")[1].split("\n## ")[0]
    correct = {(m, s): _correct(root / "models" / f, tiny_npz) for m, s, f in [
        ("base_cnn", 0, "base_cnn.onnx"), ("base_cnn", 1, "seeds/base_cnn_seed1.onnx"),
        ("stn_cnn", 0, "stn_cnn.onnx"), ("stn_cnn", 1, "seeds/stn_cnn_seed1.onnx")]}  # fmt: skip
    assert saved[1]["accuracy"] == pytest.approx(correct["stn_cnn", 1].mean())
    verdicts = []
    for seed in (0, 1):
        model_id = "stn_cnn" if seed == 0 else "stn_cnn_seed1"
        line = next(line for line in section.splitlines() if line.startswith(f"| +STN | `{model_id}` | {seed} |"))
        base, arm = correct["base_cnn", seed], correct["stn_cnn", seed]
        test, difference = mcnemar(base, arm), arm.mean() - base.mean()
        low, high = paired_bootstrap_diff(base, arm)
        assert f"| {100 * difference:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] |" in line
        assert f"| {test['b10']} / {test['b01']}, p = " in line
        assert line.endswith("| (bundled) |" if seed == 0 else "| seed 1 vs 0 |")  # nothing else differs
        verdicts.append(verdict(difference, test["p_value"]))
    base_line = next(line for line in section.splitlines() if line.startswith("| Base | `base_cnn_seed1` | 1 |"))
    assert "| reference |" in base_line and base_line.endswith("| seed 1 vs 0 |")
    assert sum(line.startswith("| +SR | ") for line in section.splitlines()) == 2  # one seed, and its summary
    summary = next(line for line in section.splitlines() if line.startswith("| +STN | 2 |"))
    mean = 50 * (correct["stn_cnn", 0].mean() + correct["stn_cnn", 1].mean())
    assert summary.startswith(f"| +STN | 2 | {mean:.2f} |")
    disagree = f"no measurable effect (seeds disagree: {', '.join(verdicts)})"
    agreed = verdicts[0] if verdicts[0] == verdicts[1] else disagree
    assert summary.endswith(f"| {agreed} |")


def test_an_effect_over_seeds_needs_every_seed_to_show_it():
    from mien.export.ablation import ablation_seeds_table

    n = 400
    right = np.ones(n, dtype=bool)
    worse = right.copy()
    worse[:100] = False  # 100 faces only Base gets right: p far below 0.05

    def row(model_id, seed, correct):
        return {"model_id": model_id, "accuracy": float(correct.mean()), "correct": correct,
                "train_config": {"model": model_id.removesuffix(f"_seed{seed}"), "seed": seed}}  # fmt: skip

    by_id = {m: row(m, 0, right) for m in ("base_cnn", "sr_cnn", "stn_sr_cnn")}
    by_id["stn_cnn"] = row("stn_cnn", 0, worse)
    further = [{**row("base_cnn_seed1", 1, right), "arm": "base_cnn", "seed": 1},
               {**row("stn_cnn_seed1", 1, worse), "arm": "stn_cnn", "seed": 1}]  # fmt: skip
    summary = lambda lines: next(line for line in lines if line.startswith("| +STN | 2 |"))  # noqa: E731
    assert summary(ablation_seeds_table(by_id, further, "public_test")) == "| +STN | 2 | 75.00 | -25.00 | hurts |"
    further[1] = {**row("stn_cnn_seed1", 1, right), "arm": "stn_cnn", "seed": 1}  # seed 1 shows nothing
    assert summary(ablation_seeds_table(by_id, further, "public_test")).endswith(
        "| -12.50 | no measurable effect (seeds disagree: hurts, no measurable effect) |"
    )
    assert ablation_seeds_table(by_id, [], "public_test") == []  # no further seed: no table
    by_id["sr_cnn"]["train_config"]["epochs"] = 2  # an arm trained with another recipe than Base gets no verdict
    sr = next(line for line in ablation_seeds_table(by_id, further, "public_test") if line.startswith("| +SR | 1 |"))
    assert sr.endswith("| not comparable (trained differently from Base, see above) |")


def test_the_precision_a_run_trained_in_comes_from_its_history_else_from_what_amp_asked():
    """An arm trained in bf16 on one machine and another in fp32 on the next share a recipe (amp = "auto"): the
    ablation table shows which precision each ran in, read from the epochs' history, in order when a run was
    resumed on another machine; a card from before the history recorded it falls back to its amp."""
    from types import SimpleNamespace

    from mien.export.results import trained_precision

    def training(history, amp):
        return SimpleNamespace(history=history, config={"amp": amp} if amp else {})

    assert trained_precision(training([{"precision": "fp32"}] * 3, "auto")) == "fp32"
    resumed = [{"precision": "bf16"}, {"precision": "bf16"}, {"precision": "fp32"}, {"precision": "bf16"}]
    assert trained_precision(training(resumed, "auto")) == "bf16/fp32"
    assert trained_precision(training([{"epoch": 1}], "bf16")) == "bf16"  # an older card: what it asked for
    assert trained_precision(training([], "none")) == "fp32"
    assert trained_precision(training([], None)) == "fp32"  # amp's default then: none
    assert trained_precision(training([], "auto")) is None  # auto says nothing without the epochs
    assert trained_precision(None) is None
