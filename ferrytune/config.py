"""Typed training configs, validated from YAML plus ``section.key=value`` overrides.

One pydantic model per section; every field has a one-line doc and a default
(except ``model.path``, ``data.train``, ``train.steps`` and ``train.batch_size``).
``docs/config.md`` is the table of every key. Every problem becomes ONE line::

    config.yaml: train.lr: must be > 0 (got -1)
    config.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)
    config file not found: missing.yaml

Usage::

    cfg = load_config("examples/zo_smollm2_rt_polarity.yaml", ["train.lr=2e-6"])
    cfg.train.lr, cfg.to_dict()
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ferrytune.errors import ConfigError

__all__ = [
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "OffloadConfig",
    "ParallelConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "ZOConfig",
    "config_from_dict",
    "load_config",
]


class _Section(BaseModel):
    # strict: no bool->int or "3"->int coercion (an int is still accepted for a float);
    # YAML's `1e-6` (a string in YAML 1.1) is fixed by _YamlLoader instead.
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True
    )


class ModelConfig(_Section):
    path: str = Field(description="local Hugging Face model folder (config.json, safetensors, tokenizer)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the forward runs in")
    store_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="dtype of the master weights; auto = the checkpoint's dtype")
    trust_remote_code: bool = Field(False, description="allow custom modelling code shipped in the model folder")


class DataConfig(_Section):
    train: str = Field(description="training JSONL file")
    eval: str | None = Field(None, description="evaluation JSONL file; null = no evaluation")
    format: Literal["auto", "classification", "completion"] = Field("auto", description="row format; auto: text/label rows = classification, prompt/completion = completion")
    template: str = Field("{text} It was", description="classification prompt; '{text}' is replaced by the row's text")
    verbalizer: list[str] = Field(default_factory=lambda: [" terrible", " great"], description="label words, indexed by label; the first token of each is scored")
    max_length: int = Field(256, gt=0, description="max tokens per example (prompt text / completion prompt truncated from the left)")
    eval_samples: int | None = Field(None, gt=0, description="evaluate on the first N eval rows; null = all")
    shuffle: bool = Field(True, description="reshuffle the training rows every epoch")
    packing: bool = Field(False, description="method lora: a micro-batch's sequences end to end in one row, no padding (position ids restart per sequence, no attention across them)")

    @field_validator("template")
    @classmethod
    def _template_has_text(cls, v: str) -> str:
        try:
            v.format(text="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"must be a format string whose only field is {{text}} ({type(e).__name__}: {e})") from None
        if "{text}" not in v:
            raise ValueError(f"must contain '{{text}}' (got {v!r})")
        return v

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer_words(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"needs at least 2 label words (got {v!r})")
        if any(not w.strip() for w in v):
            raise ValueError(f"label words must not be empty (got {v!r})")
        if len(set(v)) != len(v):
            raise ValueError(f"label words must differ (got {v!r})")
        return v


class TrainLoopConfig(_Section):
    steps: int = Field(gt=0, description="optimizer steps to run")
    batch_size: int = Field(gt=0, description="global batch size in examples (all ranks together)")
    micro_batch_size: int | None = Field(None, gt=0, description="examples per forward; must divide batch_size; null = batch_size / parallel.data (one micro-batch per rank)")
    seed: int = Field(0, ge=0, description="seed for data order, perturbations and LoRA init")
    lr: float = Field(1e-6, gt=0, description="learning rate; the default suits zo, LoRA wants ~1e-4")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warmup (linear/cosine decay to 0 at the last step)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    optimizer: Literal["adamw", "adam_mini", "sgd_sai"] = Field(
        "adamw", description="lora's optimizer: adamw (2 moments per parameter); adam_mini (Adam-mini: 1 moment per "
                             "parameter, 1 second moment per row); sgd_sai (SGD-SaI: momentum, a per-tensor lr scale "
                             "fixed from the first gradient's SNR). Method lora only")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (lora only); null = off")
    accumulation: Literal["micro_major", "layer_major", "auto"] = Field(
        "micro_major", description="method lora: order of a step's micro-batches. micro_major: each micro-batch runs "
                                   "its whole forward and backward in turn (the base is read once per micro-batch); "
                                   "layer_major: every micro-batch passes a layer while it is on the device (the "
                                   "base is read once per step), if the activation budget holds the hidden states "
                                   "between layers of all micro-batches, else micro_major (logged); auto: "
                                   "layer_major when a rank runs more than one micro-batch per step")
    eval_every_steps: int | None = Field(None, gt=0, description="evaluate every N steps; null = only at the end")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="checkpoint every N steps; null = only the final one")
    keep_checkpoints: int = Field(2, gt=0, description="how many recent checkpoints to keep on disk")
    log_every_steps: int = Field(1, gt=0, description="write a metrics line every N steps")

    @property
    def effective_micro_batch_size(self) -> int:
        """``micro_batch_size`` with null resolved to ``batch_size``."""
        return self.batch_size if self.micro_batch_size is None else self.micro_batch_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step, all ranks together."""
        return self.batch_size // self.effective_micro_batch_size


