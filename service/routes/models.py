"""GET /models: what each served model is, how it preprocesses, how accurate its card says it is, and how its
probabilities were calibrated."""

from __future__ import annotations

from fastapi import APIRouter

from mien.schemas import ModelInfo, ModelsResponse, error_responses
from mien.service.deps import ModelsDep

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, responses=error_responses(503))
def list_models(models: ModelsDep) -> ModelsResponse:
    infos = []
    for model_id in models.ids:
        loaded = models.models[model_id]
        spec = loaded.classifier.spec
        infos.append(
            ModelInfo(
                id=model_id,
                version=loaded.version,
                labels=list(spec.labels),
                input=spec.to_dict(),
                accuracy=loaded.accuracy,
                accuracy_split=loaded.accuracy_split,
                provider=loaded.provider,
                default=model_id == models.default_id,
                calibration=loaded.calibration,
            )
        )
    return ModelsResponse(default=models.default_id, models=infos)
