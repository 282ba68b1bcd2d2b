"""Where results go: the MLflow experiment (``tracking:``) and model registry (``registry:``)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from kd_lib.config.base import _Strict


class RegistryConfig(_Strict):
    model_name: str = Field("kdflow-student", min_length=1)
    alias: str = Field("champion", min_length=1)
    challenger_alias: str = Field("challenger", min_length=1)
    keep_rejected: bool = Field(
        False,
        description="Register a candidate that passed every threshold but lost to the champion, tagged "
        "validation_status=rejected and aliased challenger_alias (never champion).",
    )
    ranking: Literal["accuracy", "newest"] = Field(
        "accuracy",
        description="Which passed version is champion: accuracy (highest test accuracy, then smallest, then newest) "
        "or newest (highest version number).",
    )


class RetryConfig(_Strict):
    """Bounded exponential backoff for every MLflow (and S3) call: transient failures only."""

    max_attempts: int = Field(6, ge=1, description="Tries per call, the first included.")
    backoff_s: int = Field(
        1,
        ge=0,
        description="Base wait, whole seconds (MLflow reads an int): the k-th retry waits about backoff_s * 2^k s.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout, seconds.")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; else $MLFLOW_TRACKING_URI; else sqlite:///mlflow.db."
    )
    experiment: str = Field("kdflow", min_length=1)
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, uri: str | None) -> str | None:
        # The config becomes MLflow params and a KFP parameter: a password here would leak.
        if uri and urlparse(uri).password:
            raise ValueError(
                "contains a password; remove it from the URI and set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD in the environment (a Kubernetes Secret on the cluster)"
            )
        return uri
