"""Batch scoring without Ray: which columns to read, which model each row takes, and one batch's predictions.

``rayms score`` and :func:`rayms.score` run these pieces on Ray Data (:mod:`rayms.cluster.batch`); everything
that decides something lives here, on plain pyarrow tables, so it is tested without a cluster. Decisions a
user can observe:

* **Models** come from the sources ``rayms serve`` takes (``--model-repository``, ``--models models.json``,
  ``NAME=URI[:FRAMEWORK]``) or from a running server's ``/v2/repository/index``, which gives each model's
  ``storageUri`` and ``framework`` (not its model-level parameters such as ``predict_proba``; pass
  ``outputs`` instead). They are fetched by :class:`~rayms.agent.ArtifactAgent` into the same per-node cache
  serving uses and loaded by :func:`~rayms.frameworks.load_runtime`: the same bytes, the same answers.
* **One model or many**: ``model`` scores every row with one model; ``model_column`` names each row's model
  (per-segment models). A batch's rows are grouped by model, each group is one predict call, and the answers
  go back to the rows' places. Each worker keeps the models it loaded (LRU, ``max_models`` of them), so a
  model loads once per worker.
* **Features** are taken by name when ``features`` lists columns (in that order), else by order: every
  column that is neither a key nor the model column, in the file's order, which must be the order the model
  was trained on (as in serving, where V2 tensors carry no column names). A single list column holding each
  row's feature vector works too.
* **Output**: the key columns, then one column per model output under its serving name (``predict``,
  ``predict_proba``, an ONNX model's own names): 1-D answers as scalars, ``[N, K]`` answers as lists.
* **Errors** are :class:`~rayms.errors.ScoringError` naming the file, the row (by its key values) and the
  model: a missing column, an unknown or missing model name, a list row of the wrong width, a model that
  cannot load or predict.
* **The output folder** holds one run: it must be empty (or is emptied with ``overwrite``); each block is
  written whole by the worker that scored it (:func:`write_part`), and at the end :func:`settle_output`
  counts what is there and writes ``_SUCCESS`` or ``_FAILED``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayms.agent import ArtifactAgent
from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import RaymsError, ScoringError
from rayms.frameworks import EXTENSIONS, ModelRuntime, framework_from_extension, load_runtime
from rayms.repository import read_models_file, scan_repository

PATH_COLUMN = "path"  # the column Ray Data's ``include_paths`` adds: each row's file, for error messages
SUCCESS_MARKER = "_SUCCESS"
FAILED_MARKER = "_FAILED"
PARTIAL_PREFIX = "_writing-"  # a block's file while it is written


# ------------------------------------------------------------------------------------------ where models come from
def parse_model_arg(text: str) -> tuple[str, ModelSpec | None]:
    """``NAME`` (a model from the other sources) or ``NAME=URI[:FRAMEWORK]`` (a model defined here; the
    framework may be left out for a local file or folder, whose extension tells it)."""
    name, sep, rest = text.partition("=")
    validate_model_name(name.strip())
    if not sep:
        return name.strip(), None
    uri, framework = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail.strip().lower() in (*EXTENSIONS, "scikit-learn", "lgbm"):
        uri, framework = head, tail.strip()
    if not uri:
        raise ScoringError(f"model {name}: {text!r} gives no URI; use NAME=URI[:FRAMEWORK]")
    if framework is None:
        try:
            framework = framework_from_extension(uri)
        except RaymsError as exc:
            raise ScoringError(f"model {name}: {exc}; add the framework as NAME=URI:FRAMEWORK") from exc
    return name.strip(), ModelSpec.parse({"storageUri": uri, "framework": framework}, name=name)


def specs_from_server(url: str, timeout_s: float = 30.0) -> dict[str, ModelSpec]:
    """Every model a running rayms lists in ``/v2/repository/index``, by name (whatever its state)."""
    import requests

    index = f"{url.rstrip('/')}/v2/repository/index"
    try:
        response = requests.post(index, json={}, timeout=timeout_s)
        rows = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise ScoringError(f"cannot read the model index at {index}: {exc}") from exc
    if response.status_code != 200 or not isinstance(rows, list):
        raise ScoringError(f"{index} answered {response.status_code}: {rows}")
    return {row["name"]: ModelSpec.parse({"storageUri": row["storageUri"], "framework": row["framework"]},
                                         name=row["name"])
            for row in rows if row.get("storageUri") and row.get("framework")}


def model_specs(*, url: str | None = None, model_repository: str | None = None, models_file: str | None = None,
                models: Mapping[str, ModelSpec | Mapping] | None = None) -> dict[str, ModelSpec]:
    """The models scoring may use, by name, from any of the sources (later ones win on a shared name): a
    running server's index, a model repository folder, a KServe ``models.json``, and specs given here."""
    specs: dict[str, ModelSpec] = {}
    if url:
        specs |= specs_from_server(url)
    if model_repository:
        found, _problems = scan_repository(model_repository)  # a folder that cannot be read is not scored with
        specs |= found
    if models_file:
        specs |= read_models_file(models_file)
    for name, spec in (models or {}).items():
        specs[validate_model_name(name)] = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec, name=name)
    return specs


