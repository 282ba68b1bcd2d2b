"""Where the samples come from (``data:``) and how training batches are augmented.

The source is classified by its name alone (``source_kind``): the config is checked where the
data may not be reachable; kd_lib.data.dataset reads it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from kd_lib.config.base import _Strict


class AugmentConfig(_Strict):
    """Random transforms of *training* batches (never validation or test); images only for crop/flip.

    With any of them on, the teacher runs on every augmented batch instead of reading its
    cached logits (the cache holds logits of the un-augmented samples).
    """

    random_crop_padding: int = Field(
        0,
        ge=0,
        description="Pad each side with this many zero pixels, then crop back to the original size at a random "
        "offset; 0 = off.",
    )
    horizontal_flip: bool = Field(
        False, description="Mirror half of the images left-right (off for digits: a mirrored 3 is not a 3)."
    )
    noise_std: float = Field(0.0, ge=0, description="Std of Gaussian noise added to the normalized inputs; 0 = off.")
    mixup_alpha: float = Field(
        0.0,
        ge=0,
        description="Mixup (Zhang et al. 2018), applied after the other transforms: each sample becomes "
        "lam * x + (1 - lam) * x_other, another sample of the batch, lam ~ Beta(alpha, alpha) per sample; 0 = off. "
        "Distillation only, with teacher terms only: teacher and student see the same mixed batch and the student "
        "matches the teacher on it ('function matching', Beyer et al. 2022). A mixed sample has no single label, "
        "so ce and dkd are refused with it, and the distill.baseline student trains without it.",
    )

    @property
    def enabled(self) -> bool:
        return self.random_crop_padding > 0 or self.horizontal_flip or self.noise_std > 0 or self.mixup_alpha > 0


# What a data source is, from its name alone (the config is checked where the data may not be).
TABULAR_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# JSON Lines: one object per line; text data only (kd_lib.data.text reads it).
TEXT_SUFFIXES = {**TABULAR_SUFFIXES, ".jsonl": "jsonl"}
SOURCE_SUFFIXES = {".npz": "npz", **TEXT_SUFFIXES}
# Labelled text files shipped in the package (kd_lib/data/samples/<name>.csv): no download.
TEXT_SAMPLES = ("movie_toy",)
# Labelled images shipped in the package (kd_lib/data/samples/<name>.npz): no download.
IMAGE_SAMPLES = ("mnist14",)


def source_kind(source: str) -> str:
    """``'digits'``, ``'text_sample'`` (a name in TEXT_SAMPLES), ``'image_sample'`` (a name in
    IMAGE_SAMPLES), ``'npz'``, ``'csv'``,
    ``'parquet'``, ``'jsonl'``, ``'folder'`` (no suffix, or a trailing ``/``: a directory or s3
    prefix of class sub-folders) or ``'unknown'`` (another suffix)."""
    if source == "digits":
        return "digits"
    if source in TEXT_SAMPLES:
        return "text_sample"
    if source in IMAGE_SAMPLES:
        return "image_sample"
    if source.endswith("/"):
        return "folder"
    suffix = Path(source.rsplit("/", 1)[-1]).suffix.lower()
    return SOURCE_SUFFIXES.get(suffix, "folder" if not suffix else "unknown")


class DataConfig(_Strict):
    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's builtin 8x8 digits); 'mnist14' (5,000 MNIST digits shrunk to 14x14, "
        "shipped in the package); or a local path or s3://bucket/key of: a .npz "
        "with arrays x and y; a .csv or .parquet with a label column and feature columns (or one pixel column); "
        "or a directory / s3 prefix with one sub-folder of PNG/JPEG images per class. s3:// reads its endpoint "
        "and credentials from AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.",
    )
    num_classes: int | None = Field(None, ge=2, description="Number of classes; inferred from the labels when omitted.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of source held out for test; unused when test_source is set."
    )
    seed: int = 0
    label_column: str = Field(
        "label", min_length=1, description="CSV/parquet: the column of class labels (ints or names)."
    )
    feature_columns: list[str] | None = Field(
        None, min_length=1, description="CSV/parquet: the feature columns, in order; None = every other column."
    )
    pixel_column: str | None = Field(
        None,
        min_length=1,
        description="CSV/parquet: one column holding each sample's flattened pixels (space-separated numbers in CSV, "
        "a list in parquet) instead of one column per feature; needs image_shape.",
    )
    image_shape: list[int] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="[C, H, W]: reshape each sample's flat features into an image (e.g. [1, 28, 28] for 784 pixel "
        "columns), so a table can feed a CNN.",
    )
    test_source: str | None = Field(
        None,
        min_length=1,
        description="A separate held-out test set in the same format as source (local path or s3://); when set, "
        "test comes from it and train/val are split from source.",
    )
    image_size: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Image folders: [H, W] to resize every image to; without it, all images must have one size.",
    )
    image_mode: Literal["L", "RGB"] = Field(
        "L", description="Image folders: 'L' reads images as grayscale [1, H, W], 'RGB' as colour [3, H, W]."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training-batch augmentation.")
    num_workers: int = Field(
        0,
        ge=0,
        description="Image folders and tables (read lazily): DataLoader worker processes that decode training "
        "batches ahead of the step (pinned memory on a GPU); 0 reads them in the training process. The batches, "
        "hence the weights, are the same with any number.",
    )
    text_column: str | None = Field(
        None,
        min_length=1,
        description="Text classification: the column (CSV/parquet) or key (.jsonl) holding each sample's text. "
        "Setting it turns text mode on: samples become token ids [max_length] (kd_lib.data.text).",
    )
    max_length: int = Field(
        128, ge=2, description="Text: tokens per sample, [CLS] and [SEP] included; longer texts are truncated."
    )
    vocab_size: int = Field(
        8000, ge=16, description="Text: vocabulary size of a tokenizer trained on the train split (tokenizer: train)."
    )
    tokenizer: str = Field(
        "auto",
        min_length=1,
        description="Text: 'auto' (the teacher's own tokenizer when it has one, else 'train'), 'train' (a WordPiece "
        "tokenizer trained on the train split only), or a local path or s3:// URI of a tokenizers tokenizer.json.",
    )

    @field_validator("source", "test_source", "tokenizer")
    @classmethod
    def _local_or_s3(cls, source: str | None) -> str | None:
        if source is None or source in ("digits", "auto", "train", *TEXT_SAMPLES, *IMAGE_SAMPLES):
            return source
        scheme = urlparse(source).scheme
        # One-letter schemes are Windows drive letters (C:\data.csv), not URLs.
        if scheme and scheme != "s3" and len(scheme) > 1:
            raise ValueError(f"{source!r}: only local paths and s3://bucket/key URIs are supported, not {scheme}://")
        if scheme == "s3" and not re.match(r"^s3://[^/]+", source):
            raise ValueError(f"{source!r}: no bucket; write s3://BUCKET/KEY")
        # Another suffix may still be a directory ("mnist.v2/"): kd_lib.data.dataset decides when it looks.
        return source

    @field_validator("image_shape", "image_size")
    @classmethod
    def _positive(cls, dims: list[int] | None) -> list[int] | None:
        if dims is not None and min(dims) < 1:
            raise ValueError(f"{dims}: every dimension must be at least 1")
        return dims

    @model_validator(mode="after")
    def _options_fit_the_source(self) -> DataConfig:
        # "unknown" (a name with another suffix) may be a directory: only clear mismatches are errors here.
        kind = source_kind(self.source).replace("unknown", "folder")
        tabular = kind in ("csv", "parquet")
        if self.text_column is not None:
            return self._text_options_fit(kind)
        if kind in ("jsonl", "text_sample"):
            raise ValueError(f"{self.source!r} holds text: set data.text_column to the column of texts")
        if self.tokenizer != "auto":
            raise ValueError("tokenizer applies to text data (data.text_column set)")
        if self.pixel_column is not None and self.feature_columns is not None:
            raise ValueError("set either pixel_column (one column of flattened pixels) or feature_columns, not both")
        if self.pixel_column is not None and self.image_shape is None:
            raise ValueError(f"pixel_column {self.pixel_column!r} needs image_shape [C, H, W] to reshape its pixels")
        if self.pixel_column is not None and self.label_column == self.pixel_column:
            raise ValueError(f"label_column and pixel_column are both {self.label_column!r}")
        if self.feature_columns is not None and self.label_column in self.feature_columns:
            raise ValueError(f"label_column {self.label_column!r} is also listed in feature_columns")
        if (self.pixel_column is not None or self.feature_columns is not None) and not tabular:
            raise ValueError(f"pixel_column / feature_columns apply to .csv and .parquet sources, not {self.source!r}")
        if self.image_shape is not None and kind in ("digits", "image_sample", "folder"):
            raise ValueError(
                f"image_shape reshapes flat features; {self.source!r} already holds images "
                "(use image_size to resize an image folder)"
            )
        if (self.image_size is not None or self.image_mode != "L") and kind != "folder":
            raise ValueError(
                "image_size / image_mode apply to an image folder (a directory of class sub-folders), "
                f"not {self.source!r}"
            )
        if self.test_source is not None:
            if kind in ("digits", "image_sample"):
                raise ValueError(
                    f"test_source needs a source file or folder; {self.source!r} is split into train/val/test"
                )
            if source_kind(self.test_source).replace("unknown", "folder") != kind:
                raise ValueError(
                    f"test_source {self.test_source!r} must have the format of source {self.source!r} "
                    f"({source_kind(self.test_source)} vs {kind})"
                )
        return self

    def _text_options_fit(self, kind: str) -> DataConfig:
        if kind not in ("csv", "parquet", "jsonl", "text_sample"):
            raise ValueError(
                f"text_column {self.text_column!r} needs a .csv, .parquet or .jsonl source (or one of "
                f"{list(TEXT_SAMPLES)}), not {self.source!r}"
            )
        if self.text_column == self.label_column:
            raise ValueError(f"label_column and text_column are both {self.text_column!r}")
        image_options = ("pixel_column", "feature_columns", "image_shape", "image_size")
        set_options = [name for name in image_options if getattr(self, name) is not None]
        if set_options or self.image_mode != "L" or self.augment.enabled:
            what = ", ".join(set_options) or ("image_mode" if self.image_mode != "L" else "augment")
            raise ValueError(f"{what} do(es) not apply to text data (text_column set); remove it")
        if self.test_source is not None:
            test_kind = source_kind(self.test_source)
            if test_kind not in ("csv", "parquet", "jsonl", "text_sample"):
                raise ValueError(f"test_source {self.test_source!r} must be a .csv, .parquet or .jsonl file of texts")
        return self