class ZOConfig(_Section):
    eps: float = Field(1e-3, gt=0, description="perturbation scale epsilon (MeZO)")
    num_perturbations: int = Field(1, gt=0, description="q: perturbation directions averaged per step")
    distribution: Literal["gaussian", "rademacher"] = Field("gaussian", description="distribution of z")
    update: Literal["sgd", "sign"] = Field("sgd", description="sgd: p -= lr*g*z; sign: p -= lr*sign(g)*z")
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum on the projected gradients g (0 = off)")
    trainable: Literal["all", "lora"] = Field("all", description="parameters zo perturbs: the whole model or only LoRA adapters")
    mask_fraction: float = Field(1.0, gt=0, le=1, description="Sparse MeZO: perturb and update only the parameters of small magnitude, |w| <= the mask_fraction quantile of |w| per tensor in the run's initial weights (mask recomputed on arrival). 1 = every parameter")
    block_fraction: float = Field(1.0, gt=0, le=1, description="LeZO: fraction of blocks (the outer block and the layers) perturbed and updated per step, drawn from (train.seed, step); the others run unperturbed and are not written back. 1 = MeZO")
    estimator: Literal["mezo", "fzoo", "hizoo"] = Field("mezo", description="mezo: two-sided g_k = (f(θ+εz_k) - f(θ-εz_k)) / 2ε; fzoo (FZOO): one unperturbed forward and num_perturbations one-sided ones with Rademacher z, step normalised by the std of the perturbed losses; hizoo (HiZOO): MeZO with z scaled by H^-1/2, H a diagonal Hessian EMA from f(θ+εu)+f(θ-εu)-2f(θ), one fp32 value per trained parameter, streamed like momentum (zo.trainable: all or lora)")
    hessian_smooth: float = Field(1e-6, gt=0, le=1, description="HiZOO: EMA weight alpha of the diagonal Hessian estimate (zo.estimator: hizoo only)")
    routed_experts: bool = Field(False, description="MoE layers: perturb and update only the experts the routers pick in the step (by any stream); the others keep their bits (no z, no update, no weight decay). z of expert e is its own stream. Composes with block_fraction; mezo, zo.trainable: all, one process")


class LoRAConfig(_Section):
    rank: int = Field(8, gt=0, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: delta = (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="module name suffixes to adapt, or 'all-linear'")
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="module-name regex -> rank override")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="module-name regex -> alpha override")
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    init_from: str | None = Field(None, description="PEFT adapter folder to start from; null = fresh init")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        ok_list = isinstance(v, list) and v and all(isinstance(s, str) and s for s in v)
        if v != "all-linear" and not ok_list:
            raise ValueError(f"must be a non-empty list of module names or 'all-linear' (got {v!r})")
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict[str, Any]) -> dict[str, Any]:
        for pattern, value in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r}: {e}") from None
            if value <= 0:
                raise ValueError(f"entry {pattern!r}: must be > 0 (got {value})")
        return v


