"""Task data from local files (offline) or Hugging Face ``datasets`` (online).

Where data comes from, first match wins: ``--data-file``; ``--data-dir`` (GLUE layout: ``<dir>/<task>/dev.tsv``
or the file directly in ``<dir>``); the shared data folder ``../shared/data`` seen from the current directory;
``datasets.load_dataset("glue", task)`` unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set. Local files
may be TSV (GLUE layouts, with or without a header), CSV (with a header), JSONL, or raw text (perplexity).

Unlabelled text tables (``--calib-data``, and the causal-LM path's ``--train-file``/``--eval-file``) have one
reader, :func:`read_table`, and one rule for which columns hold the text (:meth:`Table.pick`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from flashsvd.app.errors import AppError
from flashsvd.app.tasks.registry import TaskSpec

DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
GLUE_FOLDERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "qqp": "QQP",
    "stsb": "STS-B",
    "mnli": "MNLI",
}
GLUE_FOLDERS.update({"qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "wikitext2": "wikitext-2-raw"})


@dataclass
class Columns:
    """User overrides of where texts and labels are (a header name, or a 0-based column index)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None


@dataclass
class Examples:
    """A labelled text (pair) data set; ``source`` says where it was read from."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[float]
    source: str
    #: the split actually read when the asked one had no file and a fallback was used (else None)
    fallback_split: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int = 0) -> Examples:
        """A seeded random subset of ``n`` examples (original order kept); all of them when n is None."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise AppError(f"the number of examples must be positive, got {n}")
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return Examples(
            [self.texts[i] for i in keep],
            None if self.pairs is None else [self.pairs[i] for i in keep],
            [self.labels[i] for i in keep],
            f"{self.source} ({n} of {len(self)}, seed {seed})",
            self.fallback_split,
        )


def offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def find_local_file(spec: TaskSpec, split: str, data_dir: Path) -> Path | None:
    """The file for ``split`` of ``spec`` inside ``data_dir`` (its task sub-folder, or itself)."""
    names = spec.splits.get(split, ())
    folders = [
        data_dir / spec.data_folder,
        data_dir / GLUE_FOLDERS.get(spec.data_folder, spec.data_folder),
        data_dir,
    ]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def locate(
    spec: TaskSpec,
    split: str,
    data_file: Path | None,
    data_dir: Path | None,
    fallback_splits: tuple[str, ...] = (),
) -> Path | None:
    """A local file for the task, or None when the caller should try ``datasets``; errors on bad paths."""
    return locate_split(spec, split, data_file, data_dir, fallback_splits)[0]


def locate_split(
    spec: TaskSpec,
    split: str,
    data_file: Path | None,
    data_dir: Path | None,
    fallback_splits: tuple[str, ...] = (),
) -> tuple[Path | None, str]:
    """``(file or None, the split it holds)``: the asked split first, then each fallback split in turn."""
    if data_file is not None:
        if not Path(data_file).is_file():
            raise AppError(f"--data-file {data_file} does not exist")
        return Path(data_file), split
    dirs = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise AppError(f"--data-dir {data_dir} is not a folder")
        dirs.append(Path(data_dir))
    elif DEFAULT_DATA_DIR.is_dir():
        dirs.append(DEFAULT_DATA_DIR)
    for s in (split, *fallback_splits):
        for d in dirs:
            found = find_local_file(spec, s, d)
            if found is not None:
                return found, s
    if data_dir is not None:
        wanted = ", ".join(spec.splits.get(split, ()))
        raise AppError(
            f"no {split} data for task {spec.name} in {data_dir}",
            hint=f"expected one of [{wanted}] in {data_dir}/{spec.data_folder}/ or {data_dir}/; "
            "or pass --data-file.",
        )
    return None, split


