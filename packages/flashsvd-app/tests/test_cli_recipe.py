"""``flashsvd compress --recipe``: the recipe runs, lands in the checkpoint, and ``info`` prints it."""

import json

import yaml


def _calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"calibration sentence number {i} with a few words" for i in range(40)))
    return path


def test_recipe_file_is_run_saved_and_printed(cli, tiny_bert, tmp_path):
    recipe = {"name": "mine", "method": "whiten", "allocation": "loss_curve", "keep_dense": ["q"],
              "gradients": "none", "rank_multiple": 4, "calib_samples": 24, "calib_batch_size": 8}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ckpt"
    res = cli("compress", "--model", tiny_bert, "--recipe", path, "--keep-ratio", "0.7", "--calib-data",
              _calib(tmp_path), "--device", "cpu", "--output", out, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["report"]
    assert report["recipe"]["name"] == "mine" and report["recipe"]["rank_multiple"] == 4
    assert report["calibration"]["batches"] == 3  # 24 texts in batches of 8
    assert all(r is None for n, r in report["ranks"].items() if n.endswith(".query"))
    assert report["kept_fraction"] <= 0.7
    info = cli("info", out, "--json")
    assert info.exit_code == 0, info.output
    d = json.loads(info.stdout)
    assert d["recipe"]["name"] == "mine"
    text = cli("info", out)
    assert "recipe" in text.stdout and "mine" in text.stdout


def test_bad_recipe_is_one_clean_error(cli, tiny_bert, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"method": "whiten", "allocation": "psychic"}))
    res = cli("compress", "--model", tiny_bert, "--recipe", path, "--output", tmp_path / "o")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "allocation" in res.stderr and "psychic" in res.stderr
    res = cli(
        "compress", "--model", tiny_bert, "--recipe", tmp_path / "nope.yaml", "--output", tmp_path / "o"
    )
    assert res.exit_code != 0 and "neither a file nor a built-in recipe" in res.stderr
