"""`mien train` under torchrun: two CPU processes (gloo) train the same model as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mien.training.hardware import Process
from mien.training.models import create_model, default_spec
from mien.training.objectives import build_objective
from mien.training.support import check_supported
from mien.training.train import TrainConfig
from tests.conftest import write_npz

ROOT = Path(__file__).resolve().parents[1]
# row_lstm without dropout and with no batch norm: a step is then a pure function of the global batch, so
# two processes that each take half of it and average gradients must land on the single process's weights.
# (Batch norm's statistics are per process under DDP, and dropout masks are drawn per process, so models
# with either match a single process only approximately.)
ARGS = ["--model", "row_lstm", "--model-kwargs", '{"dropout": 0.0, "hidden": 32}', "--epochs", "2",
        "--batch-size", "32", "--warmup-epochs", "1", "--threads", "1", "--limit", "128"]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    data = write_npz(tmp_path / "tiny.npz", train_per_class=20, test_per_class=10)
    common = ["train", "--data", str(data), *ARGS]
    _run([sys.executable, "-m", "mien.cli", *common, "--out", str(tmp_path / "one")], ROOT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "mien.cli", *common, "--out", str(tmp_path / "two")], ROOT)  # fmt: skip

    one = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in two] == [1, 2]  # rank 0 alone wrote the history: no line twice
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):  # reduced over both ranks
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    log = (tmp_path / "two" / "train.log").read_text()
    assert "2 process(es) on cpu" in log and log.count("epoch 2/2") == 1
    single = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["state_dict"]
    parallel = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["state_dict"]
    assert single.keys() == parallel.keys()  # saved from the unwrapped model: no "module." prefix
    for key, tensor in single.items():
        torch.testing.assert_close(parallel[key], tensor, rtol=0, atol=1e-5, msg=key)
    assert not list((tmp_path / "two").glob("*.tmp"))


@pytest.mark.parametrize(
    "model_id, message",
    [
        ("stn_resnet10_triplet", "forward_both, which DistributedDataParallel does not synchronise"),
        ("sgan", "does not support torchrun"),
    ],
)
def test_objectives_that_cannot_run_distributed_refuse_clearly(model_id, message):
    cfg = TrainConfig(model=model_id)
    spec = default_spec(model_id)
    model = create_model(model_id, num_classes=spec.num_classes)
    objective = build_objective(cfg, spec, model, torch.Generator())
    with pytest.raises(ValueError, match=message):
        check_supported(cfg, objective, Process(rank=0, world_size=2), soft_targets=False)
    check_supported(cfg, objective, Process(), soft_targets=False)  # one process: fine


def test_global_batch_must_divide_over_the_processes():
    cfg = TrainConfig(model="row_lstm", batch_size=33)
    objective = build_objective(cfg, default_spec("row_lstm"), create_model("row_lstm"), torch.Generator())
    with pytest.raises(ValueError, match="must divide evenly over 2 processes"):
        check_supported(cfg, objective, Process(world_size=2), soft_targets=False)