def _no_data(spec: TaskSpec, why: str) -> AppError:
    return AppError(
        f"no data for task {spec.name}: {why}",
        hint="pass --data-file FILE (TSV/CSV/JSONL) or --data-dir DIR (GLUE layout), "
        f"or run online so `datasets` can download {spec.hf_path}/{spec.hf_name}.",
    )


def _load_hf(spec: TaskSpec, split: str):
    if offline():
        raise _no_data(
            spec, "running offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and no local file was found"
        )
    try:
        import datasets
    except ImportError as err:
        raise _no_data(spec, "the `datasets` package is not installed and no local file was found") from err
    hf_split = {"dev": spec.hf_split}.get(split, split)
    try:
        return datasets.load_dataset(spec.hf_path, spec.hf_name, split=hf_split)
    except Exception as err:  # network errors come in many types
        raise _no_data(spec, f"datasets.load_dataset failed ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------- labelled examples


def load_examples(
    spec: TaskSpec,
    split: str = "dev",
    data_file: Path | None = None,
    data_dir: Path | None = None,
    columns: Columns | None = None,
    fallback_splits: tuple[str, ...] = (),
) -> Examples:
    """Labelled examples of a GLUE-style task (see the module docstring for where they come from)."""
    if spec.kind == "perplexity":
        raise AppError(f"task {spec.name} is raw text: use load_text")
    columns = columns or Columns()
    path, used = locate_split(spec, split, data_file, data_dir, fallback_splits)
    if path is None:
        ds = _load_hf(spec, split)
        rows = [dict(r) for r in ds]
        return _from_records(spec, rows, columns, f"datasets:{spec.hf_path}/{spec.hf_name}[{split}]")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = _from_records(spec, _read_jsonl(path), columns, str(path))
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
        examples = _from_records(spec, rows, columns, str(path))
    else:
        examples = _from_tsv(spec, path, columns)
    return examples if used == split else dataclasses.replace(examples, fallback_split=used)


def _read_jsonl(path: Path) -> list[dict]:
    text = read_text(path).strip()
    if text.startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise AppError(f"{path}:{i}: not a JSON line ({err.msg})") from err
    return rows


def _pick(
    keys: list[str], override: str | None, candidates: tuple[str, ...], what: str, where: str
) -> str | None:
    if override is not None:
        if override not in keys:
            raise AppError(f"column {override!r} ({what}) is not in {where}", hint=f"columns there: {keys}")
        return override
    for cand in candidates:
        if cand in keys:
            return cand
    return None


def _from_records(spec: TaskSpec, rows: list[dict], columns: Columns, source: str) -> Examples:
    if not rows:
        raise AppError(f"{source} holds no examples")
    keys = list(rows[0].keys())
    text_k = _pick(keys, columns.text, spec.text_keys[0], "text", source)
    pair_k = None
    if len(spec.text_keys) > 1 or columns.text_pair:
        pair_k = _pick(
            keys, columns.text_pair, spec.text_keys[1] if len(spec.text_keys) > 1 else (), "pair", source
        )
    label_k = _pick(keys, columns.label, spec.label_keys, "label", source)
    if text_k is None or (len(spec.text_keys) > 1 and pair_k is None) or label_k is None:
        raise AppError(
            f"{source}: cannot find the text/label columns of task {spec.name}",
            hint=f"columns there: {keys}; name them with --text-column/--text-pair-column/--label-column.",
        )
    texts = [str(r[text_k]) for r in rows]
    pairs = [str(r[pair_k]) for r in rows] if pair_k else None
    labels = [_label(spec, r[label_k], source) for r in rows]
    return _drop_unlabelled(texts, pairs, labels, source)


def _from_tsv(spec: TaskSpec, path: Path, columns: Columns) -> Examples:
    lines = [ln.rstrip("\r") for ln in read_text(path).split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise AppError(f"{path} is empty")
    first = lines[0].split("\t")
    known = {k for group in spec.text_keys for k in group} | set(spec.label_keys)
    header = first if (known & set(first)) or _names_override(columns) else None
    body = lines[1:] if header is not None else lines
    if header is not None and not _digits(columns):
        rows = []
        for ln in body:
            fields = ln.split("\t")
            rows.append({k: fields[i] if i < len(fields) else "" for i, k in enumerate(header)})
        return _from_records(spec, rows, columns, str(path))
    # header-less GLUE file (CoLA, this repository's STS-B), or explicit column indices
    pos = list(spec.positions or ())
    for i, override in enumerate((columns.text, columns.text_pair, columns.label)):
        if override is not None:
            idx = int(override)
            if i == 2:
                pos[-1] = idx
            elif i < len(pos) - 1:
                pos[i] = idx
    if not pos:
        raise AppError(
            f"{path}: no header and no column layout for task {spec.name}",
            hint="pass --text-column/--label-column as 0-based indices.",
        )
    n_text = len(pos) - 1
    texts, pairs, labels = [], [] if n_text > 1 else None, []
    for i, ln in enumerate(body, 1 if header is None else 2):
        fields = ln.split("\t")
        if len(fields) <= max(pos):
            raise AppError(
                f"{path}:{i}: expected at least {max(pos) + 1} tab-separated columns, got {len(fields)}",
                hint="check the file's layout or pass --text-column/--label-column.",
            )
        texts.append(fields[pos[0]])
        if pairs is not None:
            pairs.append(fields[pos[1]])
        labels.append(_label(spec, fields[pos[-1]], f"{path}:{i}"))
    return _drop_unlabelled(texts, pairs, labels, str(path))


def _names_override(columns: Columns) -> bool:
    return any(c is not None and not c.isdigit() for c in (columns.text, columns.text_pair, columns.label))


def _digits(columns: Columns) -> bool:
    return any(c is not None and c.isdigit() for c in (columns.text, columns.text_pair, columns.label))


def _label(spec: TaskSpec, raw: object, where: str) -> float:
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "-", "-1")):
        return float("nan")
    if isinstance(raw, str) and raw.strip() in spec.label_map:
        return float(spec.label_map[raw.strip()])
    try:
        value = float(raw)
    except (TypeError, ValueError) as err:
        raise AppError(f"{where}: label {raw!r} is not a number nor one of {list(spec.label_map)}") from err
    if spec.kind == "classification":
        if value < 0:
            return float("nan")  # GLUE test sets use -1 for "no label"
        if value != int(value) or value >= spec.num_labels:
            raise AppError(
                f"{where}: label {raw!r} is not a class id of task {spec.name} (0..{spec.num_labels - 1})"
            )
    return value


