"""Does distillation pay on real text? TF-IDF anchor, transformer teacher, scratch and KD students, int8.

On ``--data`` (default ``../shared/datasets/movie_snippets.csv``: 10,568 movie-review sentences,
binary sentiment; see ``../shared/datasets/README.md``), optionally subsampled to ``--rows``
(stratified, seeded), with kdflow's own seeded stratified split and a tokenizer built from the
train split only (``kd_lib.data.dataset.prepare``):

- ``tfidf_lr``: TF-IDF (unigrams + bigrams) and logistic regression on the raw train texts, the
  classical anchor every neural number should be read against;
- ``teacher``: a small BERT-style ``transformer`` trained from scratch (one per seed);
- ``scratch``: the student (``--student``, a 1-layer transformer by default) trained with
  cross-entropy alone;
- ``kd``: the same student, same initial weights and batch order, distilled from that seed's
  teacher (Hinton KD, T=4, alpha=0.9);
- ``kd_int8``: the KD student exported to ONNX (int64 ids, dynamic batch and sequence axes) and
  quantized by ONNX Runtime dynamic int8: its test accuracy, bytes and p50 latency (1 thread,
  batch 1 and 32, ids of length max_length).

Reported: test accuracy mean and standard deviation over ``--seeds``, KD minus scratch per seed,
parameters, bytes and latency. Prints a table and writes JSON to ``bench/results/``. Not part of
``make test``. Missing from this first version: the KD + transfer-set arm (distilling on extra
unlabeled text the teacher labels), and a tuning grid (one recipe per arm).

    python bench/kd_text.py --rows 3000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.compress import onnx_runtime  # noqa: E402
from kd_lib.config import DataConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.data.dataset import prepare, read_source  # noqa: E402
from kd_lib.evaluate.metrics import latency_ms, predict  # noqa: E402
from kd_lib.models.builders import build_model, count_parameters  # noqa: E402
from kd_lib.train import loop  # noqa: E402
from kd_lib.train.losses import build_objective  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "movie_snippets.csv"
TEACHER = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 256, "dropout": 0.1}
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "transformer": ("transformer", {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "dropout": 0.1}),
    "textcnn": ("textcnn", {"embedding": 32, "kernel_sizes": [3, 5], "channels": 32, "dropout": 0.1}),
}


def subsample(data: Path, rows: int | None, seed: int, out: Path) -> Path:
    """A stratified seeded subsample of ``data`` (all of it when ``rows`` is None) as a CSV."""
    import pandas as pd  # the bench only

    df = pd.read_csv(data)[["text", "label"]]
    if rows is not None and rows < len(df):
        share = rows / len(df)
        df = df.groupby("label", group_keys=False).sample(frac=share, random_state=seed)
    df.to_csv(out, index=False)
    return out


def tfidf_anchor(cfg: DataConfig, test_texts: list[str], y_test: np.ndarray, class_names: list[str]) -> float:
    """Test accuracy of TF-IDF (1-2 grams) + logistic regression fit on the train split's texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from kd_lib.data.dataset import stratified_split

    with tempfile.TemporaryDirectory() as scratch:
        labelled = read_source(cfg.source, cfg, scratch)
    assert labelled.texts is not None
    train, _, _ = stratified_split(labelled.y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1), LogisticRegression(C=4.0, max_iter=2000))
    model.fit([labelled.texts[i] for i in train], labelled.y[train])
    return float((model.predict(test_texts) == y_test).mean())


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pad: int) -> float:
    return float((predict(model, x, pad_id=pad) == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=None, help="stratified subsample (default: every row)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=15)
    parser.add_argument("--student", choices=sorted(STUDENTS), default="transformer")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kd_text.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        source = subsample(args.data, args.rows, 0, Path(tmp) / "data.csv")
        cfg = DataConfig(source=str(source), text_column="text", max_length=args.max_length, tokenizer="train")
        splits = prepare(cfg)
        assert splits.meta.text is not None and splits.test_texts is not None
        anchor = tfidf_anchor(cfg, splits.test_texts, splits.y["test"], splits.meta.class_names)
    text = splits.meta.text
    pad, shape, classes = text.pad_id, (args.max_length,), splits.meta.num_classes
    x = {k: torch.from_numpy(v) for k, v in splits.x.items()}
    y = {k: torch.from_numpy(v) for k, v in splits.y.items()}
    data_params = {"vocab_size": text.vocab_size, "pad_id": pad}
    student_arch, student_params = STUDENTS[args.student]
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        teacher_cfg = TrainConfig(
            epochs=args.teacher_epochs, batch_size=32, lr=0.002, optimizer="adamw", scheduler="cosine", seed=seed
        )
        student_cfg = teacher_cfg.model_copy(update={"epochs": args.student_epochs, "lr": 0.003})
        torch.manual_seed(seed)
        teacher = build_model("transformer", TEACHER | data_params, shape, classes)
        fitted = loop.train_supervised(teacher, x["train"], y["train"], x["val"], y["val"], teacher_cfg, pad_id=pad)
        row: dict[str, Any] = {"seed": seed, "teacher": accuracy(fitted.model, x["test"], y["test"], pad)}
        row["teacher_params"] = count_parameters(fitted.model)
        students = {}
        for arm, losses in (
            ("scratch", [LossTermConfig(name="ce")]),
            (
                "kd",
                [
                    LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}),
                    LossTermConfig(name="ce", weight=0.1),
                ],
            ),
        ):
            torch.manual_seed(seed)  # the same initial weights for both arms
            student = build_model(student_arch, student_params | data_params, shape, classes)
            teacher_model = fitted.model if arm == "kd" else None
            result = loop.distill(
                student,
                teacher_model,
                build_objective(losses),
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                student_cfg,
                pad_id=pad,
            )
            students[arm] = result.model
            row[arm] = accuracy(result.model, x["test"], y["test"], pad)
        row["student_params"] = count_parameters(students["kd"])
        row["kd_minus_scratch"] = row["kd"] - row["scratch"]
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = onnx_runtime.export_fp32_onnx(students["kd"], shape, {}, Path(tmp) / "fp32.onnx", token_ids=True)
            int8 = onnx_runtime.quantize_onnx_file(fp32, Path(tmp) / "int8.onnx", "onnx_dynamic_int8", [])
            ort_int8 = onnx_runtime.OrtModule.from_file(int8)
            row["kd_int8"] = accuracy(ort_int8, x["test"], y["test"], pad)
            row["bytes"] = {"kd_onnx_fp32": fp32.stat().st_size, "kd_onnx_int8": int8.stat().st_size}
            example = x["test"][:1]  # ids at the full max_length, as the quantize step times them
            row["latency_p50_ms"] = {
                f"{name}_b{bs}": latency_ms(model, example, batch_size=bs, warmup=3, iters=20, threads=1)["p50"]
                for name, model in (("kd_torch_fp32", students["kd"]), ("kd_onnx_int8", ort_int8))
                for bs in (1, 32)
            }
        runs.append(row)
        print(json.dumps(row), flush=True)

    def stat(key: str) -> str:
        values = [r[key] for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):6.2f} ± {100 * sd:5.2f}"

    print(f"\n{args.data.name}: {sum(splits.meta.sizes.values())} rows, sizes {splits.meta.sizes}, seeds {args.seeds}")
    print(f"{'arm':<16}{'test accuracy %':>20}")
    print(f"{'tfidf_lr':<16}{100 * anchor:>14.2f}")
    for key in ("teacher", "scratch", "kd", "kd_int8", "kd_minus_scratch"):
        print(f"{key:<16}{stat(key):>20}")
    summary = {
        "data": str(args.data),
        "rows": sum(splits.meta.sizes.values()),
        "sizes": splits.meta.sizes,
        "max_length": args.max_length,
        "vocab_size": text.vocab_size,
        "teacher": TEACHER,
        "student": {"arch": student_arch, "params": student_params},
        "epochs": {"teacher": args.teacher_epochs, "student": args.student_epochs},
        "tfidf_lr": anchor,
        "runs": runs,
        "machine": platform.platform(),
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
