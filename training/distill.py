"""Knowledge distillation (Hinton, Vinyals, Dean, 2015): a student learns the teachers' softened answers.

``mien train --teacher a.onnx,b/best.pt`` loads each teacher once, frozen. On every step the teachers
see the student's own augmented batch (resized to their input size when it differs), their
probabilities are softened with the temperature T and averaged, and the student's loss becomes

    (1 - α) · CE(student, labels) + α · T² · KL(teachers_T ‖ student_T)

(α = ``distill_weight``; T² keeps the soft term's gradients on the hard term's scale). With α = 0 it is
the plain cross-entropy. An exported ``.onnx`` teacher runs through onnxruntime (its flip averaging
included, as served); a ``best.pt`` teacher runs in PyTorch in eval mode, under the run's autocast and
memory layout (bf16 and channels-last make the VGG teacher ~3.8x cheaper than its fp32 ONNX file with
flip averaging). Teachers must read faces the way the student does (channels, scaling, mean, std,
labels): anything else fails before training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mien.spec import PreprocessSpec


class Teacher:
    """A frozen model answering probabilities for a normalised N×C×H×W batch."""

    spec: PreprocessSpec
    name: str

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """The batch at this teacher's input size."""
        if tuple(x.shape[-2:]) == self.spec.input_size:
            return x
        return F.interpolate(x, size=self.spec.input_size, mode="bilinear", align_corners=False)


class OnnxTeacher(Teacher):
    def __init__(self, path: str, threads: int = 0) -> None:
        from mien.runtime import OnnxClassifier

        self.classifier = OnnxClassifier.from_path(path, providers=["CPUExecutionProvider"], threads=threads)
        self.spec, self.name = self.classifier.spec, path

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(self._fit(x).float().numpy(), dtype=np.float32)
        return torch.from_numpy(self.classifier(batch))


class TorchTeacher(Teacher):
    def __init__(self, path: str, channels_last: bool = False) -> None:
        from mien.training.checkpoint import load_model

        self.model, self.spec, _ = load_model(path)
        self.model.requires_grad_(False)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.name = path

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # never in train mode: BN statistics and dropout stay as trained
        return torch.softmax(self.model(self._fit(x).float().contiguous()).float(), dim=1)


def load_teachers(paths: str, student: PreprocessSpec, threads: int = 0, channels_last: bool = False) -> list[Teacher]:
    """The teachers named in a comma-separated list of ``.onnx`` files and checkpoints, checked against
    the student's spec. ``channels_last`` puts checkpoint teachers in the run's memory layout."""
    teachers: list[Teacher] = []
    # "~/…" is expanded here: a shell expands only the first path of "--teacher ~/a.pt,~/b.pt"
    for path in (str(Path(p.strip()).expanduser()) for p in paths.split(",") if p.strip()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"teacher {path}: no such file (an exported .onnx or a mien best.pt)")
        teacher = OnnxTeacher(path, threads) if path.endswith(".onnx") else TorchTeacher(path, channels_last)
        for field in ("channels", "scale", "mean", "std", "labels"):
            if getattr(teacher.spec, field) != getattr(student, field):
                raise ValueError(
                    f"teacher {path} reads faces differently from the student: {field} "
                    f"{getattr(teacher.spec, field)} vs {getattr(student, field)}"
                )
        teachers.append(teacher)
    return teachers


def soften(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) from softmax(z): log p = z - logsumexp(z), and the constant cancels."""
    return torch.softmax(torch.log(probabilities.clamp_min(1e-12)) / temperature, dim=1)


def teacher_targets(teachers: list[Teacher], x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teachers' softened probabilities for batch ``x``, averaged."""
    return torch.stack([soften(t.probabilities(x.detach().cpu()), temperature) for t in teachers]).mean(0)


def distillation_loss(
    student_logits: torch.Tensor,
    hard_loss: torch.Tensor,
    soft_targets: torch.Tensor,
    temperature: float,
    weight: float,
) -> torch.Tensor:
    """(1 - weight) · hard_loss + weight · T² · KL(soft_targets ‖ softmax(student / T))."""
    if weight == 0:
        return hard_loss
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, soft_targets.to(log_student.device), reduction="batchmean")
    return (1 - weight) * hard_loss + weight * temperature**2 * kl
