"""Every file that passes between pipeline steps, and nothing else: its layout, reading, writing.

- ``model_dir``: a saved model directory (``spec.json`` + ``weights.bin``); ``ModelSpec``,
  ``read_spec``. Rebuilding the ``nn.Module`` is ``kd_lib.compress.quantization.load_model``.
- ``weights_file``: the pickle-free state-dict format of ``weights.bin``.
- ``dataset_dir``: a prepared dataset directory (``splits.npz`` or, for image folders and
  tables, ``manifest.npz``, + ``meta.json``);
  ``DatasetMeta``, ``Splits``, ``save_splits``, ``load_splits``.
- ``records``: the JSON records ``evaluation.json``, ``decision.json`` and ``history.json``.

Every reader validates and raises ``ArtifactError`` naming the file (and the field). The
names below import neither torch nor numpy (the report and the CLI read specs and records);
``weights_file`` and ``dataset_dir`` are imported as modules where they are needed.
"""

from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import (
    LEGACY_WEIGHTS_FILE,
    REQUIRED_SPEC_KEYS,
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    has_model,
    read_spec,
)
from kd_lib.artifacts.records import (
    DECISION_FILE,
    EVALUATION_FILE,
    GATE_FILE,
    HISTORY_FILE,
    CheckRecord,
    DecisionRecord,
    EpochRecord,
    EvaluationRecord,
    HistoryRecord,
    ModelMetrics,
    parse_decision,
    parse_evaluation,
    parse_history,
    read_decision,
    read_evaluation,
    read_history,
    write_decision,
    write_evaluation,
    write_history,
)

__all__ = [
    "DECISION_FILE",
    "EVALUATION_FILE",
    "GATE_FILE",
    "HISTORY_FILE",
    "LEGACY_WEIGHTS_FILE",
    "REQUIRED_SPEC_KEYS",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "CheckRecord",
    "DecisionRecord",
    "EpochRecord",
    "EvaluationRecord",
    "HistoryRecord",
    "ModelMetrics",
    "ModelSpec",
    "has_model",
    "parse_decision",
    "parse_evaluation",
    "parse_history",
    "read_decision",
    "read_evaluation",
    "read_history",
    "read_spec",
    "write_decision",
    "write_evaluation",
    "write_history",
]