class OffloadConfig(_Section):
    tier: Literal["resident", "host", "nvme"] = Field("resident", description="where blocks that do not fit the device budget live")
    nvme_dir: str | None = Field(None, description="directory for the NVMe block store; required when tier is nvme")
    host_budget_gib: float = Field(4.0, gt=0, description="host memory for block buffers, GiB")
    device_budget_gib: float | None = Field(None, gt=0, description="device memory for blocks, GiB; blocks that fit beyond the working set stay resident; null: no limit (resident) / stream every layer (host, nvme)")
    prefetch_depth: int = Field(2, ge=1, description="blocks fetched ahead of the one computing (at least 1)")
    activation_budget_gib: float | None = Field(None, ge=0, description="device memory for the activations LoRA's backward keeps, GiB; layers whose estimated activations do not fit recompute them in backward; null: what device_budget_gib leaves after blocks and ring (no limit without it); 0: recompute every layer")
    io_threads: int = Field(8, gt=0, description="threads issuing NVMe reads and writes")
    io_backend: Literal["threads", "deepspeed_aio", "auto"] = Field("threads", description="NVMe IO engine: threads (preadv/pwritev pool), deepspeed_aio (DeepSpeed's libaio handle; io_threads = its parallelism), auto (deepspeed_aio when its op loads, else threads)")
    verify_checksums: bool = Field(True, description="verify each block record's checksum (xxh3_64, or crc32 without xxhash) on read")
    routed_experts: bool = Field(False, description="MoE layers (host, nvme): LoRA and evaluation read only the experts the router picks for the micro-batch, after the router has run; range reads are not checksum-verified; ZO still moves every expert")


class ParallelConfig(_Section):
    perturbation: Literal[1, 2] = Field(1, description="ranks splitting the +eps / -eps passes (2 = one each)")
    data: int = Field(1, ge=1, description="data-parallel ranks, each taking a share of the micro-batches")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend; auto = nccl on cuda, else gloo")
    sliced_loading: bool = Field(False, description="each rank reads a slice of every block and all-gathers it")
    check_every_steps: int = Field(50, gt=0, description="compare a weight checksum across ranks every N steps")


class TrainConfig(_Section):
    method: Literal["zo", "lora"] = Field("zo", description="zo = zeroth-order (MeZO) fine-tuning; lora = backprop LoRA")
    model: ModelConfig = Field(description="the model to fine-tune")
    data: DataConfig = Field(description="datasets and prompt format")
    train: TrainLoopConfig = Field(description="step loop, schedule, checkpoints")
    zo: ZOConfig = Field(default_factory=ZOConfig, description="zeroth-order optimizer")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapters (method lora or zo.trainable lora)")
    offload: OffloadConfig = Field(default_factory=OffloadConfig, description="weight placement and streaming")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="multi-process layout")
    output_dir: str = Field("runs/ferrytune", description="checkpoints, metrics and the resolved config go here")
    device: Literal["cpu", "cuda"] = Field("cpu", description="compute device")
    resume: str = Field("auto", description="auto = latest checkpoint in output_dir if any; never; or a checkpoint path")
    overwrite: bool = Field(False, description="with resume: never, replace a run already in output_dir "
                                               "(its metrics, log, checkpoints and final/); otherwise that is refused")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe); ``config_from_dict(cfg.to_dict()) == cfg``."""
        return self.model_dump()

    def to_yaml(self) -> str:
        """The resolved config as YAML, e.g. to save beside a checkpoint."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = (), *, check_device: bool = True
) -> TrainConfig:
    """Read a YAML config, apply ``section.key=value`` overrides, validate.

    Override values are parsed as YAML (``train.lr=2e-6``, ``lora.target_modules=[q_proj,k_proj]``,
    ``data.eval=null``). ``path=None`` builds the config from overrides alone.
    ``check_device=False`` skips the CUDA-availability check (validating a config
    on a machine other than the one that will run it). Raises ConfigError (one line).
    """
    source = "<overrides>" if path is None else os.fspath(path)
    raw: Any = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {source}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = _parse_yaml(text, source)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections (got {type(raw).__name__})")
    from_overrides = set()
    for item in overrides:
        key = _apply_override(raw, item, source)
        from_overrides.add(key)
    return config_from_dict(raw, source=source, check_device=check_device, _override_keys=from_overrides)


