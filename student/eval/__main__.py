"""`python -m student.eval --model PATH --data DIR`: score a checkpoint on a shapes-world split."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
from pathlib import Path

import click

from student.eval.decode import DecodeConfig


def _pct(x) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="HF checkpoint directory (model + processor), e.g. RUN/student or RUN/stages/d2s/hf.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shapes-world directory with <split>/part-*.parquet (e.g. RUN/world).")
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Token budget for captions.")
@click.option("--short-max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Token budget for VQA and POPE answers.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N records.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON here (default: stdout).")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Also write every prediction as JSONL here.")
@click.option("--device", default=None, help="torch device (default: where the model loads, CPU).")
@click.option("--no-progress", is_flag=True)
def main(model_path, data_dir, split, batch_size, max_new_tokens, short_max_new_tokens, limit, out, predictions,
         device, no_progress):
    """VQA accuracy per question type, POPE per negative type, caption hallucination (Resp/Ment)."""
    from student.eval.evaluate import evaluate_checkpoint, write_result

    decode = DecodeConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                          short_max_new_tokens=short_max_new_tokens)
    result = evaluate_checkpoint(model_path, data_dir, split=split, limit=limit, decode=decode,
                                 progress=not no_progress, return_predictions=predictions is not None,
                                 device=device)
    if out:
        write_result(result, out, predictions)
        s = result["summary"]
        click.echo(f"{result['counts']} in {result['time_s']:.1f}s -> {Path(out)}", err=True)
        click.echo(f"VQA {_pct(s['vqa_accuracy'])}  POPE acc {_pct(s['pope_accuracy'])} F1 {_pct(s['pope_f1'])}  "
                   f"caption EM {_pct(s['caption_exact_match'])} Resp {_pct(s['hallucination_resp'])} "
                   f"Ment {_pct(s['hallucination_ment'])}", err=True)
    else:
        preds = result.pop("predictions", None)
        if predictions and preds is not None:
            Path(predictions).write_text("".join(json.dumps(x) + "\n" for x in preds))
        json.dump(result, sys.stdout, indent=2, sort_keys=True, allow_nan=False)
        sys.stdout.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.eval")
