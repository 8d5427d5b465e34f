"""The schema of the one config file: every section, its defaults and its checks (pydantic v2).

A config is validated whole: field rules, then the checks across sections (domains named by the
stages, the router's ``top_k`` against the experts, the tune section through
:func:`modula.config.tuning.check_tune`). :meth:`ModulaConfig.to_data` is the one way a config
becomes plain data for printing or writing, with its secrets masked, dropped or revealed.
Loading a file (YAML, ``${ENV}``, ``--set``) is :mod:`modula.config.loader`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from modula.config.names import DOMAIN_NAME, MODEL_NAME, SERVED_NAME, SWEEP_NAME
from modula.config.tuning import TUNABLE, check_tune
from modula.errors import UnknownName

__all__ = [
    "BUILTIN_DOMAINS",
    "SECRET_FIELDS",
    "STAGE_NAMES",
    "AutoscalingSpec",
    "ClusterConfig",
    "DomainConfig",
    "EvalConfig",
    "ModelConfig",
    "ModulaConfig",
    "ModulaLayerConfig",
    "NodeType",
    "RouterConfig",
    "ScalingConfigSpec",
    "SchedulerSpec",
    "SearchDimension",
    "ServeConfig",
    "StageConfig",
    "StagesConfig",
    "StorageConfig",
    "TinyModelConfig",
    "TrialResources",
    "TuneConfig",
    "default_domains",
]

Variant = Literal["lora", "molora", "flan", "res"]
Dtype = Literal["float32", "bfloat16", "float16"]
Precision = Literal["fp32", "bf16", "fp16"]
KernelBackend = Literal["auto", "reference", "stacked", "triton"]
Metric = Literal["exact_match", "accuracy", "perplexity"]
BUILTIN_DOMAINS = ("general", "code", "math", "units", "convert", "headlines", "products")
STAGE_NAMES = ("pretrain", "universal", "domain", "router", "lora", "molora")
# the secrets of a config, as (section, field): never printed, never written to a rendered file
SECRET_FIELDS = (("storage", "access_key_id"), ("storage", "secret_access_key"),
                 ("serve", "api_keys"))

_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# cluster


class NodeType(_Section):
    """A kind of node for the cluster launcher / KubeRay manifests."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")] = "worker"
    cpus: Annotated[int, Field(ge=1)] = 8
    gpus: Annotated[int, Field(ge=0)] = 0
    memory_gb: Annotated[int, Field(ge=1)] = 32
    min_workers: Annotated[int, Field(ge=0)] = 0
    max_workers: Annotated[int, Field(ge=0)] = 4
    instance_type: str | None = None
    accelerator_type: str | None = None

    @model_validator(mode="after")
    def _min_le_max(self) -> NodeType:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})"
            )
        return self


class KubernetesSpec(_Section):
    namespace: str = "default"
    # an image with modula installed: `docker build -t modula:0.1.0 .` from this repository
    image: str = "modula:0.1.0"
    service_account: str | None = None


class ProviderSpec(_Section):
    """Where `ray up` creates machines."""

    type: Literal["aws", "gcp", "azure", "local"] = "aws"
    region: str = "us-west-2"
    availability_zone: str | None = None
    head_ip: str | None = None
    worker_ips: list[str] = Field(default_factory=list)


