"""The root of the config tree, ``PipelineConfig``: every section, cross-section checks, hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from kd_lib import __version__
from kd_lib.config.base import _Strict, flatten
from kd_lib.config.cluster import ClusterConfig
from kd_lib.config.compress import QuantizeConfig
from kd_lib.config.data import AugmentConfig, DataConfig, source_kind
from kd_lib.config.evaluate import EvaluateConfig, GateConfig
from kd_lib.config.sweep import CANDIDATE_PATTERN, TEMPERATURE_LOSSES, SweepConfig
from kd_lib.config.tracking import RegistryConfig, TrackingConfig
from kd_lib.config.train import FEATURE_LOSSES, TRANSFORMER_LOSSES, DistillConfig, StudentConfig, TeacherConfig


class PipelineConfig(_Strict):
    name: str = Field("kdflow-distillation", min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    image: str = Field(
        f"kdflow:{__version__}",
        pattern=r"^[^\s]+$",
        description="Container image every step runs in on a cluster, e.g. registry.example.com/kdflow:0.1.0.",
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sweep: SweepConfig | None = Field(
        None, description="Candidate students and schemes run side by side, the best registered; none when omitted."
    )
    candidate: str | None = Field(
        None,
        pattern=CANDIDATE_PATTERN,
        description="Set by the sweep on each candidate's own config (its name, e.g. c2-mlp-d1w32-static_int8-T4): "
        "names and tags that candidate's MLflow runs. Not part of config_hash; leave it unset.",
    )

    @model_validator(mode="after")
    def _sweep_fits_the_config(self) -> PipelineConfig:
        if self.sweep is None:
            return self
        if self.candidate is not None:
            raise ValueError("candidate is set by the sweep on each candidate's config; remove candidate or sweep")
        if self.sweep.temperatures and not any(t.name in TEMPERATURE_LOSSES for t in self.distill.losses):
            raise ValueError(
                f"sweep.temperatures sets the temperature of {'/'.join(TEMPERATURE_LOSSES)} terms, and distill.losses "
                "has none; add a kd term to distill.losses or remove sweep.temperatures"
            )
        return self

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> PipelineConfig:
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must stay below 0.8 to leave training data")
        return self

    @model_validator(mode="after")
    def _gpu_steps_use_the_gpu(self) -> PipelineConfig:
        gpu = self.cluster.gpu
        if gpu is None:
            return self
        devices = {
            "train_teacher": ("teacher.train.device", self.teacher.train.device),
            "distill": ("distill.train.device", self.distill.train.device),
        }
        for step in gpu.steps:
            field, device = devices.get(step, ("", ""))
            if device == "cpu":
                raise ValueError(f"cluster.gpu gives {step} a GPU but {field} is 'cpu': set it to 'cuda' or 'auto'")
        return self

    @model_validator(mode="after")
    def _pytorchjob_gpu_is_a_resource(self) -> PipelineConfig:
        pj, gpu = self.cluster.pytorchjob, self.cluster.gpu
        if pj is not None and gpu is not None and set(pj.steps) & set(gpu.steps) and "/" not in gpu.accelerator:
            raise ValueError(
                f"cluster.gpu.accelerator {gpu.accelerator!r} is a KFP accelerator type, but the pods of "
                "cluster.pytorchjob request a Kubernetes resource: use its name, e.g. nvidia.com/gpu"
            )
        return self

    @model_validator(mode="after")
    def _huggingface_teacher_reads_text(self) -> PipelineConfig:
        if self.teacher.source != "huggingface":
            return self
        if self.data.text_column is None:
            raise ValueError(
                "teacher.source 'huggingface' classifies text: set data.text_column (and a text source), "
                "or use another teacher.source"
            )
        if self.data.tokenizer == "train":
            raise ValueError(
                "data.tokenizer 'train' gives the data another vocabulary than the huggingface teacher's: "
                "use 'auto' (the teacher's tokenizer.json) or the path of that tokenizer.json"
            )
        return self

    @model_validator(mode="after")
    def _onnx_teacher_gives_logits_only(self) -> PipelineConfig:
        # An ONNX graph is run whole by ONNX Runtime: its intermediate feature maps are not
        # reachable, so feature losses have nothing to read.
        features = sorted({t.name for t in self.distill.losses if t.name in FEATURE_LOSSES and t.weight > 0})
        if self.teacher.source == "onnx" and features:
            raise ValueError(
                f"teacher.source 'onnx' gives logits only, but distill.losses uses the feature loss(es) "
                f"{', '.join(features)}, which read the teacher's intermediate layers: use logit losses "
                "(kd, dkd, ce), or a teacher kdflow can run in torch (source train, mlflow or checkpoint)"
            )
        return self

    @model_validator(mode="after")
    def _mixup_is_distillation_without_labels(self) -> PipelineConfig:
        teacher_augment, where = self.augment_of("teacher")
        if teacher_augment.mixup_alpha > 0:
            raise ValueError(
                f"{where}.mixup_alpha applies to distillation (the student matches the teacher on mixed samples), "
                "not to the teacher's own training: set it in distill.train.augment instead"
            )
        augment, where = self.augment_of("distill")
        labeled = [t.name for t in self.distill.losses if t.name in ("ce", "dkd") and t.weight > 0]
        if augment.mixup_alpha > 0 and labeled:
            raise ValueError(
                f"{where}.mixup_alpha: a mixed sample has no single label, but distill.losses has {labeled}; "
                "learn from the teacher alone (losses: [{name: kd, params: {temperature: 1}}]) or turn mixup off"
            )
        return self

    @model_validator(mode="after")
    def _transfer_set_fits_the_data(self) -> PipelineConfig:
        transfer = self.distill.transfer_source
        if transfer is None:
            return self
        kind, transfer_kind = (source_kind(s).replace("unknown", "folder") for s in (self.data.source, transfer))
        if self.data.text_column is not None:
            if transfer_kind not in ("csv", "parquet", "jsonl"):
                raise ValueError(
                    f"distill.transfer_source {transfer!r}: text data (data.text_column) needs a .csv, .parquet or "
                    ".jsonl file of texts in that column"
                )
        elif kind == "digits":
            raise ValueError(
                "distill.transfer_source needs data.source to be a file or folder whose format it shares, not "
                "'digits': export the digits to an .npz (x, y) and point data.source at it, or remove transfer_source"
            )
        elif transfer_kind != kind:
            raise ValueError(
                f"distill.transfer_source {transfer!r} must have the format of data.source {self.data.source!r} "
                f"({source_kind(transfer)} vs {kind})"
            )
        return self

    @model_validator(mode="after")
    def _transformer_parts_need_transformers(self) -> PipelineConfig:
        # Caught here, before a teacher trains for nothing: the transformer losses and the
        # DistilBERT init read BERT-family encoder layers (kd_lib.models.transformer_layers).
        # Archs named here are known not to be transformers; user archs are checked when bound.
        others = ("mlp", "cnn", "resnet", "bilstm", "textcnn")
        users = sorted({t.name for t in self.distill.losses if t.name in TRANSFORMER_LOSSES and t.weight > 0})
        if self.student.init_from_teacher:
            users.append("student.init_from_teacher")
        if not users:
            return self
        wrong = []
        if self.student.model.arch in others:
            wrong.append(f"student.model.arch is {self.student.model.arch!r}")
        if self.teacher.source in ("train", "checkpoint") and self.teacher.model.arch in others:
            wrong.append(f"teacher.model.arch is {self.teacher.model.arch!r}")
        if self.teacher.source == "onnx" and self.student.init_from_teacher:
            wrong.append("teacher.source 'onnx' gives no weights to copy")
        if wrong:
            raise ValueError(
                f"{', '.join(users)} read(s) transformer layers, but {' and '.join(wrong)}: use arch transformer "
                "(teacher: transformer or source huggingface), or remove them"
            )
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): what crosses the KFP boundary and what is hashed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """sha256 of the recipe (canonical JSON minus ``tracking``, ``image`` and ``cluster``,
        which say where results go and where steps run, not how the model was made); a
        lineage tag on every registered version, equal for a local and a cluster run."""
        # A candidate's name is a label, not part of its recipe; an absent sweep leaves the
        # hash of a config as it was before sweeps existed.
        exclude: dict[str, Any] = {name: True for name in ("tracking", "image", "cluster", "candidate")}
        recipe = self.model_dump(mode="json", exclude=exclude | self._unset_extensions())
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def augment_of(self, step: Literal["teacher", "distill"]) -> tuple[AugmentConfig, str]:
        """The augmentation a training step uses and the field it comes from (for messages):
        ``<step>.train.augment`` when set, else ``data.augment``."""
        own = (self.teacher if step == "teacher" else self.distill).train.augment
        return (own, f"{step}.train.augment") if own is not None else (self.data.augment, "data.augment")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> leaf value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def _unset_extensions(self) -> dict[str, Any]:
        """The fields added after hashes were in use, where left at their default (``sweep``,
        ``candidate``, a step's ``train.augment``, ``train.keep`` and ``train.sync_batchnorm``),
        as a ``model_dump`` exclude: kept out of the hash, so a config without them hashes as it
        did before they existed."""
        unset: dict[str, Any] = {name: True for name in ("sweep", "candidate") if getattr(self, name) is None}
        # Fields added later, each left out of the hash while at its declared default.
        added_later = {
            "quantize": ("candidates", "select"),
            "gate": ("max_latency_ms", "min_speedup"),
            "distill": ("promote", "transfer_source"),
            "teacher": ("fine_tune", "input_normalization"),
            "data": ("text_column", "max_length", "vocab_size", "tokenizer", "num_workers"),
            "student": ("init_from_teacher",),
        }
        for section_name, names in added_later.items():
            section = getattr(self, section_name)
            fields = type(section).model_fields
            left = {
                name: True
                for name in names
                if getattr(section, name) == fields[name].get_default(call_default_factory=True)
            }
            if left:
                unset[section_name] = left
        for step in ("teacher", "distill"):
            train = getattr(self, step).train
            defaults: dict[str, Any] = {
                name: True
                for name, default in (("augment", None), ("keep", "best"), ("sync_batchnorm", False))
                if getattr(train, name) == default
            }
            if train.augment is not None and train.augment.mixup_alpha == 0:
                defaults["augment"] = {"mixup_alpha": True}
            if defaults:
                unset.setdefault(step, {})["train"] = defaults
        if self.data.augment.mixup_alpha == 0:
            unset.setdefault("data", {})["augment"] = {"mixup_alpha": True}
        return unset
