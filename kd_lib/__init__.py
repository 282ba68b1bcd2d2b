"""kd_lib: the kdflow library of building blocks for knowledge distillation.

Models, losses, training loops, quantization, evaluation and promotion gates live here as
plain functions on tensors and files, so they can be tested without Kubeflow or MLflow.
Only ``kd_lib.adapters`` talks to MLflow and object storage; nothing in kd_lib imports kfp.

This package module imports nothing: every pipeline task imports it, and a task should load
only what its own step needs (``from kd_lib.steps.gate import gate``).
"""

__version__ = "0.1.0"