# ------------------------------------------------------------------------------------------ which columns
@dataclass(frozen=True)
class ScorePlan:
    """What to read from every batch and what to write; checked against the input's schema by :func:`plan`."""

    keys: tuple[str, ...]
    features: tuple[str, ...]
    model: str | None = None
    model_column: str | None = None
    outputs: tuple[str, ...] | None = None
    list_features: bool = False  # one list column holds each row's feature vector

    def columns(self) -> list[str]:
        """The input columns a batch needs, in order, each once."""
        wanted = [*self.keys, *self.features, *([self.model_column] if self.model_column else [])]
        return list(dict.fromkeys(wanted))


def plan(schema: pa.Schema, *, source: str, keys: Sequence[str], specs: Mapping[str, ModelSpec],
         model: str | None = None, model_column: str | None = None, features: Sequence[str] | None = None,
         outputs: Sequence[str] | None = None, extra_columns: Sequence[str] = ()) -> ScorePlan:
    """Check the request against the input's ``schema`` (of ``source``) before any row is read.

    ``extra_columns`` are columns the reader adds (the file path), never features."""
    if (model is None) == (model_column is None):
        raise ScoringError("name either one model for every row or the column that names each row's model")
    if model is not None and model not in specs:
        raise ScoringError(f"model {model!r} is not among the models given ({_listing(specs)})")
    if not specs:
        raise ScoringError("no models were given: name a server, a model repository, a models file or a model")
    keys = tuple(dict.fromkeys(keys))
    if not keys:
        raise ScoringError("name at least one key column: the output carries it next to the predictions")
    names = [n for n in schema.names if n not in extra_columns]
    named = [*keys, *([model_column] if model_column else []), *(features or [])]
    missing = [c for c in dict.fromkeys(named) if c not in names]
    if missing:
        raise ScoringError(f"{source} has no column {', '.join(map(repr, missing))} (its columns: {', '.join(names)})")
    if features is None:
        features = [n for n in names if n not in keys and n != model_column]
    features = tuple(dict.fromkeys(features))
    if not features:
        raise ScoringError(f"{source} has no feature columns left besides the keys and the model column")
    lists = [c for c in features if pa.types.is_list(schema.field(c).type)
             or pa.types.is_large_list(schema.field(c).type) or pa.types.is_fixed_size_list(schema.field(c).type)]
    if lists and len(features) > 1:
        raise ScoringError(f"feature column {lists[0]!r} holds lists: it must then be the only feature column "
                           f"(the features are {', '.join(features)})")
    return ScorePlan(keys=keys, features=features, model=model, model_column=model_column,
                     outputs=tuple(outputs) if outputs else None, list_features=bool(lists))


def _listing(names: Sequence[str] | Mapping, most: int = 10) -> str:
    names = sorted(names)
    shown = ", ".join(names[:most])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > most else shown or "none"


