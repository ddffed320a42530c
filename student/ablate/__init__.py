"""The papers' ablations in miniature on the shapes world (LLaVA-MoD Tables 5-8, LLaVA-KD Table 2).

arms       each ablation's arms as stage lists + recipe overrides, and the claims to check
aggregate  mean +- std over seeds, the markdown table, verdicts (pure)
run        plan / execute / collect / write_results over OUT/ (shared teacher, shared identical runs)
CLI        python -m student.ablate NAME|all --out DIR [--seeds 0,1,2] [--max-steps N] [--dry-run]
"""
from student.ablate.aggregate import aggregate, mean_std, results_table, verdict
from student.ablate.arms import ABLATIONS, Ablation, Arm, arm_recipe, get_ablation
from student.ablate.run import AblationConfig, collect, execute, plan, write_results

__all__ = [
    "ABLATIONS",
    "Ablation",
    "AblationConfig",
    "Arm",
    "aggregate",
    "arm_recipe",
    "collect",
    "execute",
    "get_ablation",
    "mean_std",
    "plan",
    "results_table",
    "verdict",
    "write_results",
]
