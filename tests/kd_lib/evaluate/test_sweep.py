"""The sweep's pure parts: candidate expansion and validation, the Pareto front, the selection rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kd_lib.config import ConfigError, PipelineConfig, parse_config
from kd_lib.evaluate import sweep
from kd_lib.evaluate.gates import GateCheck, GateDecision
from tests.helpers import recipe_before_extensions

STUDENTS = [
    {"arch": "mlp", "params": {"width": 16, "depth": 1}},
    {"arch": "cnn", "params": {"channels": 4, "depth": 1, "hidden": 16}},
]
LOSSES = [
    {"name": "kd", "weight": 0.5, "params": {"temperature": 4.0}},
    {"name": "dkd", "weight": 0.4, "params": {"temperature": 4.0, "alpha": 1.0}},
    {"name": "ce", "weight": 0.1},
]


def _cfg(**sweep_section) -> PipelineConfig:
    section = {"students": STUDENTS, "schemes": ["dynamic_int8", "static_int8"]} | sweep_section
    return parse_config(
        {
            "distill": {"losses": LOSSES},
            "quantize": {"scheme": "dynamic_int8", "backend": "torch.ao.quantization.quantize_dynamic"},
            "sweep": section,
        }
    )


# ---------------------------------------------------------------- expansion


def test_candidates_are_the_product_with_overrides_applied() -> None:
    cfg = _cfg(temperatures=[2, 8.5])
    candidates = sweep.expand(cfg)
    assert [c.name for c in candidates] == [
        "c0-mlp-w16d1-dynamic_int8-T2",
        "c1-mlp-w16d1-dynamic_int8-T8.5",
        "c2-mlp-w16d1-static_int8-T2",
        "c3-mlp-w16d1-static_int8-T8.5",
        "c4-cnn-c4d1h16-dynamic_int8-T2",
        "c5-cnn-c4d1h16-dynamic_int8-T8.5",
        "c6-cnn-c4d1h16-static_int8-T2",
        "c7-cnn-c4d1h16-static_int8-T8.5",
    ]
    c5 = candidates[5].config
    assert c5.sweep is None and c5.candidate == "c5-cnn-c4d1h16-dynamic_int8-T8.5"
    assert c5.student.model.arch == "cnn" and c5.student.model.params == {"channels": 4, "depth": 1, "hidden": 16}
    assert c5.quantize.scheme == "dynamic_int8"
    # Every kd/dkd term gets the temperature, its other params kept; ce is untouched.
    assert [t.params for t in c5.distill.losses] == [{"temperature": 8.5}, {"temperature": 8.5, "alpha": 1.0}, {}]
    # A backend names one scheme's implementation: kept for that scheme only.
    assert candidates[0].config.quantize.backend == "torch.ao.quantization.quantize_dynamic"
    assert candidates[2].config.quantize.backend is None
    # Everything else is the base config.
    assert c5.teacher == cfg.teacher and c5.gate == cfg.gate and c5.registry == cfg.registry


def test_without_temperatures_the_base_ones_stay_and_names_have_no_T() -> None:
    candidates = sweep.expand(_cfg())
    assert [c.name for c in candidates][:2] == ["c0-mlp-w16d1-dynamic_int8", "c1-mlp-w16d1-static_int8"]
    assert all(c.temperature is None for c in candidates)
    assert candidates[0].config.distill.losses[0].params == {"temperature": 4.0}


def test_candidate_configs_are_stable_json_that_round_trips() -> None:
    first, second = sweep.candidate_configs(_cfg()), sweep.candidate_configs(_cfg())
    assert first == second and len(first) == 4
    for text, candidate in zip(first, sweep.expand(_cfg()), strict=True):
        assert PipelineConfig.model_validate(json.loads(text)) == candidate.config


def test_the_candidate_name_is_a_label_not_part_of_the_recipe_hash() -> None:
    candidate = sweep.expand(_cfg())[1]
    same_recipe = candidate.config.model_copy(update={"candidate": None})
    assert candidate.config.config_hash() == same_recipe.config_hash()
    assert len({c.config.config_hash() for c in sweep.expand(_cfg())}) == 4


def test_a_config_without_a_sweep_hashes_as_it_did_before() -> None:
    cfg = parse_config({})
    # Without the sweep, and with every field added later at its default, the hash is the old one.
    dumped = recipe_before_extensions(cfg)
    assert (
        cfg.config_hash()
        == hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    with pytest.raises(ValueError, match="no sweep section"):
        sweep.expand(cfg)


def test_names_abbreviate_known_params_and_keep_others() -> None:
    from kd_lib.config import ModelConfig

    user = ModelConfig(arch="my_pkg.models:tiny_net", params={"width": 8, "gamma": 0.5, "alpha": [1, 2]})
    assert sweep.candidate_name(3, user, "fp16", 4.0) == "c3-tiny_net-w8alpha12gamma0.5-fp16-T4"
    assert sweep.candidate_name(0, ModelConfig(arch="mlp", params={}), "none") == "c0-mlp-none"


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"schemes": ["dynamic_int8", "int3"]},
            r"sweep.schemes: .*unknown scheme\(s\) \['int3'\]; use names of quantize.scheme: ",
        ),
        ({"schemes": []}, r"sweep.schemes: List should have at least 1 item"),
        ({"students": []}, r"sweep.students: List should have at least 1 item"),
        ({"temperatures": []}, r"sweep.temperatures: List should have at least 1 item"),
        ({"schemes": ["fp16", "fp16"]}, r"sweep.schemes: .*\['fp16'\] listed more than once"),
        ({"students": [STUDENTS[0], STUDENTS[0]]}, r"sweep.students: .*listed more than once"),
        ({"students": [{"arch": "perceiver"}]}, r"sweep.students: .*students.0.arch 'perceiver' is not a model"),
        ({"temperatures": [2, 2.0]}, r"sweep.temperatures: .*\[2.0\] listed more than once"),
        ({"temperatures": [0]}, r"sweep.temperatures: .*not > 0"),
        (
            {"max_candidates": 3},
            r"2 students x 2 schemes = 4 candidates, above max_candidates=3; "
            r"shorten a list or raise sweep.max_candidates",
        ),
        ({"parallelism": 0}, r"sweep.parallelism"),
        ({"schemes": ["fp16"], "student": {}}, r"sweep.student: unknown field"),
    ],
)
def test_invalid_sweeps_name_the_field_and_the_fix(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**section)


def test_temperatures_need_a_kd_term_and_candidate_is_not_for_users() -> None:
    with pytest.raises(
        ConfigError, match="sweep.temperatures sets the temperature of kd/dkd terms, and distill.losses has none"
    ):
        parse_config(
            {
                "distill": {"losses": [{"name": "ce"}]},
                "sweep": {"students": STUDENTS, "schemes": ["fp16"], "temperatures": [2]},
            }
        )
    with pytest.raises(ConfigError, match="candidate is set by the sweep"):
        parse_config({"candidate": "c0-x", "sweep": {"students": STUDENTS, "schemes": ["fp16"]}})
    with pytest.raises(ConfigError, match="candidate"):
        parse_config({"candidate": "bad name with spaces"})


def test_the_example_sweep_config_expands(tmp_path: Path) -> None:
    from kd_lib.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "sweep.yaml")
    candidates = sweep.expand(cfg)
    assert 4 <= len(candidates) <= 6 and cfg.data.source == "digits"


# ---------------------------------------------------------------- the front and the rule


def _decision(*failed: str, champion_only: bool = False) -> GateDecision:
    names = ["min_accuracy", "max_size_mb", *failed]
    group = "champion" if champion_only else "threshold"
    checks = [
        GateCheck(
            n,
            value=1.0,
            threshold=0.5,
            op="<=",
            passed=n not in failed,
            unit="x",
            group=group if n in failed else "threshold",
        )
        for n in dict.fromkeys(names)
    ]
    return GateDecision(passed=not failed, checks=checks)


def _r(name: str, accuracy: float, size: float, latency: float | None = 1.0, *failed: str, action: str | None = None):
    index = int(name[1:])
    decision = _decision(*failed, champion_only=action == "challenger")
    return sweep.CandidateResult(
        name=name,
        index=index,
        accuracy=accuracy,
        size_bytes=size,
        latency_ms=latency,
        decision=decision,
        action=action or ("promote" if decision.passed else "reject"),
    )


def test_pareto_front_keeps_non_dominated_points_and_ties() -> None:
    points = [
        _r("c0", 0.90, 1000),
        _r("c1", 0.95, 2000),
        _r("c2", 0.95, 2000),  # equal to c1: neither dominates the other
        _r("c3", 0.89, 1000),  # same size as c0, less accurate: dominated
        _r("c4", 0.95, 3000),  # as accurate as c1, larger: dominated
        _r("c5", 0.97, 5000),
        _r("c6", 0.80, 900),
        _r("c7", 0.85, 4000),  # dominated by c0 (smaller and more accurate)
    ]
    assert [p.name for p in sweep.pareto_front(points)] == ["c6", "c0", "c1", "c2", "c5"]
    assert sweep.dominates(points[0], points[3]) and not sweep.dominates(points[1], points[2])
    assert sweep.pareto_front([]) == []


def _chosen(selection: sweep.Selection) -> str:
    """The name of the selected candidate, which the test expects there to be."""
    assert selection.chosen is not None
    return selection.chosen.name


def test_the_smallest_passing_candidate_is_chosen() -> None:
    results = [
        _r("c0", 0.70, 500, 1.0, "min_accuracy"),  # smallest, fails
        _r("c1", 0.90, 1500, 1.0),
        _r("c2", 0.92, 1200, 1.0),  # smallest passing
        _r("c3", 0.99, 9000, 1.0),
    ]
    selection = sweep.select(results)
    assert _chosen(selection) == "c2" and selection.action == "promote"
    assert selection.front == ["c0", "c2", "c3"]
    rows = {r["candidate"]: r for r in selection.rows()}
    assert rows["c2"]["chosen"] and rows["c2"]["on_front"] and not rows["c1"]["on_front"]
    assert rows["c0"]["failed_checks"] == ["min_accuracy"]
    assert rows["c0"]["why"] == ["min_accuracy 1 x, needs at most 0.5"]


def test_ties_in_size_go_to_accuracy_then_latency_then_order() -> None:
    # Equally small: the more accurate one, even though it is slower.
    assert _chosen(sweep.select([_r("c0", 0.90, 1000, 0.1), _r("c1", 0.93, 1000, 0.9)])) == "c1"
    # Equally small and accurate: the faster at batch 1; unmeasured latency counts as slowest.
    assert (
        _chosen(sweep.select([_r("c0", 0.9, 1000, 0.5), _r("c1", 0.9, 1000, 0.2), _r("c2", 0.9, 1000, None)])) == "c1"
    )
    assert _chosen(sweep.select([_r("c0", 0.9, 1000, None), _r("c1", 0.9, 1000, 0.7)])) == "c1"
    # Identical in everything: the first listed.
    assert _chosen(sweep.select([_r("c3", 0.9, 1000, 0.5), _r("c1", 0.9, 1000, 0.5)])) == "c1"


def test_a_passing_candidate_is_chosen_even_when_a_failing_one_dominates_it() -> None:
    # c0 is smaller and more accurate but fails the quantization drop: c1 is the pick, off the front.
    selection = sweep.select([_r("c0", 0.95, 800, 1.0, "max_quantization_drop"), _r("c1", 0.93, 1000, 1.0)])
    assert _chosen(selection) == "c1" and selection.front == ["c0"]


def test_challengers_are_picked_only_when_nothing_passes() -> None:
    challenger = _r("c1", 0.9, 1000, 1.0, "champion_accuracy_drop", action="challenger")
    assert _chosen(sweep.select([_r("c0", 0.9, 2000), challenger])) == "c0"
    selection = sweep.select([_r("c0", 0.7, 500, 1.0, "min_accuracy"), challenger])
    assert _chosen(selection) == "c1" and selection.action == "challenger"


def test_no_passing_candidate_means_reject_with_a_table_of_why() -> None:
    results = [
        _r("c0", 0.70, 500, 1.0, "min_accuracy"),
        _r("c1", 0.95, 90000, 2.0, "max_size_mb", "min_compression_ratio"),
    ]
    selection = sweep.select(results)
    assert selection.chosen is None and selection.action == "reject"
    decision = selection.decision()
    assert not decision.passed
    assert [(c.name, c.value, c.passed) for c in decision.checks] == [
        ("candidate c0", 1.0, False),
        ("candidate c1", 2.0, False),
    ]
    assert "max_size_mb 1 x, needs at most 0.5" in decision.checks[1].detail
    summary = selection.to_dict()
    assert summary["chosen"] is None and summary["action"] == "reject"
    text = sweep.table_text(summary)
    assert "c0" in text and "min_accuracy 1 x" in text and "min_compression_ratio" in text
    assert "chosen: none; no candidate passed every gate" in text
    assert "No candidate passed every gate" in sweep.table_markdown(summary)
    assert "No candidate of 2 passed" in selection.headline()


def test_select_refuses_empty_and_duplicate_results() -> None:
    with pytest.raises(ValueError, match="at least one"):
        sweep.select([])
    with pytest.raises(ValueError, match="unique"):
        sweep.select([_r("c0", 0.9, 1), _r("c0", 0.9, 1)])


def test_result_from_step_outputs_and_the_rendered_outputs() -> None:
    evaluation = {
        "quantized": {"accuracy": 0.91, "size_bytes": 5000, "latency_b1_p50_ms": 0.12},
        "student": {"accuracy": 0.92},
    }
    decision = _decision().to_dict() | {"action": "promote", "candidate": "c0"}
    r = sweep.result_from("c0", 0, evaluation, decision, {"scheme": "fp16"})
    assert (r.accuracy, r.size_bytes, r.latency_ms, r.action) == (0.91, 5000.0, 0.12, "promote")
    assert r.info == {"scheme": "fp16", "fp32_accuracy": 0.92}
    summary = sweep.select([r, _r("c1", 0.8, 9000, None, "min_accuracy")]).to_dict()
    assert "* c0" in sweep.table_text(summary)
    md = sweep.table_markdown(summary, "QUJD")
    assert "**c0**" in md and "data:image/png;base64,QUJD" in md
    assert sweep.plot_front(summary).startswith(b"\x89PNG")
