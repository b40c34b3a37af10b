"""The CLI never scores a model with randomly initialised layers: an edited checkpoint is a clear error."""

import json
import shutil

from safetensors.torch import load_file, save_file


def _clean(res, *needles: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_checkpoint_without_its_compression_block(cli, whiten_ckpt, tmp_path):
    edited = tmp_path / "no_block"
    shutil.copytree(whiten_ckpt, edited)
    config = json.loads((edited / "config.json").read_text())
    del config["quantization_config"]
    (edited / "config.json").write_text(json.dumps(config))
    _clean(cli("eval", "-c", edited, "--task", "stsb"), "no quantization_config with quant_method 'flashsvd'")


def test_dense_folder_whose_weights_lack_tensors(cli, tiny_bert, tmp_path):
    edited = tmp_path / "partial"
    shutil.copytree(tiny_bert, edited)
    state = load_file(str(edited / "model.safetensors"))
    del state[next(k for k in state if "attention.self.query.weight" in k)]
    save_file(state, str(edited / "model.safetensors"))
    _clean(cli("eval", "-m", edited, "--task", "stsb"), "lacks 1 tensor", "attention.self.query.weight")