class ClusterConfig(_Section):
    """How to reach Ray: ``local`` starts one here, anything else is the address of a cluster."""

    address: str = "local"
    num_cpus: Annotated[int, Field(ge=1)] | None = 4
    num_gpus: Annotated[int, Field(ge=0)] | None = 0
    resources: dict[str, float] = Field(default_factory=dict)
    object_store_memory_mb: Annotated[int, Field(ge=75)] | None = None
    dashboard: bool = True
    dashboard_port: Annotated[int, Field(ge=1024, le=65535)] = 8265
    namespace: str = "modula"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    project_dir: str = "."
    head: NodeType = Field(default_factory=lambda: NodeType(name="head", min_workers=0, max_workers=0))
    workers: list[NodeType] = Field(default_factory=lambda: [NodeType()])
    provider: ProviderSpec = Field(default_factory=ProviderSpec)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    docker_image: str = "rayproject/ray:2.60.0-py311"

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.strip()
        if v in ("local", "auto"):
            return v
        if re.match(r"^(ray|http|https)://[^\s/]+(:\d+)?/?$", v) or re.match(
            r"^[A-Za-z0-9.\-]+:\d{2,5}$", v
        ):
            return v
        raise ValueError(
            f"{v!r} is not a Ray address (allowed: 'local', 'auto', 'host:port', "
            "'ray://host:port', 'http://host:8265')"
        )

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = {"env_vars", "pip", "uv", "conda", "working_dir", "py_modules", "excludes",
                   "container", "image_uri", "nsight", "config", "py_executable"}
        unknown = sorted(set(v) - allowed)
        if unknown:
            raise ValueError(f"unknown runtime_env keys {unknown} (allowed: {sorted(allowed)})")
        env = v.get("env_vars", {})
        if not isinstance(env, dict) or not all(isinstance(x, str) for x in env.values()):
            raise ValueError("runtime_env.env_vars must map names to strings")
        return v

    @property
    def is_local(self) -> bool:
        return self.address == "local"

    @property
    def dashboard_address(self) -> str:
        """The HTTP address of the Jobs API for this cluster."""
        if self.address.startswith(("http://", "https://")):
            return self.address.rstrip("/")
        if self.address.startswith("ray://"):
            host = self.address[len("ray://"):].split(":")[0]
            return f"http://{host}:{self.dashboard_port}"
        if self.address in ("local", "auto"):
            return f"http://127.0.0.1:{self.dashboard_port}"
        return f"http://{self.address.split(':')[0]}:{self.dashboard_port}"


# --------------------------------------------------------------------------------------------
# storage