def config_from_dict(
    d: dict[str, Any], *, source: str = "<dict>", check_device: bool = True, _override_keys: set[str] = frozenset()
) -> TrainConfig:
    """Validate a nested dict (e.g. a parsed YAML or a JSON job spec). Raises ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (got {type(d).__name__})")
    try:
        cfg = TrainConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_first_error_line(e, source, _override_keys)) from None
    problems = _cross_field_problems(cfg, check_device=check_device)
    if problems:
        key, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{_where(source, key, _override_keys)}: {key}: {message}{more}")
    return _default_micro_batch(cfg)


def _default_micro_batch(cfg: TrainConfig) -> TrainConfig:
    """Unset ``train.micro_batch_size`` under ``parallel.data = N > 1``: ``batch_size / N``, one micro-batch
    per rank (a single process keeps one forward of the whole batch)."""
    t, ranks = cfg.train, cfg.parallel.data
    if t.micro_batch_size is not None or ranks == 1:
        return cfg
    return cfg.model_copy(update={"train": t.model_copy(update={"micro_batch_size": t.batch_size // ranks})})


def resolve_world_size(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The config for a launch of ``world_size`` processes (torchrun's ``WORLD_SIZE``).

    A config that sets neither ``parallel.data`` nor ``parallel.perturbation`` runs data parallel
    over all of them (``parallel.data = world_size``, and an unset ``micro_batch_size`` becomes
    ``batch_size / world_size``), as torchrun users expect. Explicit settings are kept as they are:
    ``init_mesh`` refuses them, naming the mismatch, when they contradict the world size.
    Raises ConfigError when the batch cannot be shared by the processes."""
    par = cfg.parallel
    if world_size <= 1 or {"data", "perturbation"} & par.model_fields_set:
        return cfg
    t = cfg.train
    if t.micro_batch_size is None:
        shared, what = t.batch_size % world_size == 0, f"{t.batch_size} examples"
    else:
        shared, what = t.num_micro_batches % world_size == 0, f"{t.num_micro_batches} micro-batches"
    if not shared:
        raise ConfigError(f"train.batch_size: {what} per step cannot be shared evenly by the {world_size} processes "
                          "torchrun started (data parallel when parallel.* is not set); change train.batch_size "
                          "(or micro_batch_size), or set parallel.data / parallel.perturbation")
    cfg = cfg.model_copy(update={"parallel": par.model_copy(update={"data": world_size})})
    return _default_micro_batch(cfg)


