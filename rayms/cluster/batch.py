"""Batch scoring on Ray Data: read Parquet, score batches on a pool of workers that keep their models, write Parquet.

This is the only module that calls Ray Data, so scoring runs wherever Ray runs: a laptop, or the cluster that
serves the same models (``rayms score --address auto``). What it runs is :mod:`rayms.scoring`.

* ``ray.data.read_parquet`` reads the input (a file or a folder, any scheme :mod:`rayms.storage` knows) with
  each row's file path, so errors can name the file, and cuts it into blocks of ``batch_size`` rows;
  ``map_batches`` hands them to an autoscaling pool of actors (one CPU each, at most ``workers``), each with
  its own :class:`~rayms.scoring.ModelCache`, and each writes the block it scored to a file of its own
  before it takes the next. Not ``write_parquet``: its writes are tasks queued behind the scoring, and a
  stop cancels the queued ones, and blocks already scored were lost (in one test run with one worker, all
  eleven blocks scored before the bad one).
* The input and the output are opened through a filesystem built here (endpoint options included) and used
  by Ray's tasks on every node, which find credentials in their own environment, as any Ray Data job does
  (a local Ray started by ``rayms score`` has the shell's); the workers that download models also get
  ``Settings.storage_env``, as serving's agents do.
* A bad batch stops the run. Every block scored before it stays in the output, whole (written under a
  ``_writing-`` name and renamed; a stop removes what was still being written), ``_FAILED`` holds the error,
  and the error says how many rows were kept. A run that finishes writes ``_SUCCESS``. Readers skip names
  that start with ``_``.
* Ray Data shows its progress: its rich bars on a terminal (with ``rich`` installed), a log line every
  10 s otherwise (``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import ray
import ray.data

from rayms import scoring, storage
from rayms.config import ModelSpec, Settings
from rayms.errors import RaymsError, ScoringError
from rayms.ray_env import LOCAL_RAY_ENV


@dataclass(frozen=True)
class ScoreSummary:
    """What a finished run wrote."""

    output: str
    rows: int
    files: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class _Worker:
    """One Ray Data actor: a batch scorer whose models stay loaded between batches, writing what it scored."""

    def __init__(self, plan: scoring.ScorePlan, specs: Mapping[str, ModelSpec], settings: Settings,
                 max_models: int, source_fs, target_fs, target: str) -> None:
        self._score = scoring.BatchScorer(plan, scoring.ModelCache(specs, settings, max_models),
                                          scoring.FileColumns(source_fs))
        self._target_fs, self._target = target_fs, target

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = self._score(batch)
        name = scoring.write_part(scored, self._target_fs, self._target)
        return pa.table({"file": [name], "rows": [scored.num_rows]})


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Unless this process is connected to Ray already: join the cluster at ``address`` (``auto``: the one
    running on this machine; ``RAY_ADDRESS`` works too), or start a local Ray of ``num_cpus`` with the lean
    settings ``rayms serve`` uses. Returns whether this call connected."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
        return True
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level="warning", log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in LOCAL_RAY_ENV}})
    return True


def disconnect() -> None:
    """Leave Ray (stopping it if this process started it)."""
    ray.shutdown()


def score(input: str, output: str, *, models: Mapping[str, ModelSpec], keys: Sequence[str],
          model: str | None = None, model_column: str | None = None, features: Sequence[str] | None = None,
          outputs: Sequence[str] | None = None, settings: Settings | None = None, batch_size: int = 131072,
          workers: int | None = None, max_models_per_worker: int = 1000, overwrite: bool = False,
          address: str | None = None, num_cpus: int | None = None) -> ScoreSummary:
    """Score the Parquet dataset at ``input`` and write keys plus predictions to the folder ``output``.

    ``models`` maps names to specs (:func:`rayms.scoring.model_specs` gathers them from a server, a model
    repository, a models file). Score every row with ``model``, or each row with the model its
    ``model_column`` names. ``features`` lists the input columns by name; without it every column but the
    keys and the model column is a feature, in the file's order. ``outputs`` picks model outputs
    (``predict``, ``predict_proba``; default: what serving answers). ``output`` must be empty or absent
    unless ``overwrite``. Runs on the Ray this process is connected to, else joins ``address`` or starts a
    local Ray with ``num_cpus`` (see :func:`connect`; it stays up for the next call). ``workers`` caps the
    scoring actors (default: the cluster's CPUs). ``batch_size`` rows are scored together and written as one
    file: the larger, the fewer predict calls each model takes (a batch holds some rows of every model); the
    smaller, the more workers share a small input and the less a stopped run leaves unwritten. The request
    is checked against the input's columns before Ray starts. Raises :class:`ScoringError`."""
    settings = settings or Settings()
    source, source_fs = _location(input, settings)
    target, target_fs = _location(output, settings)
    schema = _schema(source_fs, source, input)
    plan = scoring.plan(schema, source=input, keys=keys, specs=models, model=model, model_column=model_column,
                        features=features, outputs=outputs)
    scoring.prepare_output(target_fs, target, overwrite=overwrite, uri=output)
    connect(address, num_cpus)
    # A worker's ScoringError reaches the caller as itself (Ray Data's default wrapper would drop it), and a
    # terminal shows Ray Data's rich progress bars (with Ray 2.60 its default tqdm bars stay blank in a driver).
    with _data_context(raise_original_map_exception=True, use_ray_tqdm=False, enable_rich_progress_bars=True):
        started = time.monotonic()
        try:
            _run(source, source_fs, target, target_fs, plan=plan, specs=models, settings=settings,
                 with_paths=scoring.PATH_COLUMN not in schema.names,  # else errors name rows only
                 batch_size=batch_size, workers=workers, max_models=max_models_per_worker)
        except Exception as exc:
            cause = _root_cause(exc)
            message = str(cause) if isinstance(cause, RaymsError) else f"{type(cause).__name__}: {cause}"
            rows, files = scoring.settle_output(target_fs, target, error=message)
            raise ScoringError(f"{message} (the run stopped there; {output} keeps the {rows} rows in {files} "
                               f"files scored before, and {scoring.FAILED_MARKER} holds this error)") from cause
    seconds = time.monotonic() - started
    rows, files = scoring.settle_output(target_fs, target)
    return ScoreSummary(output=output, rows=rows, files=files, seconds=round(seconds, 3))


def _run(source: str, source_fs, target: str, target_fs, *, plan: scoring.ScorePlan, specs: Mapping[str, ModelSpec],
         settings: Settings, with_paths: bool, batch_size: int, workers: int | None, max_models: int) -> None:
    dataset = ray.data.read_parquet(source, filesystem=source_fs, columns=plan.columns(), include_paths=with_paths)
    # Ray reads a file into as few blocks as fit its block size (a million rows may be one); blocks of a batch
    # each spread the work over the workers and make the unit that is written, and kept, as a file.
    dataset = dataset.repartition(target_num_rows_per_block=batch_size)
    # The workers download models with the storage environment, as a serving replica's agent does.
    env = {"runtime_env": {"env_vars": dict(settings.storage_env)}} if settings.storage_env else {}
    written = dataset.map_batches(
        _Worker, fn_constructor_kwargs={"plan": plan, "specs": dict(specs), "settings": settings,
                                        "max_models": max_models, "source_fs": source_fs,
                                        "target_fs": target_fs, "target": target},
        batch_size=batch_size, batch_format="pyarrow", num_cpus=1, **env,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers or _cluster_cpus()))
    for _ in written.iter_batches(batch_size=None):  # runs the pipeline; what each block wrote is on disk
        pass


@contextlib.contextmanager
def _data_context(**values):
    """Ray Data's settings for one run, the caller's own restored afterwards."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in values}
    for name, value in values.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _location(uri: str, settings: Settings):
    try:
        return storage.dataset_location(uri, settings=settings)
    except RaymsError as exc:
        raise ScoringError(f"{uri}: {exc}") from exc


def _schema(filesystem, path: str, uri: str) -> pa.Schema:
    """The input's columns, from the first file's footer (before Ray reads anything)."""
    import pyarrow.dataset as pads

    try:
        return pads.dataset(path, filesystem=filesystem, format="parquet").schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise ScoringError(f"{uri}: cannot read it as Parquet: {exc}") from exc


def _cluster_cpus() -> int:
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def _root_cause(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrappers: the first rayms error in the chain, else the last
    exception of it. Ray's task errors keep the original as ``cause``, and may also pose as its class (with
    Ray's traceback as their text), so ``cause`` is followed before the class is looked at."""
    seen, current, last = set(), exc, exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "cause", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        if isinstance(current, RaymsError):
            return current
        last = current
        current = current.__cause__
    return last
