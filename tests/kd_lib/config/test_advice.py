"""kd_lib.config.advice: warnings about configs that run but are unlikely to pay off."""

from kd_lib.config import parse_config
from kd_lib.config.advice import MIN_KD_EPOCHS, advise


def test_a_short_distillation_schedule_with_a_teacher_is_warned_about_with_the_fix() -> None:
    (item,) = advise(parse_config({"distill": {"train": {"epochs": 10}}}))
    assert item.field == "distill.train.epochs"
    assert "is 10" in item.cause and "(kd)" in item.cause
    assert f"at least {MIN_KD_EPOCHS}" in item.fix and "--set distill.train.epochs=" in item.fix


def test_no_warning_at_the_threshold_without_a_teacher_or_with_a_long_schedule() -> None:
    assert advise(parse_config({"distill": {"train": {"epochs": MIN_KD_EPOCHS}}})) == []
    assert advise(parse_config({"distill": {"train": {"epochs": 200}}})) == []
    # ce alone never runs the teacher: a short schedule is the user's business.
    assert advise(parse_config({"distill": {"losses": [{"name": "ce"}], "train": {"epochs": 5}}})) == []
    # A teacher term with weight 0 is off too.
    off = {"losses": [{"name": "kd", "weight": 0.0}, {"name": "ce"}], "train": {"epochs": 5}}
    assert advise(parse_config({"distill": off})) == []


def test_the_warning_names_every_teacher_term_that_has_weight() -> None:
    losses = [{"name": "dkd", "weight": 1.0}, {"name": "at", "weight": 500.0}, {"name": "ce"}]
    (item,) = advise(parse_config({"distill": {"losses": losses, "train": {"epochs": MIN_KD_EPOCHS - 1}}}))
    assert "(dkd, at)" in item.cause