class StorageConfig(_Section):
    """Where datasets, run directories and the expert registry live."""

    root: str = Field(default="./runs", validate_default=True)
    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty (allowed: a path or s3://bucket/prefix)")
        if "://" in v:
            scheme, rest = v.split("://", 1)
            if scheme != "s3":
                raise ValueError(
                    f"scheme {scheme!r} is not supported (allowed: a local path or s3://bucket/prefix)"
                )
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise ValueError("s3:// root has no bucket (expected s3://bucket/prefix)")
            if not _S3_BUCKET.match(bucket):
                raise ValueError(
                    f"{bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.' or '-')"
                )
            return v.rstrip("/")
        # A relative path means "relative to where modula runs": resolved here, on the driver,
        # because Ray Train workers and Serve replicas run in other working directories.
        return os.path.abspath(os.path.expanduser(v))

    @field_validator("access_key_id", "secret_access_key", mode="before")
    @classmethod
    def _empty_secret(cls, v: Any) -> Any:
        # "${AWS_ACCESS_KEY_ID:-}" with the variable unset means "use the environment's chain"
        return None if v == "" else v

    @field_validator("endpoint", mode="before")
    @classmethod
    def _empty_endpoint(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+(:\d+)?/?$", v):
            raise ValueError(f"{v!r} is not an endpoint URL (expected http(s)://host[:port])")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _endpoint_needs_s3(self) -> StorageConfig:
        if self.endpoint and not self.is_s3:
            raise ValueError("endpoint is set but root is not an s3:// URL")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be given together")
        return self

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def bucket(self) -> str | None:
        return self.root[len("s3://"):].split("/", 1)[0] if self.is_s3 else None

    @property
    def prefix(self) -> str:
        if not self.is_s3:
            return ""
        parts = self.root[len("s3://"):].split("/", 1)
        return parts[1] if len(parts) > 1 else ""


# --------------------------------------------------------------------------------------------
# model


class TinyModelConfig(_Section):
    """The built-in Llama-architecture base model, pretrained locally (stage 0)."""

    vocab_size: Annotated[int, Field(ge=256, le=65536)] = 4096
    hidden_size: Annotated[int, Field(ge=16)] = 192
    num_layers: Annotated[int, Field(ge=1, le=64)] = 4
    num_heads: Annotated[int, Field(ge=1)] = 6
    num_kv_heads: Annotated[int, Field(ge=1)] | None = 2
    intermediate_size: Annotated[int, Field(ge=16)] = 512
    max_position_embeddings: Annotated[int, Field(ge=64)] = 512
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        return self


class ModelConfig(_Section):
    """The frozen base model: ``builtin:tiny``, a local HF directory, or an s3:// prefix."""

    base: str = "builtin:tiny"
    dtype: Dtype = "float32"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    max_length: Annotated[int, Field(ge=16)] = 256
    trust_remote_code: bool = False

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v.startswith("builtin:") and v != "builtin:tiny":
            raise ValueError(f"unknown built-in model {v!r} (allowed: 'builtin:tiny')")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(
                "hub or URL models are not fetched at run time "
                "(allowed: 'builtin:tiny', a local HF directory, s3://bucket/prefix)"
            )
        return v

    @property
    def is_builtin(self) -> bool:
        return self.base == "builtin:tiny"


# --------------------------------------------------------------------------------------------
# the MoDULA layer


class RouterConfig(_Section):
    """Routing. The paper: the per-layer routers, a dense softmax per token (granularity
    token, top_k None, temperature 1). [ours] ``request``: a classifier trained in the router
    stage picks the experts of a whole request from its prompt (docs/method.md)."""

    top_k: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(gt=0)] = 1.0
    granularity: Literal["token", "request"] = "token"
    # request routing: the classifier's k most likely classes, renormalised (1: the top class
    # alone; None: every class weighted by its probability)
    request_top_k: Annotated[int, Field(ge=1)] | None = 1


class ModulaLayerConfig(_Section):
    """The adapted layer (docs/method.md); [ours] defaults are the fields with a comment."""

    variant: Variant = "res"
    universal_rank: Annotated[int, Field(ge=1, le=1024)] = 16
    domain_rank: Annotated[int, Field(ge=1, le=1024)] = 8
    # [ours] alpha = 2 * rank when not given
    universal_alpha: Annotated[float, Field(gt=0)] | None = None
    domain_alpha: Annotated[float, Field(gt=0)] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # [ours] all linear projections of attention and MLP; None = the model family's default
    target_modules: list[str] | None = None
    leaky_relu_slope: Annotated[float, Field(ge=0, lt=1)] = 0.01
    # [ours, beyond the paper] what Res domain experts read: the universal output h as is
    # (the paper), or h / RMS(h) per token, so their learning does not hinge on the size of h
    res_input_norm: Literal["none", "rms"] = "none"
    router: RouterConfig = Field(default_factory=RouterConfig)
    kernel: KernelBackend = "auto"

    @model_validator(mode="after")
    def _request_routing(self) -> ModulaLayerConfig:
        if self.router.granularity == "request" and self.variant not in ("flan", "res"):
            raise ValueError(
                f"router.granularity: 'request' needs a MoDULA variant with a universal expert "
                f"(allowed with variant {self.variant!r}: token)")
        return self

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must name at least one module, or be omitted for the default")
            dup = sorted({x for x in v if v.count(x) > 1})
            if dup:
                raise ValueError(f"modules named twice: {dup}")
        return v

    @property
    def universal_scaling(self) -> float:
        return (self.universal_alpha or 2.0 * self.universal_rank) / self.universal_rank

    @property
    def domain_scaling(self) -> float:
        return (self.domain_alpha or 2.0 * self.domain_rank) / self.domain_rank


# --------------------------------------------------------------------------------------------
# domains


class SplitSizes(_Section):
    train: Annotated[int, Field(ge=1)] = 2000
    validation: Annotated[int, Field(ge=1)] = 100
    test: Annotated[int, Field(ge=1)] = 100


class DomainConfig(_Section):
    """A domain: built-in (``source: builtin``) or user data (a local or s3:// path)."""

    name: Annotated[str, Field(pattern=DOMAIN_NAME)]
    source: str = "builtin"
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    prompt_column: str = "prompt"
    response_column: str = "response"
    splits: SplitSizes = Field(default_factory=SplitSizes)
    metric: Metric = "exact_match"
    # held out of the first training: the "new domain" of the pluggability experiment
    reserved: bool = False
    # seeds the deterministic build of the splits (built-in generators and the split deal)
    seed: int = 0

    @model_validator(mode="after")
    def _builtin_known(self) -> DomainConfig:
        if self.source == "builtin" and self.name not in BUILTIN_DOMAINS:
            raise ValueError(
                f"no built-in domain named {self.name!r} (allowed: {', '.join(BUILTIN_DOMAINS)}; "
                "or give `source:` a path to parquet/JSONL files)"
            )
        return self


# --------------------------------------------------------------------------------------------
# stages


# resources Ray names itself: they have their own fields, never a custom resource's name
_RAY_RESOURCES = ("CPU", "GPU", "TPU", "memory", "object_store_memory")


def _check_custom_resources(v: dict[str, float]) -> dict[str, float]:
    for name, amount in v.items():
        if name in _RAY_RESOURCES or name.lower() in ("cpu", "gpu", "tpu"):
            raise ValueError(f"{name!r} is not a custom resource (CPUs and GPUs have their own "
                             f"fields; not allowed here: {', '.join(_RAY_RESOURCES)})")
        if not re.match(r"^[A-Za-z0-9_.:/-]+$", name):
            raise ValueError(f"resource name {name!r}: letters, digits and '_.:/-' only")
        if not amount > 0:
            raise ValueError(f"resource {name!r}: the amount must be > 0 (got {amount})")
    return v


class ScalingConfigSpec(_Section):
    """Mirrors ray.train.ScalingConfig for one stage."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    # where a run's workers go (Ray Train's placement_strategy): `pack` fills as few nodes as
    # possible, `spread` puts them on different nodes where it can (soft: a run that lost a
    # node packs onto the ones left)
    placement: Literal["pack", "spread"] = "pack"
    # custom logical resources every worker reserves, e.g. {trainer: 1} for nodes started with
    # `--resources '{"trainer": 2}'`: keeps the runs on the nodes that have them
    custom_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("custom_resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(v)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def placement_strategy(self) -> str:
        """Ray's name of :attr:`placement`."""
        return self.placement.upper()

    def resources_per_worker(self) -> dict[str, float]:
        """``ScalingConfig(resources_per_worker=...)``: CPUs, GPUs and the custom resources."""
        out = {"CPU": self.cpus_per_worker, **self.custom_resources}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out


class StageConfig(_Section):
    """One training stage; the trainers turn this into a TorchTrainer run."""

    steps: Annotated[int, Field(ge=1)] = 200
    batch_size: Annotated[int, Field(ge=1)] = 16
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    max_length: Annotated[int, Field(ge=16)] | None = None
    checkpoint_every: Annotated[int, Field(ge=1)] = 50
    max_failures: Annotated[int, Field(ge=-1)] = 2
    seed: int = 0
    # which domains this stage sees; None = every non-reserved domain
    domains: list[str] | None = None
    # router stage: share of general (universal) data mixed into the domain mix [ours]
    general_fraction: Annotated[float, Field(ge=0, le=1)] = 0.2
    # domain stage: how many domain experts share one Ray Train run
    domains_per_run: Annotated[int, Field(ge=1)] = 1
    # router stage [ours]: the request classifier's training prompts per class and Adam steps
    classifier_examples: Annotated[int, Field(ge=1)] = 300
    classifier_steps: Annotated[int, Field(ge=1)] = 300
    # router stage [ours]: weight of a per-token cross-entropy pulling each layer's gates
    # toward the expert of the example's domain (0 = the paper's plain language-model loss)
    route_supervision: Annotated[float, Field(ge=0)] = 0.0
    # autocast of the forward (base and adapters) in bf16 / fp16; the trained weights stay
    # float32 masters; fp16 scales the loss (GradScaler)
    precision: Precision = "fp32"
    # recompute each decoder layer in the backward instead of keeping its activations
    gradient_checkpointing: bool = False
    # micro-batches summed into one optimizer step: the effective batch is
    # (batch_size // num_workers) x grad_accum_steps x num_workers rows
    grad_accum_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    scaling: ScalingConfigSpec = Field(default_factory=ScalingConfigSpec)

    @model_validator(mode="after")
    def _warmup(self) -> StageConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})"
            )
        return self

    def per_worker_batch(self, streams: int = 1) -> int:
        """Rows one worker draws per micro-batch (from each of ``streams`` data streams)."""
        return max(1, self.batch_size // self.scaling.num_workers // streams)

    @property
    def effective_batch(self) -> int:
        """Rows behind one optimizer step, over every worker and micro-batch."""
        return self.per_worker_batch() * self.grad_accum_steps * self.scaling.num_workers


# Each stage's own defaults; a partial section in a file or a --set keeps the rest of them.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # Sized for `make demo` (all of it, on a fresh 2-core machine) to fit in about 20 minutes; with
    # the add-domain step it took 20-22 (README, "Results"). A run
    # alone on the machine takes both cores; the domain experts train side by side, one core each.
    # The domain experts take many small steps (4 packed rows) rather than few large ones (16
    # rows): the same examples, and a lower validation loss at the same rows. 240 steps rather
    # than 320 raise the validation loss by 0.4 % (code), 2.7 % (math) and 12 % (convert), and
    # save about 100 s of the demo's 20 minutes (benchmarks/curves.py: docs/method.md, "Budgets").
    # Pretraining is 150 steps, not 200, since the demo also adds the reserved domain: the
    # experts' exact match on units and headlines was the same within noise on either base
    # (45 and 100 % of 60 at 150 steps, 52 and 90 % at 200), and it saves about 75 s.
    "pretrain": {"steps": 150, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20,
                 "checkpoint_every": 50, "scaling": {"num_workers": 1, "cpus_per_worker": 2}},
    "universal": {"steps": 60, "batch_size": 8, "lr": 1e-3, "warmup_steps": 6,
                  "scaling": {"num_workers": 1, "cpus_per_worker": 2}},
    "domain": {"steps": 240, "batch_size": 4, "lr": 3e-3, "warmup_steps": 15,
               "checkpoint_every": 120},
    "router": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3,
               "scaling": {"num_workers": 1, "cpus_per_worker": 2}},
    # the baselines' budget: as many rows as universal + 3 domain experts + router, on all
    # the data mixed (60 x 8 + 3 x 240 x 4 + 30 x 8 = 3,600 rows = 225 steps of 16)
    "lora": {"steps": 225, "lr": 1e-3, "scaling": {"num_workers": 1, "cpus_per_worker": 2}},
    "molora": {"steps": 225, "lr": 1e-3, "scaling": {"num_workers": 1, "cpus_per_worker": 2}},
}


