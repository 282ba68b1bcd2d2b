from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output, OutputPath

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def select(
    config_json: str,
    pipeline_run_id: str,
    candidate_configs: list[str],
    evaluations: Input[list[Artifact]],
    decisions: Input[list[Artifact]],
    quantized_models: Input[list[Model]],
    quantized: Output[Model],
    evaluation: Output[Artifact],
    decision: Output[Artifact],
    summary: Output[Markdown],
    # KFP's documented form is a call, not a subscript (OutputPath[str] is not read by KFP): no stub can type it.
    selected_config: OutputPath(str),  # type: ignore[valid-type]
) -> str:
    """Choose among a sweep's candidates (smallest that passes every gate, Pareto front logged);
    outputs the chosen one's model, evaluation, decision and config; returns the action."""
    from kd_lib.steps.task import task

    with task():
        from pathlib import Path

        from kd_lib.config import config_from_json
        from kd_lib.steps.select import select as run_step

        selection, chosen_config = run_step(
            config_from_json(config_json),
            pipeline_run_id,
            candidate_configs,
            [a.path for a in evaluations],
            [a.path for a in decisions],
            [m.path for m in quantized_models],
            quantized.path,
            evaluation.path,
            decision.path,
            summary.path,
        )
        Path(selected_config).write_text(chosen_config)
        decision.metadata.update(
            {"candidate": selection.chosen.name if selection.chosen else "", "action": selection.action}
        )
        return selection.action
