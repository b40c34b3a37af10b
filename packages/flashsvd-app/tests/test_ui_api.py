"""Each UI tab's handler, driven through the running app's API with ``gradio_client``.

These run the real ``flashsvd`` commands in child processes on the packaged MiniLM (tiny settings).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from flashsvd.app.ui import create_ui  # noqa: E402
from flashsvd.app.ui.handlers import DENSE_DEFAULT  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-workspace")


@pytest.fixture(scope="module")
def client(workspace):
    demo = create_ui(workspace)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield gradio_client.Client(url, verbose=False)
    demo.close()


def test_compress_writes_a_checkpoint_and_shows_its_report(client, workspace):
    _log, card, path = client.predict("default", "svd", 0.5, "", 8, "ui-svd", api_name="/compress")
    assert Path(path) == workspace / "compressed_models" / "ui-svd"
    assert (Path(path) / "config.json").is_file()
    assert "Checkpoint" in card and "svd" in card
    block = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    assert block["method"] == "svd" and block["keep_ratio"] == 0.5


def test_compress_error_is_the_commands_readable_message(client, workspace):
    with pytest.raises(Exception, match="does not exist") as err:
        client.predict("/nonexistent/model", "svd", 0.5, "", 8, "bad", api_name="/compress")
    assert "Traceback" not in str(err.value)
    assert not (workspace / "compressed_models" / "bad").exists()


def test_checkpoints_tab_lists_and_reports(client, workspace):
    table, _ = client.predict(api_name="/checkpoints")
    paths = [row[0] for row in table["data"]]
    assert str(workspace / "compressed_models" / "ui-svd") in paths
    card, files = client.predict(paths[0], api_name="/checkpoint_report")
    assert "kept fraction" in card
    assert any(Path(f).name == "config.json" for f in files)


def test_checkpoint_names_cannot_replace_the_folder_or_a_checkpoint(client, workspace):
    models = workspace / "compressed_models"
    before = sorted(p.name for p in models.iterdir())
    stamp = (models / "ui-svd" / "config.json").stat().st_mtime_ns
    for name in (".", "..", "../x", "a/b"):
        with pytest.raises(Exception, match="not a plain folder name"):
            client.predict("default", "svd", 0.5, "", 8, name, api_name="/compress")
    with pytest.raises(Exception, match="already exists"):
        client.predict("default", "svd", 0.5, "", 8, "ui-svd", api_name="/compress")
    assert sorted(p.name for p in models.iterdir()) == before
    assert (models / "ui-svd" / "config.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in workspace.iterdir()) == ["compressed_models"]


def test_the_app_reports_analytics_off(client):
    assert client.config["analytics_enabled"] is False


def test_evaluate_fills_the_results_table(client, workspace):
    folder = str(workspace / "compressed_models" / "ui-svd")
    _log, table = client.predict([DENSE_DEFAULT, folder], "stsb", "torch", 40, api_name="/evaluate")
    rows = table["data"]
    assert len(rows) == 2
    dense, low = rows
    assert dense[1] in (None, "dense") and low[1] == "svd"
    assert 0.3 < float(dense[6]) <= 1.0  # Spearman of the dense MiniLM on 40 STS-B pairs
    assert len(list((workspace / "results").glob("*.json"))) == 2


def test_compare_draws_plots_from_results(client):
    quality, resources = client.predict(api_name="/compare")
    assert quality is not None and resources is not None


def test_paths_outside_the_workspace_are_refused(client, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    with pytest.raises(Exception, match="outside the checkpoint and results folders"):
        client.predict(str(outside), api_name="/delete")
    assert (outside / "config.json").exists()
    with pytest.raises(Exception, match="outside the checkpoint and results folders"):
        client.predict(str(outside), api_name="/checkpoint_report")


def test_delete_removes_one_checkpoint(client, workspace):
    folder = workspace / "compressed_models" / "ui-svd"
    status = client.predict(str(folder), api_name="/delete")
    assert "deleted" in status and not folder.exists()


def test_finetune_streams_a_loss_curve_and_names_the_best_checkpoint(client, workspace):
    _log, curve, best = client.predict(DENSE_DEFAULT, "sst2", 1, 5e-5, 8, 3, 24, 16, api_name="/finetune")
    assert curve is not None
    assert best and Path(best).is_relative_to(workspace / "models" / "finetuned")
    assert (Path(best) / "config.json").is_file()


def test_compress_tab_rank_chart_and_spectrum(client, workspace):
    """Per-layer ranks from the checkpoint's header, and a layer's dense spectrum with its kept rank."""
    from flashsvd.app.ui import handlers as H

    _log, _card, path = client.predict("default", "svd", 0.5, "", 8, "ui-ranks", api_name="/compress")
    folder = Path(path)
    rows = H.layer_ranks(folder)
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {r["layer"] for r in rows} == set(block["ranks"])
    compressed = [r for r in rows if r["rank"] is not None]
    assert compressed and all(0 < r["rank"] <= r["full"] for r in compressed)
    fig = H.rank_figure(folder)
    assert len(fig.axes[0].patches) == len(rows)
    layer = compressed[0]["layer"]
    fig = H.spectrum_figure("default", folder, layer)
    (line,) = fig.axes[0].get_lines()[:1]
    values = line.get_ydata()
    assert len(values) == compressed[0]["full"] and all(a >= b for a, b in itertools.pairwise(values))
    plot = client.predict("default", str(folder), layer, api_name="/spectrum")
    assert plot is not None
    with pytest.raises(Exception, match="not a compressed layer"):
        client.predict("default", str(folder), "no.such.layer", api_name="/spectrum")
