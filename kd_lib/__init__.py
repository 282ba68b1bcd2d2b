"""kd_lib: the kdflow library of building blocks for knowledge distillation.

Models, losses, training loops, quantization, evaluation and promotion gates live here as
plain functions on tensors and files, so they can be tested without Kubeflow or MLflow.
Only ``tracking`` and ``model_registry`` talk to MLflow; nothing in kd_lib imports kfp.
"""

__version__ = "0.1.0"
