"""One module per DAG step: paths in, paths out, one nested MLflow run each.

``prepare_data``, ``train_teacher``, ``import_teacher``, ``distill``, ``quantize``,
``evaluate``, ``gate``, ``select``, ``register`` and ``finalize`` each hold the function of
that name, which the KFP component of the step calls (and tests call directly). Each reads
its inputs from artifact directories, does the work with the pure modules (data, models,
training, quantization, evaluation, gates) and writes its outputs to the directories it is
given. Nothing is passed through globals or shared paths.

Import the step's own module (``from kd_lib.steps.gate import gate``): this package imports
nothing, so a task loads only what its step needs (the gate, select, register and finalize
tasks start without torch). Shared parts: ``common`` (torch-free), ``inputs`` (tensors, the
teacher), ``training_run`` (what the two training steps share, the ranks included).
"""
