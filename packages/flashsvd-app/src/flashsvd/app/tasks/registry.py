"""The tasks ``flashsvd eval``/``finetune``/``compress --task`` know, and how their data is laid out.

Each GLUE task records its Hugging Face ``datasets`` names (used online) and its GLUE TSV layout (used
offline with ``--data-file``/``--data-dir``): which header names or, for header-less files, which column
positions hold the texts and the label, and how string labels map to ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flashsvd.app.errors import AppError

NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
NLI2 = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    ``kind``: ``classification`` (labels ``0..num_labels-1``), ``regression`` (STS-B scores 0-5),
    ``perplexity`` (causal LM on raw text). ``text_keys``: the text field(s) in ``datasets`` and header
    names accepted in local files (first match wins); ``positions``: 0-based columns of header-less GLUE TSV
    files (texts..., label). ``splits``: split name → file names tried inside ``--data-dir/<folder>``.
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    hf_path: str = "glue"
    hf_name: str | None = None
    hf_split: str = "validation"
    text_keys: tuple[tuple[str, ...], ...] = ()
    label_keys: tuple[str, ...] = ("label",)
    positions: tuple[int, ...] | None = None
    label_map: dict[str, int] = field(default_factory=dict)
    num_labels: int = 2
    folder: str | None = None
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def data_folder(self) -> str:
        return self.folder or self.name


_DEV = ("dev.tsv", "validation.tsv", "dev.jsonl", "validation.jsonl", "dev.csv", "validation.csv")
_TRAIN = ("train.tsv", "train.jsonl", "train.csv")


def _glue(name: str, metrics: tuple[str, ...], texts: tuple[tuple[str, ...], ...], **kw) -> TaskSpec:
    splits = kw.pop("splits", {"dev": _DEV, "train": _TRAIN, "test": ("test.tsv",)})
    return TaskSpec(
        name=name,
        kind=kw.pop("kind", "classification"),
        metrics=metrics,
        hf_name=kw.pop("hf_name", name),
        text_keys=texts,
        splits=splits,
        **kw,
    )


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue(
            "cola",
            ("matthews_corrcoef", "accuracy"),
            (("sentence",),),
            positions=(3, 1),
            description="CoLA grammatical acceptability (Matthews correlation)",
        ),
        _glue(
            "sst2",
            ("accuracy",),
            (("sentence",),),
            positions=(0, 1),
            description="SST-2 binary sentiment (accuracy)",
        ),
        _glue(
            "mrpc",
            ("f1", "accuracy"),
            (("sentence1", "#1 String"), ("sentence2", "#2 String")),
            label_keys=("label", "Quality"),
            positions=(3, 4, 0),
            description="MRPC paraphrase (F1, accuracy)",
        ),
        _glue(
            "qqp",
            ("f1", "accuracy"),
            (("question1",), ("question2",)),
            label_keys=("label", "is_duplicate"),
            positions=(3, 4, 5),
            description="QQP duplicate questions (F1, accuracy)",
        ),
        _glue(
            "stsb",
            ("spearman", "pearson"),
            (("sentence1",), ("sentence2",)),
            label_keys=("label", "score"),
            positions=(7, 8, 9),
            kind="regression",
            num_labels=1,
            description="STS-B similarity 0-5 (Spearman, Pearson); zero-shot cosine for embedding models",
        ),
        _glue(
            "mnli",
            ("accuracy",),
            (("premise", "sentence1"), ("hypothesis", "sentence2")),
            label_keys=("label", "gold_label"),
            label_map=NLI3,
            num_labels=3,
            hf_split="validation_matched",
            splits={"dev": ("dev_matched.tsv", "validation_matched.jsonl", *_DEV), "train": _TRAIN},
            description="MNLI matched (accuracy)",
        ),
        _glue(
            "mnli-mm",
            ("accuracy",),
            (("premise", "sentence1"), ("hypothesis", "sentence2")),
            label_keys=("label", "gold_label"),
            label_map=NLI3,
            num_labels=3,
            hf_name="mnli",
            hf_split="validation_mismatched",
            folder="mnli",
            splits={"dev": ("dev_mismatched.tsv", "validation_mismatched.jsonl"), "train": _TRAIN},
            description="MNLI mismatched (accuracy)",
        ),
        _glue(
            "qnli",
            ("accuracy",),
            (("question",), ("sentence",)),
            label_map=NLI2,
            description="QNLI question answering NLI (accuracy)",
        ),
        _glue(
            "rte",
            ("accuracy",),
            (("sentence1",), ("sentence2",)),
            label_map=NLI2,
            description="RTE textual entailment (accuracy)",
        ),
        _glue(
            "wnli",
            ("accuracy",),
            (("sentence1",), ("sentence2",)),
            description="WNLI Winograd NLI (accuracy)",
        ),
        TaskSpec(
            "wikitext2",
            "perplexity",
            ("perplexity",),
            hf_path="wikitext",
            hf_name="wikitext-2-raw-v1",
            hf_split="test",
            text_keys=(("text",),),
            label_keys=(),
            splits={
                "test": ("wiki.test.raw", "test.txt"),
                "dev": ("wiki.valid.raw",),
                "train": ("wiki.train.raw",),
            },
            description="causal-LM perplexity on WikiText-2 raw (text joined with blank lines)",
        ),
    )
}
ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "sts": "stsb",
    "mnli-m": "mnli",
    "mnli_matched": "mnli",
    "mnli-matched": "mnli",
    "mnli_mismatched": "mnli-mm",
    "mnli-mismatched": "mnli-mm",
    "wikitext": "wikitext2",
    "wikitext-2": "wikitext2",
    "perplexity": "wikitext2",
    "ppl": "wikitext2",
}


def get_task(name: str) -> TaskSpec:
    key = name.lower().strip()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise AppError(f"unknown task {name!r}", hint="choose one of: " + ", ".join(TASKS))
    return TASKS[key]


def task_names_help() -> str:
    return ", ".join(TASKS)