def _drop_unlabelled(texts, pairs, labels, source) -> Examples:
    keep = [i for i, v in enumerate(labels) if v == v]
    if not keep:
        raise AppError(f"{source} has no labelled examples (a GLUE test split?)", hint="use the dev split.")
    if len(keep) != len(labels):
        texts = [texts[i] for i in keep]
        pairs = None if pairs is None else [pairs[i] for i in keep]
        labels = [labels[i] for i in keep]
    return Examples(texts, pairs, labels, source)


# --------------------------------------------------------------------------- raw text (perplexity)


def load_text(
    spec: TaskSpec, split: str = "test", data_file: Path | None = None, data_dir: Path | None = None
) -> tuple[str, str]:
    """Raw text for perplexity, lines joined with blank lines (the standard WikiText protocol)."""
    path = locate(spec, split, data_file, data_dir)
    if path is None:
        ds = _load_hf(spec, split)
        return "\n\n".join(ds["text"]), f"datasets:{spec.hf_path}/{spec.hf_name}[{split}]"
    if path.suffix.lower() in (".jsonl", ".json"):
        lines = [str(r.get("text", "")) for r in _read_jsonl(path)]
    else:
        raw = read_text(path).replace("\r\n", "\n")
        lines = raw.splitlines(keepends=True)
    return "\n\n".join(lines), str(path)