def _stage(name: str) -> Any:
    return Field(default_factory=lambda: StageConfig(**STAGE_DEFAULTS[name]))


class StagesConfig(_Section):
    pretrain: StageConfig = _stage("pretrain")
    universal: StageConfig = _stage("universal")
    domain: StageConfig = _stage("domain")
    router: StageConfig = _stage("router")
    lora: StageConfig = _stage("lora")
    molora: StageConfig = _stage("molora")

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, given in data.items():
            if name in STAGE_DEFAULTS and isinstance(given, dict):
                merged = {**STAGE_DEFAULTS[name], **given}
                if isinstance(given.get("scaling"), dict) and "scaling" in STAGE_DEFAULTS[name]:
                    merged["scaling"] = {**STAGE_DEFAULTS[name]["scaling"], **given["scaling"]}
                out[name] = merged
        return out

    def get(self, name: str) -> StageConfig:
        if name not in STAGE_NAMES:
            raise UnknownName(f"unknown stage {name!r} (allowed: {', '.join(STAGE_NAMES)})")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------
# tune


class SearchDimension(_Section):
    """One axis of a search space, written in YAML. ``randint`` includes ``high``."""

    type: Literal["loguniform", "uniform", "choice", "grid", "randint", "qloguniform"]
    low: float | None = None
    high: float | None = None
    q: Annotated[float, Field(gt=0)] | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDimension:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"type {self.type!r} needs a non-empty `values` list")
            if self.low is not None or self.high is not None or self.q is not None:
                raise ValueError(f"type {self.type!r} takes `values`, not low/high/q")
        else:
            if self.values is not None:
                raise ValueError(f"type {self.type!r} takes low/high, not `values`")
            if self.low is None or self.high is None:
                raise ValueError(f"type {self.type!r} needs `low` and `high`")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be < high ({self.high})")
            if self.type in ("loguniform", "qloguniform") and self.low <= 0:
                raise ValueError(f"{self.type} needs low > 0 (got {self.low})")
            if self.type == "qloguniform" and self.q is None:
                raise ValueError("type 'qloguniform' needs `q` (the step values are rounded to)")
            if self.type == "randint" and not (float(self.low).is_integer()
                                               and float(self.high).is_integer()):
                raise ValueError(f"randint needs whole numbers (got low={self.low}, high={self.high})")
        return self

    def candidates(self) -> list[Any]:
        """The values to check against the field: every listed value, or both bounds."""
        return list(self.values) if self.values is not None else [self.low, self.high]