# ------------------------------------------------------------------------------------------ models per worker
class ModelCache:
    """The models one worker has loaded, least recently used first; loads through the agent and the runtimes."""

    def __init__(self, specs: Mapping[str, ModelSpec], settings: Settings, max_models: int = 1000) -> None:
        self._specs = dict(specs)
        self._settings = settings
        self._max = max_models
        self._loaded: OrderedDict[str, ModelRuntime] = OrderedDict()
        self.loads = 0

    def known(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> ModelRuntime:
        runtime = self._loaded.get(name)
        if runtime is not None:
            self._loaded.move_to_end(name)
            return runtime
        spec = self._specs[name]
        # A fresh agent per load: it is plain asyncio, and each asyncio.run is a new event loop.
        path = asyncio.run(ArtifactAgent(self._settings).fetch(name, spec))
        runtime = load_runtime(spec.framework, path, spec.parameters)
        self.loads += 1
        self._loaded[name] = runtime
        while len(self._loaded) > self._max:
            self._loaded.popitem(last=False)
        return runtime


# ------------------------------------------------------------------------------------------ one batch
class FileColumns:
    """The columns of each input file, read from its footer once per worker.

    A reader that unifies a folder's schemas fills a column one file lacks with nulls; this tells them apart."""

    def __init__(self, filesystem) -> None:
        self._filesystem = filesystem
        self._columns: dict[str, list[str]] = {}

    def __call__(self, path: str) -> list[str]:
        if path not in self._columns:
            self._columns[path] = pq.read_schema(path, filesystem=self._filesystem).names
        return self._columns[path]


class BatchScorer:
    """Scores one batch (a pyarrow table holding at least ``plan.columns()``) and returns keys + predictions.

    ``file_columns`` gives the columns of a file named in the batch's path column, when it has one."""

    def __init__(self, plan: ScorePlan, models: ModelCache,
                 file_columns: Callable[[str], Sequence[str]] | None = None) -> None:
        self.plan = plan
        self.models = models
        self._file_columns = file_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        where = _Where(batch, self.plan.keys)
        self._check_columns(batch, where)
        features = _Features(batch, self.plan, where)
        answers: dict[str, list[pa.Array]] = {}
        order: list[np.ndarray] = []
        for name, rows in self._groups(batch, where):
            if not self.models.known(name):
                raise ScoringError(f"{where.row(rows[0])}: model {name!r} is not among the models given "
                                   f"({_listing(self.models.names())})")
            outputs = self._predict(name, rows, features, where)
            if answers and set(outputs) != set(answers):
                raise ScoringError(f"{where.row(rows[0])}: model {name!r} answers {', '.join(outputs)} where other "
                                   f"models answer {', '.join(answers)}; choose the outputs to write")
            for output, values in outputs.items():
                answers.setdefault(output, []).append(values)
            order.append(rows)
        table = batch.select(list(self.plan.keys))
        if not order:
            return table
        back = np.argsort(np.concatenate(order), kind="stable")  # group order -> the batch's row order
        for output, parts in answers.items():
            if output in self.plan.keys:
                raise ScoringError(f"model output {output!r} has the name of a key column; rename the key")
            table = table.append_column(output, _concat(parts, output).take(pa.array(back)))
        return table

    def _check_columns(self, batch: pa.Table, where: "_Where") -> None:
        needed = self.plan.columns()
        missing = [c for c in needed if c not in batch.column_names]
        if missing:
            raise ScoringError(f"{where.files()}: no column {', '.join(map(repr, missing))} "
                               f"(its columns: {', '.join(c for c in batch.column_names if c != PATH_COLUMN)})")
        if self._file_columns is None or PATH_COLUMN not in batch.column_names:
            return
        for path in pc.unique(batch.column(PATH_COLUMN)).to_pylist():
            columns = self._file_columns(path)
            missing = [c for c in needed if c not in columns]
            if missing:
                raise ScoringError(f"file {path}: no column {', '.join(map(repr, missing))} "
                                   f"(its columns: {', '.join(columns)})")

    def _groups(self, batch: pa.Table, where: "_Where"):
        """``(model name, row positions)`` per model in the batch, in the order the models first appear."""
        if self.plan.model is not None:
            yield self.plan.model, np.arange(batch.num_rows)
            return
        column = batch.column(self.plan.model_column)
        if column.null_count:
            first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ScoringError(f"{where.row(first)}: column {self.plan.model_column!r} names no model (null)")
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            column = pc.cast(column, pa.string())
        encoded = column.combine_chunks().dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        labels = encoded.dictionary.to_pylist()
        by_code = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes, minlength=len(labels)))[:-1]
        for code, rows in enumerate(np.split(by_code, bounds)):
            if len(rows):
                yield labels[code], rows

    def _predict(self, name: str, rows: np.ndarray, features: "_Features",
                 where: "_Where") -> dict[str, pa.Array]:
        try:
            runtime = self.models.get(name)
        except RaymsError as exc:
            raise ScoringError(f"model {name!r} cannot load (needed by {where.row(rows[0])}): {exc}") from exc
        matrix = features.matrix(rows, name, runtime)
        try:
            result = runtime.predict([matrix], requested=self.plan.outputs)
        except RaymsError as exc:
            raise ScoringError(f"{where.row(rows[0])} and the other {len(rows) - 1} rows of model {name!r} in this "
                               f"batch: {exc}") from exc
        return {output: _to_arrow(values, output, name) for output, values in result.items()}


