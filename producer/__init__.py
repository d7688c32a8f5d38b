"""llava-queue producer: submit LLaVA-NeXT jobs and collect typed results. Never imports torch."""

from importlib.metadata import PackageNotFoundError, version

from producer.client import LlavaClient
from producer.contract import (
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    CaptionRequest,
    CaptionResult,
    ClassifyRequest,
    ClassifyResult,
    GenerationParams,
    VQARequest,
    VQAResult,
)
from producer.errors import (
    BrokerUnavailable,
    FetchFailed,
    FetchForbidden,
    ImageError,
    ImageTooLarge,
    InternalError,
    InvalidImage,
    InvalidRequest,
    JobTimeout,
    LlavaError,
    ResourceExhausted,
    ResultTimeout,
    WorkerLost,
)
from producer.job import Job
from producer.settings import ClientSettings, load_settings

try:
    __version__ = version("llava-queue")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "TASK_CAPTION",
    "TASK_CLASSIFY",
    "TASK_VQA",
    "BrokerUnavailable",
    "CaptionRequest",
    "CaptionResult",
    "ClassifyRequest",
    "ClassifyResult",
    "ClientSettings",
    "FetchFailed",
    "FetchForbidden",
    "GenerationParams",
    "ImageError",
    "ImageTooLarge",
    "InternalError",
    "InvalidImage",
    "InvalidRequest",
    "Job",
    "JobTimeout",
    "LlavaClient",
    "LlavaError",
    "ResourceExhausted",
    "ResultTimeout",
    "VQARequest",
    "VQAResult",
    "WorkerLost",
    "__version__",
    "load_settings",
]
