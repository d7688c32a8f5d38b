"""The LLaVA-NeXT runtime: the only package that imports torch and transformers (the model, its prompt
families and the tiny-checkpoint builder). Knows nothing of Celery."""

from worker.runtime.loading import StartupError, load_model, resolve_model_source
from worker.runtime.model import Generation, LabelScores, Prepared, Prompt, Runtime, Sampling

__all__ = [
    "Generation",
    "LabelScores",
    "Prepared",
    "Prompt",
    "Runtime",
    "Sampling",
    "StartupError",
    "load_model",
    "resolve_model_source",
]
