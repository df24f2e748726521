"""Dataset files read into a :class:`Table`: numeric features X and one label y per row.

Two formats, both what the training service stores as datasets:

- CSV with a header row. Every cell is a number; the label is the column named by the
  plugin's target argument ("label" by default), the features are all the other columns.
- NPZ with arrays ``X`` (2-D, rows x features) and ``y`` (1-D, one label per row), read
  with ``allow_pickle=False``; datasets built from feedback have this form.

Every problem is an InvalidArgument that names the line and column (CSV) or array (NPZ),
and shapes are bounded before anything big is allocated. :func:`bundled` gives the small
datasets that ship inside scikit-learn, without a download.
"""

from __future__ import annotations

import array
import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from services.mesh.errors import InvalidArgument

FORMATS: Final = ("csv", "npz")
DEFAULT_TARGET: Final = "label"
BUNDLED: Final = ("iris", "wine", "breast_cancer", "digits")
"""The datasets scikit-learn ships in its wheel (sklearn.datasets.load_*)."""

MAX_ROWS: Final = 10_000_000
MAX_FEATURES: Final = 100_000
MAX_CELLS: Final = 250_000_000
"""Features a table may hold: about 1 GB as float32."""
MAX_CLASSES: Final = 1000
"""Distinct labels a classifier's dataset may hold."""
_REASON: Final = "BAD_DATASET"
_NUMERIC_KINDS: Final = "biuf"


@dataclass(frozen=True, slots=True, eq=False)
class Table:
    """Features ``X`` (float32, rows x features, all finite) and labels ``y`` (one per row:
    int64 when every label is a whole number, float64 otherwise)."""

    X: NDArray[np.float32]
    y: NDArray[Any]
    columns: tuple[str, ...]
    """The features' names (CSV header, or f0, f1, … for NPZ)."""
    source: str
    """Where it came from, for messages."""

    @property
    def rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def features(self) -> int:
        return int(self.X.shape[1])


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument.for_field("dataset", message, reason=_REASON)


def load(path: Path, format: str, target: str = DEFAULT_TARGET) -> Table:
    """Reads the dataset file at ``path`` in ``format`` ("csv" or "npz"); ``target`` names the
    label column of a CSV file."""
    if format == "csv":
        return load_csv(path, target)
    if format == "npz":
        return load_npz(path)
    raise _bad(f"format must be one of {', '.join(FORMATS)}, not {format!r}")


def inspect(path: Path, format: str) -> tuple[int, int]:
    """(rows, feature columns) of a dataset file, reading all of it so that a file that
    cannot be trained on is refused at upload. The label column of a CSV file is not known
    then: every column is checked, and all but one count as features."""
    if format == "csv":
        header, values = _read_csv(path)
        return values.shape[0], len(header) - 1
    table = load(path, format)
    return table.rows, table.features


# CSV


def load_csv(path: Path, target: str = DEFAULT_TARGET) -> Table:
    header, values = _read_csv(path)
    if target not in header:
        raise _bad(f"{path.name} has no column {target!r} for the labels (columns: {_names(header)})")
    where = header.index(target)
    features = [i for i in range(len(header)) if i != where]
    X = _float32(values[:, features])
    _check_float32(X, path.name)
    return Table(X, _labels(values[:, where]), tuple(header[i] for i in features), path.name)


def _read_csv(path: Path) -> tuple[list[str], NDArray[np.float64]]:
    """The header and every row as float64, or InvalidArgument naming the first bad cell."""
    try:
        source = path.open(encoding="utf-8-sig", newline="")
    except OSError as error:
        raise _bad(f"cannot read {path.name}: {error.strerror}") from None
    with source:
        reader = csv.reader(source)
        try:
            header = [name.strip() for name in next(reader, [])]
            _check_header(header, path.name)
            width = len(header)
            if width > MAX_FEATURES + 1:
                raise _bad(f"{path.name} has {width} columns, more than {MAX_FEATURES + 1}")
            cells = array.array("d")
            rows = 0
            for row in reader:
                if not row:  # a blank line
                    continue
                line = reader.line_num
                if len(row) != width:
                    raise _bad(f"line {line} of {path.name} has {len(row)} values; the header has {width}")
                for column, cell in zip(header, row, strict=True):
                    cells.append(_number(cell, line, column))
                rows += 1
                if rows > MAX_ROWS or rows * width > MAX_CELLS:
                    raise _bad(f"{path.name} has more than {min(MAX_ROWS, MAX_CELLS // width)} rows")
        except csv.Error as error:
            raise _bad(f"line {reader.line_num} of {path.name} is not valid CSV: {error}") from None
        except UnicodeDecodeError:
            raise _bad(f"{path.name} is not UTF-8 text") from None
    if rows == 0:
        raise _bad(f"{path.name} has a header but no rows")
    return header, np.frombuffer(cells, dtype=np.float64).reshape(rows, width)


def _check_header(header: list[str], name: str) -> None:
    if not header:
        raise _bad(f"{name} is empty: a header row of column names comes first")
    if len(header) < 2:
        raise _bad(f"{name} has one column; it needs the label and at least one feature")
    if any(not column for column in header):
        raise _bad(f"{name} has an empty column name in its header")
    if len(set(header)) != len(header):
        twice = sorted({column for column in header if header.count(column) > 1})
        raise _bad(f"{name} names column(s) {_names(twice)} more than once")