def _cross_field_problems(cfg: TrainConfig, *, check_device: bool) -> list[tuple[str, str]]:
    """(dotted key, message) for every rule that spans more than one field, in key order."""
    problems = []
    t = cfg.train
    micro, ranks = t.effective_micro_batch_size, cfg.parallel.data
    if t.micro_batch_size is None and ranks > 1:  # defaults to batch_size / parallel.data (_default_micro_batch)
        if t.batch_size % ranks != 0:
            problems.append(("train.batch_size", f"{t.batch_size} examples cannot be shared evenly by "
                                                 f"parallel.data={ranks} ranks; make it a multiple of parallel.data"))
    elif t.batch_size % micro != 0:
        problems.append(("train.micro_batch_size", f"must divide train.batch_size (got {micro}, batch_size {t.batch_size})"))
    elif t.num_micro_batches % ranks != 0:
        problems.append((
            "train.micro_batch_size",
            f"gives {t.num_micro_batches} micro-batches per step, which parallel.data={ranks} ranks cannot share"
            " evenly; pick micro_batch_size so batch_size / micro_batch_size is a multiple of parallel.data",
        ))
    if t.warmup_steps > t.steps:
        problems.append(("train.warmup_steps", f"must be <= train.steps (got {t.warmup_steps}, steps {t.steps})"))
    if cfg.method == "zo" and t.optimizer != "adamw":
        problems.append(("train.optimizer", f"{t.optimizer!r} applies to method: lora only (zo updates with "
                                            "zo.update and zo.momentum, also with zo.trainable: lora); remove it"))
    if cfg.method != "lora" and t.accumulation != "micro_major":
        problems.append(("train.accumulation", f"{t.accumulation!r} applies to method: lora only (zo has no "
                                               "backward to reorder); remove it"))
    for key in ("block_fraction", "mask_fraction"):
        if cfg.method == "zo" and cfg.zo.trainable == "lora" and getattr(cfg.zo, key) < 1:
            problems.append((f"zo.{key}", "applies to zo.trainable: all (the streamed blocks); set it to 1 with "
                                          "zo.trainable: lora"))
    if cfg.method == "zo" and cfg.zo.estimator == "fzoo":
        problems += _fzoo_problems(cfg)
    if cfg.method == "zo" and cfg.zo.routed_experts:
        problems += _routed_zo_problems(cfg)
    if cfg.method == "zo" and cfg.zo.estimator == "hizoo":
        problems += _hizoo_problems(cfg)
    # by value, not by fields set: a config that went through to_dict() (Ray, the service) sets every field
    if (cfg.method == "zo" and cfg.zo.estimator != "hizoo"
            and cfg.zo.hessian_smooth != ZOConfig.model_fields["hessian_smooth"].default):
        problems.append(("zo.hessian_smooth", "applies to zo.estimator: hizoo only; remove it"))
    if cfg.data.packing and cfg.method != "lora":
        problems.append(("data.packing", f"packs sequences for method: lora only (got method: {cfg.method}); "
                                         "set it to false"))
    if cfg.offload.tier == "nvme" and not cfg.offload.nvme_dir:
        problems.append(("offload.nvme_dir", "required when offload.tier is 'nvme' (set it to a directory on a fast local disk)"))
    if cfg.parallel.backend == "nccl" and cfg.device != "cuda":
        problems.append(("parallel.backend", "'nccl' needs device: cuda; use 'gloo' or 'auto' on cpu"))
    if check_device and cfg.device == "cuda":
        import torch  # only here: a config without cuda never pays for the import

        if not torch.cuda.is_available():
            problems.append(("device", "'cuda' requested but CUDA is not available on this machine; set device: cpu"))
    return problems


def _routed_zo_problems(cfg: TrainConfig) -> list[tuple[str, str]]:
    """What ``zo.routed_experts`` does not combine with (yet), one (key, message) each."""
    z, out = cfg.zo, []
    if z.estimator != "mezo":
        out.append(("zo.routed_experts", f"runs with zo.estimator: mezo only (got {z.estimator!r}); set it to false"))
    if z.trainable != "all":
        out.append(("zo.routed_experts", "perturbs the model's experts: needs zo.trainable: all; set it to false"))
    if z.mask_fraction < 1:
        out.append(("zo.mask_fraction", "is not supported with zo.routed_experts; set it to 1"))
    if cfg.parallel.data * cfg.parallel.perturbation != 1 or cfg.parallel.sliced_loading:
        out.append(("zo.routed_experts", "runs in one process (ranks would route differently and would have to "
                                         "agree on the experts to perturb); set it to false or run one process"))
    return out


def _fzoo_problems(cfg: TrainConfig) -> list[tuple[str, str]]:
    """What ``zo.estimator: fzoo`` does not combine with, one (key, message) each."""
    z, out = cfg.zo, []
    if z.distribution != "rademacher":
        out.append(("zo.distribution", f"zo.estimator: fzoo perturbs with Rademacher (±1) z; set it to rademacher "
                                       f"(got {z.distribution!r})"))
    if z.num_perturbations < 2:
        out.append(("zo.num_perturbations", "zo.estimator: fzoo normalises the step by the std of the "
                                            "num_perturbations perturbed losses: needs at least 2"))
    if z.trainable != "all":
        out.append(("zo.trainable", "zo.estimator: fzoo is implemented for zo.trainable: all (streamed blocks) only"))
    for key in ("block_fraction", "mask_fraction"):
        if getattr(z, key) < 1:
            out.append((f"zo.{key}", "is not supported with zo.estimator: fzoo; set it to 1"))
    if cfg.parallel.perturbation != 1:
        out.append(("parallel.perturbation", "zo.estimator: fzoo has no ± pair to split across ranks; set it to 1 "
                                             "(parallel.data works)"))
    return out