class _Features:
    """The batch's feature values: a matrix of flat columns, or a list column checked row by row."""

    def __init__(self, batch: pa.Table, plan: ScorePlan, where: "_Where") -> None:
        self._where = where
        self._names = plan.features
        if plan.list_features:
            column = batch.column(plan.features[0]).combine_chunks()
            if column.null_count:
                first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise ScoringError(f"{where.row(first)}: column {plan.features[0]!r} has no features (null)")
            self._lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            # flatten() gives the rows' values end to end (also for a slice), so each row starts where the
            # lengths before it end.
            self._values = column.flatten().to_numpy(zero_copy_only=False)
            self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
            self._matrix = None
        else:
            self._matrix = np.column_stack([batch.column(c).to_numpy() for c in plan.features])

    def matrix(self, rows: np.ndarray, model: str, runtime: ModelRuntime) -> np.ndarray:
        expected = _width(runtime)
        if self._matrix is not None:
            if expected is not None and self._matrix.shape[1] != expected:
                raise ScoringError(f"{self._where.row(rows[0])}: model {model!r} takes {expected} features, the "
                                   f"input gives {self._matrix.shape[1]} ({', '.join(self._names)})")
            return self._matrix[rows]
        lengths = self._lengths[rows]
        width = expected if expected is not None else int(lengths[0])
        wrong = np.flatnonzero(lengths != width)
        if len(wrong):
            row = int(rows[wrong[0]])
            raise ScoringError(f"{self._where.row(row)}: {self._names[0]!r} holds {int(self._lengths[row])} values; "
                               f"model {model!r} takes {width}")
        return self._values[self._starts[rows][:, None] + np.arange(width)]


def _width(runtime: ModelRuntime) -> int | None:
    """How many features the model takes, when its one input is a matrix of known width."""
    inputs = runtime.input_metadata()
    shape = inputs[0].get("shape", []) if len(inputs) == 1 else []
    return int(shape[1]) if len(shape) == 2 and int(shape[1]) > 0 else None


class _Where:
    """Names a batch's file and rows in messages: ``file f.parquet, row id=17``."""

    def __init__(self, batch: pa.Table, keys: Sequence[str]) -> None:
        self._batch = batch
        self._keys = [k for k in keys if k in batch.column_names]

    def files(self) -> str:
        if PATH_COLUMN not in self._batch.column_names or not self._batch.num_rows:
            return "the input"
        files = pc.unique(self._batch.column(PATH_COLUMN)).to_pylist()
        return f"file {files[0]}" if len(files) == 1 else f"files {', '.join(files)}"

    def row(self, position: int) -> str:
        position = int(position)
        key = ", ".join(f"{k}={self._batch.column(k)[position].as_py()!r}" for k in self._keys)
        if PATH_COLUMN in self._batch.column_names:
            return f"file {self._batch.column(PATH_COLUMN)[position].as_py()}, row {key}"
        return f"row {key}"


