"""Champion/challenger through the real gate and register steps on a real sqlite store.

One tiny model is trained once; the candidates differ by the metrics the evaluate step
reported (an honest stand-in for a worse or larger retrained student), while the champion
is always re-measured by the gate step itself on the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.steps.common import StepError
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.register import register
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("promotion")
    cfg = tiny_config(
        tmp,
        gate={
            "champion_policy": "must_not_regress",
            "champion_tolerance": 1.0,
            "min_accuracy": 0.5,
            "max_accuracy_drop": 40.0,
            "max_quantization_drop": 5.0,
        },
        teacher={"train": {"epochs": 3}},
        distill={"train": {"epochs": 3}},
    )
    d = {name: tmp / name for name in ("dataset", "teacher", "student", "quantized")}
    prepare_data(cfg, "setup", d["dataset"])
    train_teacher(cfg, "setup", d["dataset"], d["teacher"])
    distill(cfg, "setup", d["dataset"], d["teacher"], d["student"])
    quantize(cfg, "setup", d["dataset"], d["student"], d["quantized"])
    evaluate(
        cfg,
        "setup",
        d["dataset"],
        {"teacher": d["teacher"], "student": d["student"], "quantized": d["quantized"]},
        tmp / "evaluation.json",
    )
    return {"cfg": cfg, "dirs": d, "evaluation": json.loads((tmp / "evaluation.json").read_text()), "tmp": tmp}


def _candidate(
    trained: dict, run_id: str, tmp: Path, keep_rejected: bool = False, **quantized
) -> tuple[str, dict[str, str] | None]:
    cfg = trained["cfg"].model_copy(deep=True)
    cfg.registry.keep_rejected = keep_rejected
    evaluation = json.loads(json.dumps(trained["evaluation"]))
    evaluation["quantized"].update(quantized)
    (tmp / f"{run_id}.json").write_text(json.dumps(evaluation))
    d = trained["dirs"]
    decision, action = gate(cfg, run_id, d["dataset"], tmp / f"{run_id}.json", tmp / f"{run_id}.decision.json")
    out = None
    if action != "reject":
        out = register(
            cfg, run_id, d["dataset"], d["quantized"], tmp / f"{run_id}.json", tmp / f"{run_id}.decision.json"
        )
    return action, out


def test_champion_challenger_sequence(trained: dict, tmp_path: Path) -> None:
    cfg = trained["cfg"]
    name = cfg.registry.model_name
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    acc = trained["evaluation"]["quantized"]["accuracy"]
    size = trained["evaluation"]["quantized"]["size_bytes"]

    # No champion yet: the thresholds alone decide.
    action, first = _candidate(trained, "run-1", tmp_path)
    assert action == "promote" and first is not None and first["champion"] == first["version"] == "1"

    # The same model again: no regression, same size; ties go to the newest version.
    action, second = _candidate(trained, "run-2", tmp_path)
    assert action == "promote" and second is not None and second["champion"] == "2"

    # 3 points worse than the champion (tolerance 1): rejected, nothing registered, alias kept.
    action, out = _candidate(trained, "run-3", tmp_path, accuracy=acc - 0.03)
    assert (action, out) == ("reject", None)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    with pytest.raises(StepError, match="champion_accuracy_drop"):
        register(
            cfg,
            "run-3",
            trained["dirs"]["dataset"],
            trained["dirs"]["quantized"],
            tmp_path / "run-3.json",
            tmp_path / "run-3.decision.json",
        )

    # Kept as challenger when asked: registered, tagged rejected, never champion.
    action, challenger = _candidate(trained, "run-4", tmp_path, keep_rejected=True, accuracy=acc - 0.03)
    assert action == "challenger" and challenger is not None and challenger["alias"] == "challenger"
    v4 = client.get_model_version(name, challenger["version"])
    assert v4.tags["validation_status"] == "rejected"
    assert v4.tags["gate.champion_accuracy_drop"].endswith("FAIL")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == challenger["version"]

    # Within tolerance but 30% larger and not more accurate: a size regression.
    action, _ = _candidate(trained, "run-5", tmp_path, accuracy=acc - 0.005, size_bytes=int(size * 1.3))
    assert action == "reject"
    decision = json.loads((tmp_path / "run-5.decision.json").read_text())
    assert [c["name"] for c in decision["checks"] if not c["passed"]] == ["champion_size_ratio"]
    # Larger is fine when it buys accuracy (the champion is re-measured, so this is honest).
    action, bigger = _candidate(trained, "run-6", tmp_path, accuracy=min(1.0, acc + 0.02), size_bytes=int(size * 1.3))
    assert action == "promote" and bigger is not None and bigger["champion"] == bigger["version"]

    # Re-running a pipeline run that already registered reuses its version: no duplicate.
    again = register(
        cfg,
        "run-6",
        trained["dirs"]["dataset"],
        trained["dirs"]["quantized"],
        tmp_path / "run-6.json",
        tmp_path / "run-6.decision.json",
    )
    assert again["version"] == bigger["version"] and again["reused"] == "true"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 4
    assert all("validation_status" in v.tags and "kdflow.pipeline_run_id" in v.tags for v in versions)


def test_a_version_that_does_not_serve_the_evaluated_predictions_is_broken_and_moves_no_alias(
    trained: dict, tmp_path: Path
) -> None:
    cfg = trained["cfg"]
    name = cfg.registry.model_name
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    action, good = _candidate(trained, "run-good", tmp_path)
    assert action == "promote" and good is not None
    verified = client.get_model_version(name, good["version"]).tags
    assert verified["validation_status"] == "passed"
    n = len(trained["evaluation"]["quantized"]["predictions"])
    assert f"predicted all {n} expected class ids" in verified["kdflow.verification"]
    champion = str(client.get_model_version_by_alias(name, "champion").version)

    # What the evaluate step says the model predicts is not what the registered model serves
    # (every class id shifted by one): the fresh-process check must catch it.
    wrong = [(p + 1) % 10 for p in trained["evaluation"]["quantized"]["predictions"]]
    with pytest.raises(StepError, match="did not serve what was evaluated") as err:
        _candidate(trained, "run-broken", tmp_path, predictions=wrong)
    assert "validation_status=broken" in err.value.cause
    broken = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.tags.get("kdflow.pipeline_run_id") == "run-broken"
    ]
    assert len(broken) == 1 and broken[0].tags["validation_status"] == "broken"
    assert f"{n} of {n} predicted class ids differ" in broken[0].tags["kdflow.verification"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion

    # Running that pipeline run's register again refuses: the broken version stays broken.
    with pytest.raises(StepError, match="is tagged validation_status=broken"):
        register(
            cfg,
            "run-broken",
            trained["dirs"]["dataset"],
            trained["dirs"]["quantized"],
            tmp_path / "run-broken.json",
            tmp_path / "run-broken.decision.json",
        )
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion
