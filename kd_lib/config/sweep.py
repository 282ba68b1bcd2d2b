"""A sweep (``sweep:``): several candidate students/schemes fanned out by KFP (dsl.ParallelFor), one chosen."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from kd_lib import plugins
from kd_lib.config.base import _Strict
from kd_lib.config.compress import scheme_names
from kd_lib.config.train import ModelConfig

# The loss terms whose softmax temperature sweep.temperatures sets.
TEMPERATURE_LOSSES = ("kd", "dkd")
# A candidate's name goes into MLflow run names and tags; keep it to characters safe everywhere.
CANDIDATE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


def _duplicates(items: list[Any]) -> list[Any]:
    seen: list[Any] = []
    dups: list[Any] = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.append(item)
    return dups


class SweepConfig(_Strict):
    """Candidates to distill, quantize, evaluate and gate side by side; one is registered.

    The candidates are the product students x schemes (x temperatures). Each is the base
    config with ``student.model``, ``quantize.scheme`` (and the ``temperature`` of every
    kd/dkd term of ``distill.losses``) replaced; the teacher is trained (or imported) once.
    The chosen one is the smallest candidate that passes every gate, ties by batch-1 latency.
    """

    students: list[ModelConfig] = Field(
        ...,
        min_length=1,
        description="Candidate student architectures, e.g. [{arch: mlp, params: {width: 16, depth: 1}}].",
    )
    schemes: list[str] = Field(
        ...,
        min_length=1,
        description="Candidate quantization schemes (names of quantize.scheme), e.g. [dynamic_int8, static_int8].",
    )
    temperatures: list[float] | None = Field(
        None,
        min_length=1,
        description="Candidate softmax temperatures of the kd/dkd terms of distill.losses; omit to keep the base ones.",
    )
    parallelism: int = Field(
        2, ge=1, description="Candidates running at once (dsl.ParallelFor parallelism); kfp.local caps it at 2."
    )
    max_candidates: int = Field(
        16, ge=1, description="Guard against a product that is larger than intended: more candidates is an error."
    )

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, schemes: list[str]) -> list[str]:
        known = [*scheme_names(), "auto"]
        unknown = [s for s in schemes if s not in known]
        if unknown:
            raise ValueError(f"unknown scheme(s) {unknown}; use names of quantize.scheme: {', '.join(known)}")
        if dups := _duplicates(schemes):
            raise ValueError(f"scheme(s) {dups} listed more than once; list each once")
        return schemes

    @field_validator("students")
    @classmethod
    def _distinct_students(cls, students: list[ModelConfig]) -> list[ModelConfig]:
        models = plugins.names("model")  # by module path, as for the schemes
        for i, student in enumerate(students):
            if ":" not in student.arch and student.arch not in models:
                raise ValueError(
                    f"students.{i}.arch {student.arch!r} is not a model; use one of {', '.join(models)} "
                    "or 'pkg.module:fn'"
                )
        dumps = [s.model_dump() for s in students]
        if dups := _duplicates(dumps):
            raise ValueError(f"student(s) {dups} listed more than once; list each once")
        return students

    @field_validator("temperatures")
    @classmethod
    def _positive_distinct_temperatures(cls, temperatures: list[float] | None) -> list[float] | None:
        if temperatures is None:
            return None
        if bad := [t for t in temperatures if t <= 0]:
            raise ValueError(f"temperature(s) {bad} are not > 0; a softmax temperature must be positive")
        if dups := _duplicates(temperatures):
            raise ValueError(f"temperature(s) {dups} listed more than once; list each once")
        return temperatures

    @property
    def size(self) -> int:
        """Number of candidates: the product of the lists' lengths."""
        return len(self.students) * len(self.schemes) * len(self.temperatures or [None])

    @model_validator(mode="after")
    def _within_max_candidates(self) -> SweepConfig:
        if self.size > self.max_candidates:
            lengths = f"{len(self.students)} students x {len(self.schemes)} schemes"
            lengths += f" x {len(self.temperatures)} temperatures" if self.temperatures else ""
            raise ValueError(
                f"{lengths} = {self.size} candidates, above max_candidates={self.max_candidates}; "
                "shorten a list or raise sweep.max_candidates"
            )
        return self
