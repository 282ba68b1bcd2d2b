"""KFP v2 components: one thin adapter per DAG step over ``kd_lib.steps``.

Every component runs in the one kdflow image (nothing pip-installed when a step starts) and
imports kd_lib inside its body, because KFP ships only the function's source to the task.
"""

from components.distill import distill
from components.evaluate import evaluate
from components.finalize import finalize
from components.gate import gate
from components.import_teacher import import_teacher
from components.prepare_data import prepare_data
from components.quantize import quantize
from components.register import register
from components.select import select
from components.sweep_items import sweep_items
from components.train_teacher import train_teacher

__all__ = [
    "distill",
    "evaluate",
    "finalize",
    "gate",
    "import_teacher",
    "prepare_data",
    "quantize",
    "register",
    "select",
    "sweep_items",
    "train_teacher",
]
