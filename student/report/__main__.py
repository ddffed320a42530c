"""`python -m student.report RUN`: write RUN/report.md and RUN/plots/*.png."""
from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def main(run_dir):
    """Loss curves, expert load and teacher-vs-student tables of a run directory."""
    from student.report.render import build_report

    click.echo(build_report(run_dir))


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.report")
