"""A recipe stage's data plane as one Ray Dataset: sources -> mix -> preprocess -> annotate.

`build_stage_data` reads and mixes the stage's sources into one table of records on the driver
(deterministic for the seed; records are small: image paths, or a few hundred bytes of PNG per row
in the shapes world), hands it to Ray Data in blocks of a few batches, and chains the
preprocessing actor pool and, when the stage's loss needs the teacher, the async annotation pool
with the teacher-output cache. The result goes to a TorchTrainer as `datasets={"train": ds}`;
each pass over it (an epoch) re-runs preprocessing and annotation in a stream, with the cache
turning every repeated annotation into a read. The stage's `DataLedger` counts every row; call
`StageData.close_pass()` after each pass (the worker helper in `actors.feeding` and `finish()` do).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from actors.annotate import AnnotateConfig, AnnotationPlan, Annotator, annotation_plan
from actors.cache import CacheKey, TeacherCache
from actors.mixing import mix_sources
from actors.preprocess import PreprocessConfig, Preprocessor, ProcessorSpec, image_seq_length_of
from actors.recipe import Recipe
from actors.rejects import DataLedger, close_pass
from actors.sources import load_source

__all__ = ["DataPlaneConfig", "StageData", "teacher_key", "build_stage_data", "stage_dataset", "processor_for_run"]


@dataclass(frozen=True)
class DataPlaneConfig:
    """Knobs of the data plane; defaults fit a 2-core box next to 2 Train workers and a Serve replica."""

    batch_size: int = 32  # rows per UDF call
    max_length: int = 1024  # tokens after image-token expansion
    preprocess_actors: tuple[int, int] = (1, 2)  # (min, max) actor pool
    preprocess_cpus: float = 0.5  # logical CPUs per preprocessing actor
    annotate_actors: tuple[int, int] = (1, 1)
    annotate_cpus: float = 0.25  # mostly waiting on the teacher
    max_in_flight: int = 8  # teacher requests outstanding per annotation actor
    top_k: int = 64
    cache_mode: str = "hybrid"  # hybrid | read | off
    teacher_timeout_s: float = 120.0
    teacher_retries: int = 3
    max_reject_rate: float = 0.01
    min_rows_to_judge: int = 200  # the reject rate stops a pass early only after this many rows


@dataclass
class StageData:
    """What a stage trains on, and the bookkeeping that goes with it."""

    stage: str
    dataset: object  # ray.data.Dataset
    planned_rows: int  # rows per pass before rejects
    ledger: object  # DataLedger actor handle
    out_dir: Path
    plan: AnnotationPlan | None
    key: CacheKey | None
    sizes: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)

    def __iter__(self):  # `ds, rows = stage_dataset(...)`
        return iter((self.dataset, self.planned_rows))

    def trainer_datasets(self) -> dict:
        return {"train": self.dataset}

    def close_pass(self, complete: bool = True) -> dict:
        """Check the pass's balance and reject rate; write rejects.parquet and data_stats.json.
        complete=False for a pass the trainer stopped early (only per-operator balances hold)."""
        return close_pass(self.ledger, complete)


def teacher_key(app_name: str, tokenizer, top_k: int, *, timeout_s: float = 60.0) -> CacheKey:
    """Ask the teacher who it is; refuse a teacher whose tokenizer differs from ours."""
    from teacher_service.client import TeacherClient
    from teacher_service.identity import TokenizerHashMismatch, tokenizer_hash

    info = TeacherClient(app_name, timeout_s=timeout_s).info()
    ours = tokenizer_hash(tokenizer)
    if info.tokenizer_hash != ours:
        raise TokenizerHashMismatch(
            f"teacher app {app_name!r} ({info.model_id}) uses tokenizer {info.tokenizer_hash} ({info.vocab_size} ids), "
            f"the data plane tokenizes with {ours} ({len(tokenizer)} ids): distillation over different token ids is "
            f"meaningless")
    return CacheKey(teacher_model_id=info.model_id, tokenizer_hash=info.tokenizer_hash, top_k=int(top_k))


def build_stage_data(
    recipe: Recipe,
    stage: str,
    *,
    processor: ProcessorSpec,
    out_dir: str | Path,
    variables: dict[str, str] | None = None,
    teacher_app: str | None = None,
    cache_dir: str | Path | None = None,
    key: CacheKey | None = None,
    config: DataPlaneConfig = DataPlaneConfig(),
    seed: int | None = None,
) -> StageData:
    """The stage's training rows as a Ray Dataset (lazy, streamed each pass).

    teacher_app: the Serve app to annotate with (needed unless the stage needs no teacher, or
    cache_mode="read" with `key` given). key: the expected teacher identity; by default asked from
    the teacher app. out_dir: where rejects.parquet and data_stats.json go (RUN/stages/<stage>).
    """
    import ray.data

    if stage not in recipe.stages:
        raise ValueError(f"recipe {recipe.name!r} has no stage {stage!r}; it has {sorted(recipe.stages)}")
    spec = recipe.stages[stage]
    seed = recipe.seed if seed is None else seed
    plan = annotation_plan(stage, spec.loss, top_k=config.top_k)
    preference = stage == "preference"

    names = [s.name for s in spec.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"stage {stage!r}: source names must be unique, got {names}")
    tables = {s.name: load_source(s, variables) for s in spec.sources}
    mixed, sizes, rates = mix_sources(tables, {s.name: s.weight for s in spec.sources}, seed, repeat=spec.repeat)
    planned = mixed.num_rows
    step = max(1, config.batch_size * 4)  # blocks of a few batches: actors share the pass evenly
    blocks = [mixed.slice(i, step) for i in range(0, planned, step)] or [mixed]
    records = ray.data.from_arrow(blocks)

    proc = processor.load()  # on the driver too: the image geometry and tokenizer identity
    ops = ["preprocess"] + (["annotate"] if plan else [])
    out_dir = Path(out_dir)
    ledger = DataLedger.remote(stage, str(out_dir), ops, max_reject_rate=config.max_reject_rate,
                               min_rows_to_judge=config.min_rows_to_judge, expected_rows=planned)

    ds = records.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"config": PreprocessConfig(processor, config.max_length, preference), "ledger": ledger},
        batch_format="pyarrow", batch_size=config.batch_size, zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(min_size=config.preprocess_actors[0], max_size=config.preprocess_actors[1]),
        num_cpus=config.preprocess_cpus,
    )
    if plan is not None:
        if config.cache_mode == "read" and key is None:
            raise ValueError("cache_mode='read' needs the expected teacher key (CacheKey): no teacher is asked")
        if key is None:
            if not teacher_app:
                raise ValueError(f"stage {stage!r} needs the teacher ({plan.signature()}); give teacher_app (a Serve app name)")
            key = teacher_key(teacher_app, proc.tokenizer, config.top_k, timeout_s=config.teacher_timeout_s)
        if cache_dir is not None and config.cache_mode != "off":
            TeacherCache(cache_dir, key, config.cache_mode).open()  # refuse a mismatched cache before any work
        acfg = AnnotateConfig(plan=plan, key=key, image_token_id=int(proc.tokenizer.image_token_id),
                              app_name=teacher_app or "teacher", cache_dir=None if cache_dir is None else str(cache_dir),
                              cache_mode=config.cache_mode, max_in_flight=config.max_in_flight,
                              timeout_s=config.teacher_timeout_s, retries=config.teacher_retries)
        ds = ds.map_batches(
            Annotator, fn_constructor_kwargs={"config": acfg, "ledger": ledger},
            batch_format="numpy", batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=config.annotate_actors[0], max_size=config.annotate_actors[1]),
            num_cpus=config.annotate_cpus,
        )
    ds.context.execution_options.preserve_order = True  # the same rows in the same order every pass
    ray.get(ledger.set_info.remote(
        sources={n: {"rows": sizes[n], "copies_per_row": rates[n]} for n in sizes}, planned_rows=planned, seed=seed,
        annotation=None if plan is None else dataclasses.asdict(plan),
        teacher=None if key is None else dataclasses.asdict(key),
        cache={"dir": None if cache_dir is None else str(cache_dir), "mode": config.cache_mode},
        image_seq_length=image_seq_length_of(proc)))
    return StageData(stage=stage, dataset=ds, planned_rows=planned, ledger=ledger, out_dir=out_dir, plan=plan, key=key,
                     sizes=sizes, rates=rates)


def processor_for_run(recipe: Recipe, run_dir: str | Path) -> ProcessorSpec:
    """The shapes world's processor: its tokenizer and the preset's image geometry."""
    from student.model.presets import get_preset

    vision = get_preset(recipe.model.preset).vision
    tok = Path(run_dir) / "world" / "tokenizer"
    if not tok.exists():
        raise FileNotFoundError(f"{tok} not found: generate the shapes world first (RUN/world)")
    return ProcessorSpec(tokenizer=str(tok), image_size=vision.image_size, patch_size=vision.patch_size)


def stage_dataset(recipe: Recipe, stage: str, run_dir: str | Path, *, teacher: str | None = None,
                  teacher_cache: str | Path | None = None, config: DataPlaneConfig = DataPlaneConfig(),
                  processor: ProcessorSpec | None = None) -> StageData:
    """The run-directory convention: world at RUN/world, rejects and stats in RUN/stages/<stage>/,
    cache at RUN/teacher_cache unless given. Unpacks as `(dataset, planned_rows)`."""
    run = Path(run_dir)
    return build_stage_data(
        recipe, stage, processor=processor or processor_for_run(recipe, run), out_dir=run / "stages" / stage,
        variables={"world": str(run / "world")}, teacher_app=teacher,
        cache_dir=teacher_cache if teacher_cache is not None else run / "teacher_cache", config=config)