class SchedulerSpec(_Section):
    """Early stopping. ``grace_period`` and ``max_t`` count validation reports (one every
    ``tune.report_every`` steps); ``max_t`` defaults to the longest trial's report count."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_t: Annotated[int, Field(ge=1)] | None = None


class TrialResources(_Section):
    """What one trial uses: its own Ray Train run (None = the stage's ``scaling``) plus the
    trial's driver (the Tune function that fits the run; it mostly waits)."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] | None = None
    cpus_per_worker: Annotated[float, Field(gt=0)] | None = None
    gpus_per_worker: Annotated[float, Field(ge=0)] | None = None
    driver_cpus: Annotated[float, Field(ge=0)] = 0.1


class TuneConfig(_Section):
    """A Ray Tune sweep over one stage (``modula tune``); every trial is a Ray Train run."""

    stage: str = "router"
    # the experiment's name under <storage.root>/tune/ (None: <model>-<variant>-<stage>)
    name: Annotated[str, Field(pattern=SWEEP_NAME)] | None = None
    num_samples: Annotated[int, Field(ge=1)] = 4
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 2
    search_alg: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = 0
    # val_loss (the tuned domain's, or the average over every domain: the paper's checkpoint
    # rule), val_loss_<domain>, or loss (training); None = val_loss
    metric: str | None = None
    # None: min for the losses
    mode: Literal["min", "max"] | None = None
    report_every: Annotated[int, Field(ge=1)] = 10
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: TrialResources = Field(default_factory=TrialResources)
    space: dict[str, SearchDimension] = Field(
        default_factory=lambda: {"lr": SearchDimension(type="loguniform", low=1e-4, high=3e-3)}
    )

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        unknown = sorted(set(v) - set(TUNABLE))
        if unknown:
            raise ValueError(f"cannot tune {unknown} (allowed: {', '.join(TUNABLE)})")
        if not v:
            raise ValueError(f"the search space is empty (allowed keys: {', '.join(TUNABLE)})")
        return v

    @model_validator(mode="after")
    def _alg(self) -> TuneConfig:
        if self.search_alg == "grid":
            cont = sorted(k for k, d in self.space.items() if d.type not in ("grid", "choice"))
            if cont:
                raise ValueError(f"search_alg 'grid' needs discrete dimensions; space {cont} "
                                 "is continuous (allowed with grid: grid, choice)")
        if self.search_alg == "optuna":
            grid = sorted(k for k, d in self.space.items() if d.type == "grid")
            if grid:
                raise ValueError(f"search_alg 'optuna' cannot enumerate a grid (space {grid}); "
                                 "use type choice (allowed with optuna: loguniform, uniform, "
                                 "choice, randint, qloguniform)")
        return self

    @property
    def metric_name(self) -> str:
        return self.metric or "val_loss"

    @property
    def mode_name(self) -> str:
        return self.mode or "min"


# --------------------------------------------------------------------------------------------
# serve


class AutoscalingSpec(_Section):
    """Mirrors Ray Serve's autoscaling_config."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    initial_replicas: Annotated[int, Field(ge=0)] | None = None
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 2.0
    upscale_delay_s: Annotated[float, Field(ge=0)] = 10.0
    downscale_delay_s: Annotated[float, Field(ge=0)] = 60.0
    look_back_period_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie in "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class BatchingSpec(_Section):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    batch_wait_timeout_s: Annotated[float, Field(ge=0, le=10)] = 0.01


class ReplicaResources(_Section):
    """What each expert replica reserves."""

    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    # custom logical resources, e.g. {expert_host: 1}: replicas go only to nodes that have them
    custom_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("custom_resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(v)


class ServeConfig(_Section):
    app_name: str = "modula"
    model_name: Annotated[str, Field(pattern=SERVED_NAME)] = "modula"
    route_prefix: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._/-]*$")] = "/"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_prompt_tokens: Annotated[int, Field(ge=1)] = 384
    max_tokens_limit: Annotated[int, Field(ge=1)] = 128
    experts_per_deployment: Annotated[int, Field(ge=1)] | None = None
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    router_autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    ingress_autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    api_keys: list[SecretStr] = Field(default_factory=list)
    registry_poll_s: Annotated[float, Field(gt=0)] = 5.0
    # the registry model whose latest version is served; None = `model_name`
    registry_model: Annotated[str, Field(pattern=MODEL_NAME)] | None = None
    # serve the bare base model, no experts and no registry (a baseline; the serving benchmark)
    base_only: bool = False
    # a request body larger than this is refused with 413
    max_request_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    # which tokens the reported mean gate weights cover: the prompt (free: captured in the
    # prefill forward), every token (prompt + generated: a capture in every decode step), none
    gate_report: Literal["prompt", "all", "off"] = "prompt"
    # what one request may ask for (a request over a limit gets a 400 naming the field):
    # `logprobs` (completions) / `top_logprobs` (chat) alternatives per token
    max_logprobs: Annotated[int, Field(ge=0, le=100)] = 20
    # `n`: choices per prompt
    max_n: Annotated[int, Field(ge=1)] = 16
    # prompts in one completions request (a list of strings or of token-id lists)
    max_batch_prompts: Annotated[int, Field(ge=1)] = 64
    # `stop`: stop sequences per request (lm-evaluation-harness's code tasks send 8 or more)
    max_stop_sequences: Annotated[int, Field(ge=1)] = 32
    # a top-level request field the service does not know: `ignore` it (vLLM's choice; it is
    # logged and listed in the response's modula.ignored_fields) or `refuse` it with a 400
    # (the official API's choice)
    unknown_fields: Literal["ignore", "refuse"] = "ignore"
    # torch intra-op threads of each model replica (experts, router), set with
    # torch.set_num_threads when it starts; None = its resources.num_cpus (at least 1)
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # torch inter-op threads of each model replica; None = torch's default
    interop_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # the weights' dtype in an expert replica: auto = bfloat16 on a GPU replica
    # (resources.num_gpus > 0), model.dtype on a CPU one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # torch.compile in each expert replica: `decode` compiles the decode step (one token per
    # row; the prefill stays eager), falling back to eager with a warning if compiling fails;
    # `none` (the default: compiled measured 1.03-1.18x slower than eager on CPU) keeps every
    # forward eager (docs/serving.md, "Compiling the decode step")
    compile: Literal["none", "decode"] = "none"

    @property
    def on_gpu(self) -> bool:
        """Expert replicas hold a GPU (and run the model on it)."""
        return self.resources.num_gpus > 0

    @field_validator("api_keys", mode="before")
    @classmethod
    def _drop_empty_keys(cls, v: Any) -> Any:
        # an unset "${MODULA_API_KEY:-}" must not become the empty (always-matching) key
        if isinstance(v, list):
            return [k for k in v if k not in ("", None)]
        return v


# --------------------------------------------------------------------------------------------
# eval


class EvalConfig(_Section):
    max_examples: Annotated[int, Field(ge=1)] = 100
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    batch_size: Annotated[int, Field(ge=1)] = 16
    # local folder of `modula report` / `modula tune` output: inside the default storage root
    output_dir: str = "runs/reports"
    seeds: list[int] = Field(default_factory=lambda: [0])


# --------------------------------------------------------------------------------------------
# the whole file


def default_domains() -> list[DomainConfig]:
    return [
        DomainConfig(name="general", metric="perplexity"),
        DomainConfig(name="code", metric="perplexity"),
        DomainConfig(name="math", metric="exact_match"),
        DomainConfig(name="units", metric="exact_match"),
        DomainConfig(name="headlines", metric="accuracy", reserved=True),
    ]


class ModulaConfig(_Section):
    """The one config file. ``general`` is the universal stage's data, not a domain expert."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    modula: ModulaLayerConfig = Field(default_factory=ModulaLayerConfig)
    domains: list[DomainConfig] = Field(default_factory=default_domains)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> ModulaConfig:
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domains: named twice: {dup}")
        known = set(names)
        for stage in STAGE_NAMES:
            sc = self.stages.get(stage)
            for d in sc.domains or []:
                if d not in known:
                    raise ValueError(
                        f"stages.{stage}.domains: unknown domain {d!r} "
                        f"(allowed: {', '.join(names) or 'none defined'})"
                    )
        if not self.expert_domains():
            raise ValueError(
                "domains: no domain expert to train (every domain is 'general' or reserved)"
            )
        if self.model.is_builtin:
            limit = self.model.tiny.max_position_embeddings
            for where, length in self.max_lengths().items():
                if length > limit:
                    raise ValueError(
                        f"{where}: {length} tokens is beyond the built-in model's context "
                        f"(model.tiny.max_position_embeddings = {limit}); raise that too")
        top_k = self.modula.router.top_k
        n_experts = len(self.expert_domains(include_reserved=True)) + (
            1 if self.modula.variant == "flan" else 0
        )
        if top_k is not None and top_k > n_experts:
            raise ValueError(
                f"modula.router.top_k: {top_k} is more than the number of experts ({n_experts})"
            )
        check_tune(self)
        return self

    def max_lengths(self) -> dict[str, int]:
        """The sequence length of every place that sets one: ``model.max_length`` and each
        stage's own ``max_length`` (checked against the base model's context)."""
        out = {"model.max_length": self.model.max_length}
        for stage in STAGE_NAMES:
            if self.stages.get(stage).max_length is not None:
                out[f"stages.{stage}.max_length"] = self.stages.get(stage).max_length
        return out

    def expert_domains(self, include_reserved: bool = False) -> list[str]:
        """Domains that get a domain expert, in router order."""
        return [
            d.name for d in self.domains
            if d.name != "general" and (include_reserved or not d.reserved)
        ]

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise UnknownName(
            f"unknown domain {name!r} (allowed: {', '.join(d.name for d in self.domains)})"
        )

    def to_data(self, secrets: Literal["mask", "drop", "reveal"] = "mask",
                reveal: Collection[str] = ()) -> dict[str, Any]:
        """The resolved config as plain (JSON-able) data: the one way a config is printed or
        written. ``secrets``: ``mask`` shows each secret as '**********', ``drop`` leaves it
        out, ``reveal`` writes its value. ``reveal`` names sections (``storage``, ``serve``)
        whose secrets are written in clear where they are set, whatever ``secrets`` says."""
        data = self.model_dump(mode="json")
        for section, name in SECRET_FIELDS:
            value = getattr(getattr(self, section), name)
            policy = "reveal" if section in reveal and value not in (None, []) else secrets
            if policy == "drop":
                data[section].pop(name, None)
            elif policy == "reveal":
                data[section][name] = _clear(value)
        return data


def _clear(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return [_clear(v) for v in value]
    return value