#: header names of text columns, most specific first; pairs are used together
TEXT_HEADERS = (
    ("sentence",), ("text",), ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
    ("question",), ("premise", "hypothesis"), ("content",), ("document",),
)  # fmt: skip
#: files read as tables of texts (:func:`read_table`); anything else is plain text, a line each
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def _not_utf8(path: Path, what: str, err: UnicodeDecodeError) -> AppError:
    return AppError(
        f"{what + ' ' if what else ''}{path} is not UTF-8 text (byte {err.start}: {err.reason})",
        hint="pass a UTF-8 text file (convert it with `iconv -t UTF-8`).",
    )


def read_text(path: Path, what: str = "") -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 text is an error that names it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, what, err) from None
    except IsADirectoryError:
        raise AppError(f"{what + ' ' if what else ''}{path} is a folder, not a file") from None


def _looks_like_text(values: list[str]) -> bool:
    """Most values hold a word: not numbers, ids or labels (a column of ``0, 1, 2`` is not text)."""
    sample = [v.strip() for v in values[:200] if v and v.strip()]
    if not sample:
        return False
    wordy = sum(1 for v in sample if sum(c.isalpha() for c in v) >= 2 and not _is_number(v))
    return wordy >= 0.8 * len(sample)


def _looks_like_sentences(values: list[str]) -> bool:
    """Text of several words (what a hint should point at, rather than a genre or file-name column)."""
    sample = [v.strip() for v in values[:200] if v and v.strip()]
    return _looks_like_text(values) and sum(len(v.split()) >= 3 for v in sample) >= 0.5 * len(sample)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def is_header(cells: list[str]) -> bool:
    """A table's first row is a header when it names a column we know (text columns, labels, ids)."""
    known = {name for group in TEXT_HEADERS for name in group} | {
        "label",
        "score",
        "index",
        "idx",
        "id",
    }
    return bool({c.strip().lower() for c in cells} & known)


@dataclass
class Table:
    """A local table of texts (see :func:`read_table`): its column names, ``"0"``, ``"1"``, ... when the
    file has no header line, and every column's values as strings (``""`` where a row has none)."""

    path: Path
    names: list[str]
    columns: dict[str, list[str]]
    header: bool

    def pick(self, column: str | None, flag: str) -> list[str]:
        """Names of the text column(s): ``column`` (header names or 0-based indices, several joined by
        commas, e.g. ``7,8``), else the first group of :data:`TEXT_HEADERS` the header names (a pair is
        used together), else the first column."""
        names, lower = self.names, {n.lower(): n for n in self.names}
        if column is None:
            for group in TEXT_HEADERS:
                if all(g in lower for g in group):
                    return [lower[g] for g in group]
            return names[:1]
        out = []
        for c in (c.strip() for c in column.split(",")):
            if c.isdigit():
                if int(c) >= len(names):
                    raise AppError(f"{flag} {c}: {self.path} has {len(names)} columns (0..{len(names) - 1})")
                out.append(names[int(c)])
            elif c in names or c.lower() in lower:
                out.append(c if c in names else lower[c.lower()])
            else:
                raise AppError(
                    f"{flag} {c!r} is not a column of {self.path}",
                    hint=f"columns there: {names}"
                    if self.header
                    else "the file has no header: pass a 0-based index.",
                )
        return out


def _first_row(path: Path, delimiter: str) -> list[str] | None:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        for row in csv.reader(f, delimiter=delimiter, quoting=quoting):
            if any(c.strip() for c in row):
                return [c.strip().strip('"') for c in row]
    return None