def _to_arrow(values: np.ndarray, output: str, model: str) -> pa.Array:
    """A model's answer as one Arrow column: 1-D (or ``[N, 1]``) as scalars, ``[N, K]`` as a list per row."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 1:
        return pa.array(values)
    if values.ndim != 2:
        raise ScoringError(f"model {model!r}: output {output!r} has shape {list(values.shape)}; "
                           "only 1-D and 2-D outputs can be written")
    offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _concat(parts: list[pa.Array], output: str) -> pa.Array:
    """One column from the groups' answers; numbers of different types meet in the wider one."""
    types = {p.type for p in parts}
    if len(types) > 1:
        try:
            common = _common_type(types)
            parts = [p.cast(common) for p in parts]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as exc:
            raise ScoringError(f"output {output!r}: models answer types {', '.join(map(str, types))}, which do not "
                               "go in one column") from exc
    return pa.concat_arrays(parts)


def _common_type(types: set[pa.DataType]) -> pa.DataType:
    lists = [t for t in types if pa.types.is_list(t)]
    if lists and len(lists) != len(types):
        raise TypeError("lists and scalars")
    inner = [t.value_type for t in lists] if lists else list(types)
    common = pa.from_numpy_dtype(np.result_type(*[t.to_pandas_dtype() for t in inner]))
    return pa.list_(common) if lists else common


# ------------------------------------------------------------------------------------------ the output folder
def prepare_output(filesystem, path: str, *, overwrite: bool, uri: str) -> None:
    """Make ``path`` an empty folder: refuse one that holds anything unless ``overwrite`` (then empty it), so
    every file in it after a run is that run's."""
    from pyarrow import fs as pafs

    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ScoringError(f"{uri} is a file; the output is a folder")
    if info.type == pafs.FileType.Directory and filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
        if not overwrite:
            raise ScoringError(f"{uri} is not empty; choose another output or overwrite it")
        filesystem.delete_dir_contents(path)
    filesystem.create_dir(path, recursive=True)


def write_part(table: pa.Table, filesystem, folder: str) -> str:
    """Write one scored block as its own file, whole or not at all: under a name readers skip (``_``), then
    renamed into place. Returns the file's name."""
    name = f"part-{uuid.uuid4().hex}.parquet"
    partial = f"{folder.rstrip('/')}/{PARTIAL_PREFIX}{name}"
    with filesystem.open_output_stream(partial) as out:
        pq.write_table(table, out)
    filesystem.move(partial, f"{folder.rstrip('/')}/{name}")
    return name


def settle_output(filesystem, path: str, *, error: str | None = None) -> tuple[int, int]:
    """After a run: remove files a stop left half-written (``_writing-*``, or a footer that cannot be read),
    count the rows of the whole ones, and write the marker, ``_SUCCESS`` or ``_FAILED`` holding ``error``.
    Returns ``(rows, files)`` kept. Readers skip names that start with ``_``."""
    from pyarrow import fs as pafs

    rows = files = 0
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if info.base_name.startswith(PARTIAL_PREFIX):
            filesystem.delete_file(info.path)
            continue
        if not info.base_name.endswith(".parquet"):
            continue
        try:
            with filesystem.open_input_file(info.path) as handle:
                rows += pq.read_metadata(handle).num_rows
            files += 1
        except (OSError, pa.ArrowInvalid):
            filesystem.delete_file(info.path)
    filesystem.create_dir(path, recursive=True)
    marker = f"{path.rstrip('/')}/{FAILED_MARKER if error else SUCCESS_MARKER}"
    with filesystem.open_output_stream(marker) as out:
        out.write((error or "").encode())
    return rows, files
