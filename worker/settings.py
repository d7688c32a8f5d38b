"""Worker settings: ``LLAVA_*`` environment over the YAML config over defaults (see producer.app)."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from producer.app import QueueSettings, load_settings
from producer.contract import MAX_LABEL_CHARS, MAX_LABELS, MAX_TEXT_CHARS, model_queue

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
# What of a job can run past its deadline: decoding one image already fetched, and preprocessing it in the
# job's own thread (CPU; about a second for an image at the max_image_pixels cap, shrunk once decoded).
_PAST_DEADLINE_S = 2.0


class WorkerSettings(QueueSettings):
    """Everything a worker process needs. Unknown keys (typos in a YAML file) are errors."""

    model_config = SettingsConfigDict(env_prefix="LLAVA_", extra="forbid", validate_default=True)

    # -- model
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        description="hub id, local checkpoint dir, or tiny:<template> (random tiny checkpoint built on use)",
    )
    model_name: str | None = Field(default=None, description="name reported in results; default: from model")
    model_revision: str | None = Field(
        default=None, min_length=1, description="hub revision (tag, branch or commit) to load; default: main"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda if available")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on cuda, float32 on cpu"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="attention kernel (from_pretrained); auto: FlashAttention-2 where it can run, else sdpa",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="bitsandbytes weight quantization (CUDA only)"
    )
    prompt_family: Literal["mistral", "vicuna", "chatml", "llama3"] | None = Field(
        default=None, description="chat template used when the checkpoint ships none"
    )
    context_length: int | None = Field(
        default=None, ge=256, description="prompt + generated token cap; default: the LM's max positions"
    )
    model_overrides: dict[str, Any] | None = Field(
        default=None, description="LlavaNextConfig overrides for a tiny: model (random weights)"
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "llava-queue",
        description="where tiny:<template> checkpoints are built",
    )
    # -- generation
    max_new_tokens: int = Field(default=128, ge=1, description="default when a job gives none")
    max_new_tokens_cap: int = Field(default=512, ge=1, description="jobs asking for more are refused")
    seed: int = Field(default=0, description="torch seed for sampled (temperature > 0) generation")
    # -- images (see README "Security")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="decoded width x height cap")
    max_aspect_ratio: float = Field(default=20.0, ge=1.0, description="longer side / shorter side cap")
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"],
        description="Pillow formats accepted (GIF: first frame)",
    )
    decode_pixel_budget: int = Field(
        default=50_000_000,
        ge=1,
        description="pixels decoded at full size at once in a worker; more jobs wait (until their deadline)",
    )
    local_image_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories absolute image paths may come from (none: paths refused)",
    )
    # -- URL fetching (see README "Security")
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts and CIDRs exempt from the private-address block list"
    )
    fetch_timeout: float = Field(default=5.0, gt=0, description="seconds to connect, and per socket read")
    fetch_deadline: float = Field(
        default=15.0,
        gt=0,
        description="seconds for a whole fetch: attempts, redirects, pauses; capped by the job's deadline",
    )
    fetch_max_redirects: int = Field(default=3, ge=0, le=20, description="redirect hops, each re-checked")
    fetch_retries: int = Field(default=2, ge=0, le=10, description="retries of transient fetch failures")
    fetch_backoff: float = Field(default=0.5, ge=0, description="first retry pause in seconds (doubles)")
    fetch_threads: int = Field(
        default=4,
        ge=0,
        le=256,
        description="task threads added to 2 x max_batch_size for jobs stalled on slow image servers",
    )
    # -- request limits (lower than or equal to the contract's hard limits)
    max_text_chars: int = Field(
        default=MAX_TEXT_CHARS, ge=1, le=MAX_TEXT_CHARS, description="prompt / question length cap"
    )
    max_labels: int = Field(default=50, ge=1, le=MAX_LABELS, description="labels per classify job")
    max_label_chars: int = Field(
        default=MAX_LABEL_CHARS, ge=1, le=MAX_LABEL_CHARS, description="characters per label"
    )
    # -- batching and the worker process
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="static: jobs per model call (1: batching off); both schedulers: sizes the task threads",
    )
    max_batch_wait_ms: float = Field(
        default=10.0, ge=0, description="static: longest a partial batch waits for more compatible jobs"
    )
    scheduler: Literal["continuous", "static"] = Field(
        default="continuous",
        description="continuous: jobs join the running decode step by step, KV tokens as the budget; "
        "static: batches of max_batch_size run to their longest row",
    )
    kv_cache_tokens: int | None = Field(
        default=None, ge=1, description="continuous: KV cache budget in tokens; default: from memory"
    )
    gpu_memory_fraction: float = Field(
        default=0.9, gt=0, le=1, description="continuous, CUDA: share of free memory after loading for KV"
    )
    cpu_kv_cache_tokens: int = Field(
        default=65536, ge=1, description="continuous, CPU: KV budget when kv_cache_tokens is unset"
    )
    max_running_rows: int = Field(
        default=64, ge=1, le=1024, description="continuous: most rows decoding together"
    )
    max_prefill_tokens: int = Field(
        default=4096,
        ge=1,
        description="continuous: prompt tokens prefilled between two decode steps (longer prompts: chunks)",
    )
    prefix_cache_tokens: int = Field(
        default=0,
        ge=0,
        description="continuous: KV tokens (set aside from the KV budget) keeping recent images' prompt "
        "prefixes for later jobs on the same image; 0: off",
    )
    preprocess_workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="processes running the image processor off the model thread's GIL (0: in each job's "
        "thread); default: 0 on 2 cores or fewer, else min(4, cores - 2)",
    )
    job_timeout: float = Field(
        default=600.0, gt=0, description="seconds a job may take on the worker before JobTimeout"
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="task threads; default 2 x max_batch_size (prepare while computing) + fetch_threads",
    )
    # -- losing nothing
    max_deliveries: int = Field(
        default=3,
        ge=1,
        le=100,
        description="times a job may reach the model with its worker dying each time before WorkerLost",
    )
    peer_check_timeout: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="seconds a starting worker waits for live workers' replies (visibility timeout check)",
    )
    shutdown_grace: float = Field(
        default=60.0,
        ge=0,
        description="seconds a warm shutdown (SIGTERM) lets running jobs finish before requeueing",
    )
    # -- fault injection: for tests and drills only (see worker/faults.py)
    fault_oom_above_batch: int | None = Field(
        default=None, ge=0, description="TESTS ONLY: simulate out-of-memory for batches larger than this"
    )
    fault_oom_marker: str | None = Field(
        default=None, description="TESTS ONLY: jobs with this text always OOM"
    )
    fault_crash_marker: str | None = Field(
        default=None, description="TESTS ONLY: SIGKILL the worker when a job with this text reaches the model"
    )
    fault_slow_marker: str | None = Field(
        default=None, description="TESTS ONLY: jobs with this text decode slowly"
    )
    fault_slow_step_s: float = Field(
        default=0.0, ge=0, description="TESTS ONLY: pause per slow decoding step"
    )
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="queues to consume; default: llava.<model_name> and default_queue"
    )
    consume_default_queue: bool = Field(
        default=True, description="with no explicit queues, also take jobs from default_queue (any model)"
    )
    gpus: str = Field(
        default="none",
        pattern=r"^(all|none|\d+(,\d+)*)$",
        description="none: one process; all or 0,2: one per GPU",
    )
    hostname: str = Field(default="llava@%h", description="Celery node name")
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Prometheus metrics port (off when unset; + GPU index per GPU)",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address the metrics port binds (0.0.0.0 for a scraper on another host or container)",
    )
    loglevel: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")

    @field_validator("queues", "local_image_roots", "fetch_allow", "image_formats", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _caps(self) -> WorkerSettings:
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} is over max_new_tokens_cap {self.max_new_tokens_cap}"
            )
        if self.visibility_timeout <= self.longest_job_seconds:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout} s) must exceed the longest job "
                f"({self.longest_job_seconds:g} s: job_timeout + {_PAST_DEADLINE_S:g} s), or Redis "
                "would hand running jobs to a second worker"
            )
        return self

    @property
    def longest_job_seconds(self) -> float:
        """The most a job can take on a worker: its fetch (ended by the job's deadline too), the decode budget
        wait, the preprocessing pool and the model all end by job_timeout; only decoding an image already
        fetched, and preprocessing it in the job's own thread, may run past it."""
        return self.job_timeout + _PAST_DEADLINE_S

    @field_validator("image_formats")
    @classmethod
    def _upper_formats(cls, value: list[str]) -> list[str]:
        return [name.upper() for name in value]

    @property
    def served_model_name(self) -> str:
        """The name results report: ``model_name`` or the last part of ``model``."""
        return self.model_name or self.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("tiny:")

    @property
    def threads(self) -> int:
        """Task threads: enough to fill one batch while the previous one computes (2 x max_batch_size),
        plus ``fetch_threads`` so that as many jobs stalled on slow image servers (each for at most
        fetch_deadline) do not take the model's supply away."""
        return self.concurrency or 2 * self.max_batch_size + self.fetch_threads

    @property
    def consumed_queues(self) -> list[str]:
        """Explicit ``queues``, else this model's queue (and the shared default queue)."""
        if self.queues:
            return self.queues
        own = [model_queue(self.served_model_name)]
        return [*own, self.default_queue] if self.consume_default_queue else own


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process's settings from env and ``LLAVA_CONFIG`` (cached). Tests build their own instead."""
    return load_settings(WorkerSettings)


G = TypeVar("G")


# Settings that change a job's outcome (its result or its error), not only how fast it runs: workers of one
# queue should agree on them, or the same request succeeds or fails by which worker takes it. Reported in
# health and compared at start and by `llava-queue status` (producer.app.outcome_differences).
OUTCOME_SETTINGS = (
    "max_image_bytes", "max_image_pixels", "max_aspect_ratio", "image_formats", "local_image_roots",
    "fetch_allow", "max_new_tokens", "max_new_tokens_cap", "context_length", "max_text_chars", "max_labels",
    "max_label_chars", "job_timeout", "prompt_family",
)  # fmt: skip


def outcome_settings(settings: WorkerSettings) -> dict[str, Any]:
    """The :data:`OUTCOME_SETTINGS` of ``settings``, as JSON values."""
    return settings.model_dump(mode="json", include=set(OUTCOME_SETTINGS))


def settings_group(group: type[G], settings: WorkerSettings, prefix: str, **derived: Any) -> G:
    """The frozen dataclass ``group`` (a group of settings, e.g. :class:`worker.faults.Faults`) built from
    ``settings``: each field from the setting named ``prefix + field``, except those given in ``derived``
    (computed from other settings). The settings hold every default; a group holds none of its own."""
    names = [f.name for f in dataclasses.fields(group) if f.name not in derived]  # type: ignore[arg-type]
    return group(**{name: getattr(settings, prefix + name) for name in names}, **derived)