def read_table(path: Path, what: str = "") -> Table:
    """A ``.tsv``/``.csv``/``.jsonl``/``.json`` file through ``datasets.load_dataset("csv"/"json")``: the one
    reader of text tables (calibration data, LM training text).

    TSV fields are taken as they are (no quoting: GLUE's TSV files hold bare quote characters), CSV
    fields may be quoted. The first row is a header when it names a known column (:func:`is_header`);
    otherwise every row is data and the columns are named by their index. All values are read as
    strings (an ``NA`` sentence stays ``NA``); a file that is not UTF-8 is an error that names it.
    """
    import logging

    import datasets

    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise AppError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
    suffix = path.suffix.lower()
    datasets.disable_progress_bars()
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failure is reported once, below, not logged as well
    try:
        if suffix in (".tsv", ".csv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            first = _first_row(path, delimiter)
            if first is None:
                raise AppError(f"{label} holds no text")
            header = is_header(first)
            names = first if header else [str(i) for i in range(len(first))]
            features = datasets.Features({n: datasets.Value("string") for n in names})
            kw: dict = {
                "delimiter": delimiter,
                "column_names": names,
                "features": features,
                "na_filter": False,
            }
            if header:
                kw["header"] = 0  # replaced by the (stripped) names above
            if suffix == ".tsv":
                kw["quoting"] = csv.QUOTE_NONE
            ds = datasets.load_dataset("csv", data_files=str(path), split="train", **kw)
        else:
            header = True
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except AppError:
        raise
    except Exception as err:  # a malformed table: say which file and what is wrong, not a traceback
        cause: BaseException = err
        while (cause.__cause__ or cause.__context__) is not None and not isinstance(
            cause, UnicodeDecodeError
        ):
            cause = cause.__cause__ or cause.__context__  # the innermost error says what is wrong
        if isinstance(cause, UnicodeDecodeError):
            raise _not_utf8(path, what, cause) from None
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise AppError(f"cannot read {label}: {reason}") from err
    finally:
        log.setLevel(level)
    names = list(ds.column_names)
    columns = {n: ["" if v is None else str(v) for v in ds[n]] for n in names}
    return Table(path, names, columns, header)


def calibration_texts(
    path: Path, limit: int | None = None, column: str | None = None
) -> tuple[list[str], list[str]]:
    """``(texts, column names)`` for calibration from a file.

    ``.txt``: one text per line. ``.tsv``/``.csv``/``.jsonl``: the ``column`` (header name or 0-based index;
    several joined by commas), else the text columns named in the header (``sentence``, ``text``,
    ``sentence1`` + ``sentence2``, ``question``, ...), else column 0 (:meth:`Table.pick`). Whatever the
    choice, a column that does not hold text (an index, labels, scores) is refused rather than silently
    calibrating on numbers. The texts of a row stay together (a pair is not split by ``limit``).
    """
    path = Path(path)
    if not path.is_file():
        raise AppError(f"--calib-data {path} does not exist")
    used: list[str] = []
    if path.suffix.lower() in TABLE_SUFFIXES:
        table = read_table(path, "--calib-data")
        used = table.pick(column, "--calib-text-column")
        columns = [table.columns[name] for name in used]
        for name, values in zip(used, columns):
            if not _looks_like_text(values):
                examples = ", ".join(repr(v) for v in values[:3])
                guess = [str(j) for j, n in enumerate(table.names) if _looks_like_sentences(table.columns[n])]
                raise AppError(
                    f"--calib-data {path}: column {name!r} (index {table.names.index(name)}) does not hold text "
                    f"({examples}, ...)",
                    hint="name the text column with --calib-text-column"
                    + (f" (text-like columns: {', '.join(guess)})" if guess else "")
                    + "; a header line naming a `sentence` or `text` column is picked up by itself.",
                )
        texts = [t for row in zip(*columns) for t in row]  # pairs stay together under --calib-samples
    elif column is not None:
        raise AppError(f"--calib-text-column applies to .tsv/.csv/.jsonl files, not {path.name}")
    else:
        texts = read_text(path, "--calib-data").splitlines()
    texts = [t for t in (t.strip() for t in texts) if t]
    if not texts:
        raise AppError(f"--calib-data {path} holds no text")
    return (texts[:limit] if limit else texts), used