def _hizoo_problems(cfg: TrainConfig) -> list[tuple[str, str]]:
    """What ``zo.estimator: hizoo`` does not combine with, one (key, message) each."""
    out, z = [], cfg.zo
    if z.trainable == "lora" and (cfg.parallel.perturbation != 1 or cfg.parallel.data != 1):
        out.append(("parallel.data" if cfg.parallel.data != 1 else "parallel.perturbation",
                    "zo.estimator: hizoo with zo.trainable: lora runs in one process only; set parallel.data and "
                    "parallel.perturbation to 1 (zo.trainable: all runs data-parallel)"))
    if z.trainable == "all":
        if cfg.parallel.perturbation != 1:
            out.append(("parallel.perturbation", "zo.estimator: hizoo needs f(θ) beside the ± pair on one rank; "
                                                 "set it to 1 (parallel.data works)"))
        for key, off in (("mask_fraction", 1.0), ("block_fraction", 1.0), ("routed_experts", False)):
            if getattr(z, key) != off:
                out.append((f"zo.{key}", f"is not supported with zo.estimator: hizoo; set it to {str(off).lower()}"))
        if cfg.parallel.sliced_loading:
            out.append(("parallel.sliced_loading", "is not supported with zo.estimator: hizoo (its Hessian is "
                                                   "streamed whole on every rank); set it to false"))
    return out


# --- YAML and overrides -----------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.1 wants ``1.0e-6``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def _apply_override(raw: dict[str, Any], item: str, source: str) -> str:
    """Set ``a.b.c=value`` in ``raw`` in place; return the dotted key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.lr=1e-5)")
    try:
        value = yaml.load(text, Loader=_YamlLoader) if text.strip() else ""  # noqa: S506
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {item!r}: '{prefix}' is not a section in {source}")
        node = child
    node[parts[-1]] = value
    return key


# --- error formatting ---------------------------------------------------------------------


def _all_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included, in declaration order."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, prefix + name + "."))
    return keys


def _split_loc(loc: tuple) -> tuple[str, str]:
    """Split a pydantic loc into (dotted field key, remainder like "['q_proj']")."""
    model: type[BaseModel] | None = TrainConfig
    fields: list[str] = []
    rest: list[str] = []
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            fields.append(part)
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif model is None and isinstance(part, (str, int)) and not rest and _is_type_tag(part):
            continue  # union member tag such as 'list[str]'
        else:
            model = None
            rest.append(f"[{part!r}]" if isinstance(part, str) else f"[{part}]")
    return ".".join(fields), "".join(rest)


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.endswith("]") or part in {"int", "float", "str", "bool", "none"})


def _suggest(key: str) -> str:
    known = [k for k in _all_keys() if k.count(".") == key.count(".")]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _where(source: str, key: str, override_keys: set[str]) -> str:
    hit = [k for k in override_keys if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
    return f"{source} (override {hit[0]})" if hit else source


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of keys (a section)",
    "model_attributes_type": "must be a mapping of keys (a section)",
}


def _num(v: Any) -> Any:
    """Bounds read as written in the schema: 0.0 -> 0, 1.0 -> 1."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _first_error_line(e: ValidationError, source: str, override_keys: set[str]) -> str:
    errors = e.errors(include_url=False)
    order = {k: i for i, k in enumerate(_all_keys())}
    errors.sort(key=lambda er: order.get(_split_loc(er["loc"])[0], len(order)))
    er = errors[0]
    key, rest = _split_loc(er["loc"])
    more = len({_split_loc(x["loc"]) for x in errors}) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    if er["type"] == "extra_forbidden":
        full = ".".join(str(p) for p in er["loc"])
        return f"{_where(source, full, override_keys)}: unknown key '{full}'{_suggest(full)}{tail}"
    where = _where(source, key, override_keys)
    if er["type"] == "missing":
        return f"{where}: {key}: required key is missing{tail}"
    if er["type"] == "value_error":
        msg = str(er["ctx"]["error"]) if "ctx" in er else er["msg"]
    else:
        template = _MESSAGES.get(er["type"])
        ctx = {k: _num(v) for k, v in er.get("ctx", {}).items()}
        msg = template.format(**ctx) if template else er["msg"]
        msg += f" (got {er['input']!r})"
    return f"{where}: {key}{rest}: {msg}{tail}"
