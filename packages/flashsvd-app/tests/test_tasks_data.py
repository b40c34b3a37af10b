"""Task data from local files: GLUE TSV layouts (with and without header), CSV, JSONL, raw text."""

import json

import pytest

from flashsvd.app.errors import AppError
from flashsvd.app.tasks import TASKS, get_task
from flashsvd.app.tasks.data import Columns, load_examples, load_text


def test_every_glue_task_is_known():
    for name in (
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "mnli-mm",
        "qnli",
        "rte",
        "wnli",
        "wikitext2",
    ):
        assert name in TASKS
    assert get_task("SST-2").name == "sst2"
    assert get_task("mnli_mismatched").name == "mnli-mm"
    with pytest.raises(AppError, match="unknown task"):
        get_task("imagenet")


def test_real_sst2_and_stsb(data_dir):
    sst = load_examples(get_task("sst2"), "dev", data_dir=data_dir)
    assert len(sst) == 6735 and set(sst.labels) == {0.0, 1.0} and sst.pairs is None
    sts = load_examples(get_task("stsb"), "dev", data_dir=data_dir, fallback_splits=("train",))
    assert sts.texts[0] == "A plane is taking off." and sts.pairs[0] == "An air plane is taking off."
    assert sts.labels[0] == 5.0
    small = sts.subset(10, seed=1)
    assert len(small) == 10 and small.subset(10) is small


def test_glue_layouts(tmp_path):
    mnli = tmp_path / "mnli" / "dev_matched.tsv"
    mnli.parent.mkdir()
    header = ["index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p", "sentence1", "sentence2",
              "label1", "gold_label"]  # fmt: skip
    row = [
        "0",
        "1",
        "2",
        "fiction",
        "",
        "",
        "",
        "",
        "A man sleeps.",
        "A person rests.",
        "entailment",
        "entailment",
    ]
    mnli.write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    ex = load_examples(get_task("mnli"), "dev", data_dir=tmp_path)
    assert (ex.texts, ex.pairs, ex.labels) == (["A man sleeps."], ["A person rests."], [0.0])

    cola = tmp_path / "cola.tsv"
    cola.write_text(
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more books.\n"
    )
    ex = load_examples(get_task("cola"), data_file=cola)
    assert ex.labels == [1.0, 0.0] and ex.texts[1] == "The more books."

    rte = tmp_path / "rte.jsonl"
    rte.write_text(json.dumps({"premise": "a", "hyp": "b", "y": "not_entailment"}) + "\n")
    ex = load_examples(get_task("rte"), data_file=rte, columns=Columns("premise", "hyp", "y"))
    assert ex.labels == [1.0]

    qqp = tmp_path / "qqp.csv"
    qqp.write_text('question1,question2,label\n"How, why?",What?,1\n')
    ex = load_examples(get_task("qqp"), data_file=qqp)
    assert ex.texts == ["How, why?"] and ex.labels == [1.0]


def test_column_errors_are_actionable(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": "a", "target": 1}) + "\n")
    with pytest.raises(AppError, match="--label-column"):
        load_examples(get_task("sst2"), data_file=f)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(AppError, match="not a class id"):
        load_examples(get_task("sst2"), data_file=bad)


def test_wikitext_is_joined_with_blank_lines(data_dir):
    text, source = load_text(get_task("wikitext2"), data_dir=data_dir)
    assert source.endswith("wiki.test.raw") and "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")


def test_one_table_reader_for_calibration_and_lm_text(tmp_path, monkeypatch):
    """``read_table`` (datasets' csv/json builders) is what calibration data and LM training text both read:
    header by ``is_header``, columns by name or index (``7,8``), TSV fields taken as they are."""
    from flashsvd.app import lm_training
    from flashsvd.app.tasks import data
    from flashsvd.app.tasks.data import calibration_texts, read_table

    glue = tmp_path / "stsb.tsv"  # header-less, a bare quote in a field (TSV: no quoting)
    glue.write_text('0\tmain\tA "plane" takes off.\tA jet leaves.\t5.0\n1\tmain\tNA\tA man plays.\t3.8\n')
    table = read_table(glue)
    assert not table.header and table.names == ["0", "1", "2", "3", "4"]
    assert table.columns["2"] == ['A "plane" takes off.', "NA"] and table.columns["4"] == ["5.0", "3.8"]
    assert table.pick("2,3", "--text-column") == ["2", "3"] and table.pick(None, "--text-column") == ["0"]
    csv_file = tmp_path / "t.csv"
    csv_file.write_text('ID,Text\n7,"Hello, there friend"\n8,General Kenobi\n')
    table = read_table(csv_file)
    assert table.header and table.pick(None, "--text-column") == ["Text"]  # header names any case
    assert table.columns["Text"] == ["Hello, there friend", "General Kenobi"]

    calls = []
    monkeypatch.setattr(data, "read_table", lambda *a, **k: calls.append(a[0]) or read_table(*a, **k))
    assert calibration_texts(glue, column="2,3")[0] == [
        'A "plane" takes off.',
        "A jet leaves.",
        "NA",
        "A man plays.",
    ]
    assert lm_training.read_texts(glue, "2,3") == [
        'A "plane" takes off.',
        "NA",
        "A jet leaves.",
        "A man plays.",
    ]
    assert calls == [glue, glue]
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(AppError, match="is not UTF-8 text"):
        lm_training.read_texts(latin)