def _number(cell: str, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        shown = cell if len(cell) <= 40 else cell[:37] + "..."
        raise _bad(f"line {line}, column {column!r}: {shown!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(f"line {line}, column {column!r}: {cell.strip()!r} is not a finite number")
    return value


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


# NPZ


def load_npz(path: Path) -> Table:
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {name: _npy_header(archive, name, path.name) for name in ("X", "y")}
    except (OSError, zipfile.BadZipFile) as error:
        raise _bad(f"{path.name} is not an NPZ file: {error}") from None
    (x_shape, x_dtype), (y_shape, y_dtype) = shapes["X"], shapes["y"]
    if len(x_shape) != 2:
        raise _bad(f"array X of {path.name} must be 2-D (rows x features), not of shape {x_shape}")
    if len(y_shape) != 1 and not (len(y_shape) == 2 and y_shape[1] == 1):
        raise _bad(f"array y of {path.name} must be 1-D (one label per row), not of shape {y_shape}")
    rows, width = x_shape
    if y_shape[0] != rows:
        raise _bad(f"{path.name} has {rows} rows in X but {y_shape[0]} labels in y")
    _check_size(rows, width, path.name)
    for name, dtype in (("X", x_dtype), ("y", y_dtype)):
        if dtype.kind not in _NUMERIC_KINDS:
            raise _bad(f"array {name} of {path.name} must hold numbers, not {dtype}")
    try:
        with np.load(path, allow_pickle=False) as data:
            X = _float32(np.asarray(data["X"]))
            raw_y = np.asarray(data["y"]).reshape(-1)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise _bad(f"{path.name} cannot be read: {error}") from None
    _check_float32(X, path.name)
    if raw_y.dtype.kind == "f" and not np.isfinite(raw_y).all():
        row = int(np.flatnonzero(~np.isfinite(raw_y))[0])
        raise _bad(f"label {row} of {path.name} is {raw_y[row]}, not a finite number")
    return Table(X, _labels(raw_y.astype(np.float64)), tuple(f"f{i}" for i in range(width)), path.name)


def _npy_header(archive: zipfile.ZipFile, name: str, file: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype an NPZ member declares, read without loading it."""
    try:
        member = archive.open(f"{name}.npy")
    except KeyError:
        raise _bad(f"{file} has no array {name!r} (it needs arrays X and y)") from None
    with member:
        try:
            # numpy's public .npy header readers (untyped in numpy 1.26)
            version = np.lib.format.read_magic(member)  # type: ignore[no-untyped-call]
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)  # type: ignore[no-untyped-call]
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)  # type: ignore[no-untyped-call]
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as error:
            raise _bad(f"array {name} of {file} is not a readable .npy array: {error}") from None
    return tuple(int(d) for d in shape), np.dtype(dtype)


# shared checks


def _check_size(rows: int, width: int, name: str) -> None:
    if rows == 0 or width == 0:
        raise _bad(f"{name} is empty ({rows} rows, {width} features)")
    if rows > MAX_ROWS or width > MAX_FEATURES or rows * width > MAX_CELLS:
        raise _bad(
            f"{name} has {rows} rows x {width} features; the limits are {MAX_ROWS} rows, "
            f"{MAX_FEATURES} features and {MAX_CELLS} values"
        )


def _float32(values: NDArray[Any]) -> NDArray[np.float32]:
    # a value beyond float32's range becomes inf, which _check_float32 then names
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float32)


def _check_float32(X: NDArray[np.float32], name: str) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise _bad(f"row {row} of {name}, feature {column}: not a finite number as float32")


def _labels(values: NDArray[Any]) -> NDArray[Any]:
    """int64 when every label is a whole number (as class numbers are), float64 otherwise."""
    as_float = values.astype(np.float64)
    if np.all(np.mod(as_float, 1.0) == 0) and np.all(np.abs(as_float) < 2**53):
        return as_float.astype(np.int64)
    return as_float


def class_labels(table: Table) -> NDArray[np.int64]:
    """The labels of ``table`` as class numbers, or InvalidArgument when they are not whole
    numbers or there are fewer than two or more than MAX_CLASSES distinct ones."""
    if table.y.dtype.kind != "i":
        row = int(np.flatnonzero(np.mod(table.y, 1.0) != 0)[0])
        raise _bad(
            f"a classifier needs whole-number labels (class numbers); label {row} of {table.source} "
            f"is {table.y[row]}"
        )
    classes = np.unique(table.y)
    if len(classes) < 2:
        raise _bad(f"{table.source} holds one class ({classes[0]}); a classifier needs at least two")
    if len(classes) > MAX_CLASSES:
        raise _bad(f"{table.source} holds {len(classes)} classes, more than {MAX_CLASSES}")
    return table.y.astype(np.int64)


def bundled(name: str) -> Table:
    """One of the datasets in :data:`BUNDLED`, as shipped inside scikit-learn (no download)."""
    from sklearn import datasets  # heavy; only plugins that train need it

    loaders = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }
    if name not in loaders:
        raise _bad(f"no bundled dataset {name!r} (bundled: {', '.join(BUNDLED)})")
    loaded = loaders[name]()
    X = np.asarray(loaded.data, dtype=np.float32)
    columns = tuple(str(c) for c in getattr(loaded, "feature_names", ())) or tuple(
        f"f{i}" for i in range(X.shape[1])
    )
    return Table(X, np.asarray(loaded.target, dtype=np.int64), columns, f"bundled {name}")
