"""The run report: RUN/report.md with PNG plots under RUN/plots/.

load     RUN/metrics.jsonl (deduplicated after resumes) and RUN/eval/<stage>_<who>.json
tables   markdown tables: stage summary, expert load, comprehension, hallucination, student - teacher
plots    loss curves per stage, total loss across stages, expert load per layer (matplotlib, Agg)
render   build_report(run_dir) -> RUN/report.md
CLI      python -m student.report RUN
"""
from student.report.load import read_evals, read_metrics
from student.report.render import build_report

__all__ = ["build_report", "read_evals", "read_metrics"]
