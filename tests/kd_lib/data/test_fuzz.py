"""Bad input, tried systematically: random and malformed configs and datasets are either
accepted and run, or rejected with the project's own error type; never anything else."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kd_lib.artifacts.dataset_dir import SPLIT_NAMES
from kd_lib.config import ConfigError, DataConfig, PipelineConfig, parse_config
from kd_lib.data import dataset as data
from tests.helpers import as_arrays

SECTIONS = list(PipelineConfig.model_fields)
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 100), max_size=3),
)
# Real section and field names mixed with junk, so validation of real fields is exercised too.
field_names = st.sampled_from(
    [
        "source",
        "epochs",
        "lr",
        "temperature",
        "alpha",
        "scheme",
        "min_accuracy",
        "model",
        "params",
        "arch",
        "train",
        "batch_size",
        "model_name",
        "tracking_uri",
        "retry",
        "max_attempts",
        "bogus",
        "",
    ]
)
tree = st.recursive(leaf, lambda inner: st.dictionaries(field_names, inner, max_size=4), max_leaves=12)
configs = st.dictionaries(st.sampled_from(SECTIONS + ["junk"]), tree, max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_random_configs_validate_or_raise_config_error(raw: dict) -> None:
    try:
        cfg = parse_config(raw)
    except ConfigError as err:
        assert str(err)  # a message, naming fields
        event("rejected")
        return
    event("accepted")
    assert isinstance(cfg, PipelineConfig)
    cfg.config_hash()  # an accepted config is fully usable


dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.int8, np.bool_, np.complex64, "U3"])
special = st.one_of(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30]), st.floats(-255, 255))
values = st.one_of(st.floats(-255, 255), special)


@st.composite
def datasets(draw) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 40))
    shape = draw(st.sampled_from([(n,), (n, 4), (n, 1, 3, 3), (max(n - 1, 0), 4), (n, 0)]))
    x = np.asarray(
        draw(
            st.lists(
                values if draw(st.booleans()) else st.floats(0, 255),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
    ).reshape(shape)
    x = x.astype(draw(dtypes)) if draw(st.booleans()) and np.isfinite(x).all() else x
    y_len = draw(st.sampled_from([n, n + 1, max(n - 1, 0)]))
    labels = st.integers(-2, 12) if draw(st.booleans()) else st.integers(0, 3)
    y = np.asarray(draw(st.lists(labels, min_size=y_len, max_size=y_len)), dtype=np.int64)
    if draw(st.booleans()):
        y = y.astype(draw(st.sampled_from([np.float32, np.float64, "U2"])))
    return x, y


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets(), st.one_of(st.none(), st.integers(2, 6)))
def test_random_datasets_prepare_or_raise_data_error(arrays: tuple[np.ndarray, np.ndarray], num_classes) -> None:
    x, y = arrays
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        np.savez(path, x=x, y=y)
        try:
            splits = data.prepare(DataConfig(source=str(path), num_classes=num_classes))
        except data.DataError as err:
            assert str(path) in str(err) or "class" in str(err)
            event("rejected: " + re.sub(r"\d+", "N", str(err).split(": ", 1)[-1])[:32])
            return
    event("accepted")
    assert sum(splits.meta.sizes.values()) == len(y)
    assert all(np.isfinite(splits.x[s]).all() for s in SPLIT_NAMES)
    assert all(splits.meta.sizes[s] > 0 for s in SPLIT_NAMES)
    assert np.isfinite(list(splits.meta.normalization.values())).all()


cells = st.one_of(
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "cat", "1e3", " ", "NaN", "1 2"]),
    st.none(),
)


@st.composite
def csv_tables(draw) -> tuple[dict[str, list], list[str] | None]:
    """A small table as columns (a label + up to 3 features), numeric or not, with holes."""
    n = draw(st.integers(0, 24))
    # Usually a label column (its absence is one error among many), mostly with usable values.
    label = draw(st.sampled_from(["label", "label", "label", "target"]))
    names = [label] + draw(st.lists(st.sampled_from(["a", "b", "c", "pixels"]), max_size=3, unique=True))
    table = {}
    for name in names:
        kind = draw(st.sampled_from(["int", "int", "float", "any"]))
        values = {"int": st.integers(0, 3), "float": st.floats(-5, 5), "any": cells}[kind]
        table[name] = draw(st.lists(values, min_size=n, max_size=n))
    features = draw(
        st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=2, unique=True))
    )
    return table, features


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_tables(), st.booleans())
def test_random_csv_prepare_or_raise_data_error(
    table: tuple[dict[str, list], list[str] | None], as_parquet: bool
) -> None:
    import pandas as pd
    from pydantic import ValidationError

    columns, features = table
    try:
        cfg_fields = {"feature_columns": features} if features and "label" not in features else {}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ("d.parquet" if as_parquet else "d.csv")
            df = pd.DataFrame(columns)
            if as_parquet:
                try:
                    df.to_parquet(path, index=False)
                except Exception:  # noqa: BLE001 - a column pyarrow cannot type: not a parquet we can get
                    event("unwritable parquet")
                    return
            else:
                df.to_csv(path, index=False)
            splits = as_arrays(data.prepare(DataConfig(source=str(path), **cfg_fields)))
    except data.DataError as err:
        assert "d.csv" in str(err) or "d.parquet" in str(err) or "class" in str(err)
        event("rejected: " + re.sub(r"\d+", "N", str(err).split(": ", 1)[-1])[:32])
        return
    except ValidationError:
        event("config rejected")
        return
    event("accepted")
    assert all(np.isfinite(splits.x[s]).all() for s in SPLIT_NAMES)
    assert sum(splits.meta.sizes.values()) == len(next(iter(columns.values())))
