import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kd_lib.config import ConfigError, PipelineConfig, config_from_json, load_config, parse_config
from tests.helpers import recipe_before_extensions

REPO = Path(__file__).resolve().parents[3]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_validates() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ must hold at least the demo config"
    for path in configs:
        assert isinstance(load_config(path), PipelineConfig)


def test_unknown_field_is_named_by_its_dotted_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "distill:\n  temprature: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "distill.temprature" in str(err.value)
    assert "unknown field" in str(err.value)


def test_every_error_is_reported_not_only_the_first(tmp_path: Path) -> None:
    path = _write(tmp_path, "gate:\n  min_accuracy: 1.5\nteacher:\n  train:\n    epochs: zero\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "gate.min_accuracy" in text and "teacher.train.epochs" in text
    assert "2 invalid field(s)" in text


def test_dotted_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "distill:\n  train: {epochs: 3}\n  losses:\n"
        "    - {name: kd, weight: 0.9, params: {temperature: 2}}\n    - {name: ce, weight: 0.1}\n",
    )
    cfg = load_config(
        path,
        [
            "distill.train.epochs=4",
            "student.model.params={width: 8, depth: 1}",
            "distill.losses.0.params.temperature=6",
            "distill.losses.1.weight=0.5",
        ],
    )
    assert cfg.distill.train.epochs == 4
    assert cfg.student.model.params == {"width": 8, "depth": 1}
    assert cfg.distill.losses[0].params == {"temperature": 6} and cfg.distill.losses[1].weight == 0.5
    with pytest.raises(ConfigError, match="distill.train.epochs"):
        load_config(path, ["distill.train.epochs=0"])
    with pytest.raises(ConfigError, match="expected dotted.path=value"):
        load_config(path, ["distill.train.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(path, ["distill.train.epochs.x=1"])
    with pytest.raises(ConfigError, match="distill.losses has 2 item"):
        load_config(path, ["distill.losses.5.weight=1"])


def test_loss_terms_are_validated() -> None:
    with pytest.raises(ConfigError, match="distill.losses: .*at least 1"):
        parse_config({"distill": {"losses": []}})
    with pytest.raises(ConfigError, match="every weight is 0"):
        parse_config({"distill": {"losses": [{"name": "kd", "weight": 0}]}})
    with pytest.raises(ConfigError, match=r"distill.losses.0.weight"):
        parse_config({"distill": {"losses": [{"name": "kd", "weight": -1}]}})
    assert not parse_config({"distill": {"losses": [{"name": "ce"}]}}).distill.uses_teacher


def test_teacher_source_needs_a_matching_uri() -> None:
    with pytest.raises(ConfigError, match="source 'mlflow' needs uri: models:/"):
        parse_config({"teacher": {"source": "mlflow", "uri": "runs:/abc/model"}})
    with pytest.raises(ConfigError, match="source 'checkpoint' needs uri"):
        parse_config({"teacher": {"source": "checkpoint"}})
    with pytest.raises(ConfigError, match="uri is only read when source"):
        parse_config({"teacher": {"uri": "models:/t@champion"}})
    assert (
        parse_config({"teacher": {"source": "mlflow", "uri": "models:/t@champion"}}).teacher.uri == "models:/t@champion"
    )


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- just\n- a list\n"))


def test_a_step_augment_replaces_data_augment_for_that_step_only() -> None:
    cfg = parse_config(
        {"data": {"augment": {"noise_std": 0.1}}, "teacher": {"train": {"augment": {"random_crop_padding": 2}}}}
    )
    teacher, where = cfg.augment_of("teacher")
    assert (teacher.random_crop_padding, teacher.noise_std, where) == (2, 0.0, "teacher.train.augment")
    student, where = cfg.augment_of("distill")
    assert (student.noise_std, where) == (0.1, "data.augment")
    # An empty step augment turns augmentation off for that step (it is set, so it replaces data.augment).
    off = parse_config({"data": {"augment": {"noise_std": 0.1}}, "distill": {"train": {"augment": {}}}})
    assert not off.augment_of("distill")[0].enabled
    # Part of the recipe when set; an unset one does not move the hash of a config that never had it.
    assert cfg.config_hash() != parse_config({"data": {"augment": {"noise_std": 0.1}}}).config_hash()
    assert off.config_hash() != parse_config({"data": {"augment": {"noise_std": 0.1}}}).config_hash()
    with pytest.raises(ConfigError, match="teacher.train.augment.noise_std"):
        parse_config({"teacher": {"train": {"augment": {"noise_std": -1}}}})


def test_keep_last_is_part_of_the_recipe_and_refuses_patience() -> None:
    plain = parse_config({})
    assert parse_config({"distill": {"train": {"keep": "best"}}}).config_hash() == plain.config_hash()
    # The default is left out of the hash, so configs written before the field keep theirs.
    assert plain.distill.train.keep == "best" and plain.teacher.train.keep == "best"
    dump = recipe_before_extensions(plain)
    legacy = hashlib.sha256(json.dumps(dump, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert plain.config_hash() == legacy
    last = parse_config({"distill": {"train": {"keep": "last"}}})
    assert last.distill.train.keep == "last" and last.config_hash() != plain.config_hash()
    with pytest.raises(ConfigError, match="distill.train.*remove patience, or set keep: best"):
        parse_config({"distill": {"train": {"keep": "last", "patience": 3}}})
    # Every step re-reads the config from its full JSON dump, patience included.
    assert config_from_json(last.to_json()) == last
    with pytest.raises(ConfigError, match="teacher.train.keep"):
        parse_config({"teacher": {"train": {"keep": "final"}}})


def test_splits_must_leave_training_data() -> None:
    with pytest.raises(ConfigError, match="val_fraction \\+ data.test_fraction"):
        parse_config({"data": {"val_fraction": 0.45, "test_fraction": 0.4}})


def test_json_round_trip_and_hash() -> None:
    cfg = parse_config({"distill": {"train": {"epochs": 3}}})
    again = config_from_json(cfg.to_json())
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    # Where results are tracked is not part of the recipe; how the model is made is.
    moved = parse_config({"distill": {"train": {"epochs": 3}}, "tracking": {"experiment": "elsewhere"}})
    assert moved.config_hash() == cfg.config_hash()
    assert parse_config({"distill": {"train": {"epochs": 5}}}).config_hash() != cfg.config_hash()


def test_flat_params_use_dotted_keys() -> None:
    flat = PipelineConfig().flat()
    assert flat["distill.losses"] == [
        {"name": "kd", "weight": 0.25, "params": {"temperature": 2.0}},
        {"name": "ce", "weight": 0.75, "params": {}},
    ]
    assert flat["teacher.model.params.width"] == 256
    assert flat["evaluate.batch_sizes"] == [1, 64]


def test_importing_config_loads_no_heavy_library_and_nothing_above_it() -> None:
    # A gate task only reads the config: it must not pay for torch or mlflow. And config sits
    # below models/compress: it may load kd_lib's errors and plugins modules, nothing else.
    probe = (
        "import json, sys; import kd_lib.config; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'mlflow', 'numpy', 'pandas', 'kd_lib'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout)
    heavy = [m for m in loaded if not m.startswith("kd_lib")]
    assert heavy == [], f"import kd_lib.config loaded {heavy}"
    allowed = ("kd_lib", "kd_lib.errors", "kd_lib.plugins")
    above = [m for m in loaded if m.startswith("kd_lib") and m not in allowed and not m.startswith("kd_lib.config")]
    assert above == [], f"kd_lib.config imports layers above it: {above}"


def test_the_package_re_exports_every_section() -> None:
    import kd_lib.config as config

    for name in config.__all__:
        assert getattr(config, name) is not None, name
    # Each section's models are importable from the package, whatever module now holds them.
    assert config.SweepConfig.__module__ == "kd_lib.config.sweep"
    assert config.PipelineConfig.__module__ == "kd_lib.config.pipeline"


# ---------------------------------------------------------------- quantize: candidates and selection


def test_the_default_candidates_are_torch_fp32_and_the_onnx_runtime_artifacts() -> None:
    q = PipelineConfig().quantize
    assert q.scheme == "auto" and q.select == "fastest"
    assert q.candidates == ["none", "onnx_fp32", "onnx_static_int8", "onnx_dynamic_int8"]


def test_the_torch_scheme_names_config_knows_are_the_registered_ones() -> None:
    from kd_lib.compress.quantization import QUANTIZERS, SCHEMES
    from kd_lib.config import TORCH_SCHEMES

    assert set(TORCH_SCHEMES) == set(SCHEMES) == set(QUANTIZERS.names())


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ({"auto_order": ["static_int8"]}, "quantize.auto_order was replaced by quantize.candidates"),
        ({"candidates": ["onnx_fp32", "onnx_int4"]}, "quantize.candidates: unknown scheme(s) ['onnx_int4']"),
        ({"candidates": ["none", "none"]}, "listed more than once"),
        ({"candidates": []}, "at least 1 item"),
        ({"scheme": "int3"}, "quantize.scheme: unknown scheme(s) ['int3']"),
        ({"select": "cheapest"}, "'fastest' or 'smallest'"),
        ({"backend": "x86"}, "quantize.backend names a backend of one torch scheme"),
        ({"scheme": "onnx_fp32", "backend": "x86"}, "scheme 'onnx_fp32' has none"),
    ],
)
def test_quantize_mistakes_name_the_field(quantize: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate({"quantize": quantize})
    assert message in str(err.value)


def test_new_fields_at_their_defaults_leave_the_config_hash_alone() -> None:
    base = PipelineConfig()
    same = PipelineConfig.model_validate(
        {"quantize": {"select": "fastest"}, "gate": {"min_speedup": None}, "distill": {"promote": "better"}}
    )
    assert same.config_hash() == base.config_hash()
    for changed in (
        {"quantize": {"select": "smallest"}},
        {"quantize": {"candidates": ["none", "onnx_fp32"]}},
        {"gate": {"max_latency_ms": 5.0}},
        {"gate": {"min_speedup": 2.0}},
        {"distill": {"promote": "kd"}},
    ):
        assert PipelineConfig.model_validate(changed).config_hash() != base.config_hash(), changed


def test_a_transfer_set_is_part_of_the_recipe_and_needs_a_teacher_term_and_the_data_format() -> None:
    text = {"source": "reviews.csv", "text_column": "text"}
    plain = parse_config({"data": text})
    with_set = parse_config({"data": text, "distill": {"transfer_source": "s3://bucket/unlabeled.jsonl"}})
    assert with_set.distill.transfer_source == "s3://bucket/unlabeled.jsonl"
    assert with_set.config_hash() != plain.config_hash()
    assert parse_config({"data": text, "distill": {"transfer_source": None}}).config_hash() == plain.config_hash()
    images = parse_config({"data": {"source": "d.npz"}, "distill": {"transfer_source": "more.npz"}})
    assert images.distill.transfer_source == "more.npz"
    assert parse_config({"data": {"source": "imgs/"}, "distill": {"transfer_source": "unlabeled"}})
    for distill, data, message in (
        ({"losses": [{"name": "ce"}]}, text, "distill.transfer_source: .* no teacher term .* remove transfer_source"),
        (
            {"losses": [{"name": "kd", "weight": 0.0}, {"name": "ce"}]},
            text,
            "no teacher term",
        ),
        ({"losses": [{"name": "dkd"}, {"name": "kd"}]}, text, "dkd needs each sample's true class"),
        ({}, {"source": "d.npz"}, r"must have the format of data.source 'd.npz' \(csv vs npz\)"),
        ({}, {"source": "digits"}, "export the digits to an .npz"),
        ({"transfer_source": "more.npz"}, text, "text data .* needs a .csv, .parquet or .jsonl file"),
        ({"transfer_source": "gs://b/u.csv"}, text, "only local paths and s3://"),
    ):
        tree = {"data": data, "distill": {"transfer_source": "unlabeled.csv"} | distill}
        with pytest.raises(ConfigError, match=message):
            parse_config(tree)


# The default distill.losses before issue #19 (Hinton's 0.9/0.1 at T=4), and the hash that a config
# spelling them out had then (and must keep: it sets its losses, so its recipe did not change).
OLD_DEFAULT_LOSSES = [{"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}, {"name": "ce", "weight": 0.1}]
OLD_DEFAULT_HASH = "e41f229c9807ee71c56d1b6dab5d3ac0c22bb4bf7c51428e6fd5d1cd2b125847"


def test_changing_the_default_losses_moved_only_the_hash_of_configs_that_leave_them_unset() -> None:
    from kd_lib.config.train import DEFAULT_LOSSES

    explicit_old = parse_config({"distill": {"losses": OLD_DEFAULT_LOSSES}})
    assert explicit_old.config_hash() == OLD_DEFAULT_HASH
    # A config relying on the default now trains with the new recipe, so its hash moved, on purpose:
    # equal hashes would claim the same recipe for different students.
    relying = PipelineConfig()
    assert (
        [t.model_dump() for t in relying.distill.losses]
        == [{"params": {}, **term} for term in DEFAULT_LOSSES]
        != OLD_DEFAULT_LOSSES
    )
    assert relying.config_hash() != OLD_DEFAULT_HASH
    # ... and is exactly the hash of the same config with the new default spelt out.
    spelt_out = parse_config({"distill": {"losses": [dict(term) for term in DEFAULT_LOSSES]}})
    assert relying.config_hash() == spelt_out.config_hash()


def test_transformer_losses_and_teacher_init_need_transformer_archs() -> None:
    bert = {"arch": "transformer", "params": {"layers": 2}}
    text = {"source": "movie_toy", "text_column": "text"}
    recipe = {
        "data": text,
        "teacher": {"model": bert},
        "student": {"model": bert, "init_from_teacher": True},
        "distill": {"losses": [{"name": "kd"}, {"name": "hidden_mse", "params": {"layers": [[1, 2]]}}]},
    }
    ok = parse_config(recipe)
    recipe["student"] = {"model": bert}
    assert ok.student.init_from_teacher and ok.config_hash() != parse_config(recipe).config_hash()
    with pytest.raises(ConfigError, match="attention_kl, hidden_mse read.*student.model.arch is 'textcnn'"):
        parse_config(
            {
                "data": text,
                "teacher": {"model": bert},
                "student": {"model": {"arch": "textcnn"}},
                "distill": {"losses": [{"name": "hidden_mse"}, {"name": "attention_kl"}]},
            }
        )
    with pytest.raises(ConfigError, match="student.init_from_teacher read.*teacher.model.arch is 'bilstm'"):
        parse_config(
            {
                "data": text,
                "teacher": {"model": {"arch": "bilstm"}},
                "student": {"init_from_teacher": True, "model": bert},
            }
        )
