"""``--dtype auto`` follows the model's own dtype on CUDA (bfloat16 for LLaMA-family), float32 on CPU."""

from types import SimpleNamespace

import torch

from flashsvd.app import modelio
from flashsvd.app.runtime import resolve_dtype

CUDA, CPU = SimpleNamespace(type="cuda"), torch.device("cpu")


def test_auto_dtype_follows_the_model_on_cuda():
    assert resolve_dtype("auto", CUDA, "bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", CUDA, "float32") is torch.float16
    assert resolve_dtype("auto", CUDA, None) is torch.float16
    assert resolve_dtype("auto", CPU, "bfloat16") is torch.float32
    assert resolve_dtype("bfloat16", CPU, "float16") is torch.bfloat16


def test_saved_dtype_is_read_from_the_config(tiny_bert, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert modelio.saved_dtype(modelio.resolve(str(folder))) == "bfloat16"
