"""Every way a user can load a checkpoint gives the compressed model or a clear error, never random weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import flashsvd.models as fm
from flashsvd.models.recipe import Recipe


@pytest.fixture
def saved(tiny, make_inputs, tmp_path_factory):
    ids, mask = make_inputs("llama")
    # a centered fit: its factorized projections carry biases that LLaMA's own projections lack
    recipe = Recipe(name="centered", method="whiten", center=True)
    model, _ = fm.compress(tiny("llama"), keep_ratio=0.5, recipe=recipe, calibration=[{"input_ids": ids}])
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    folder = fm.save_compressed(model, tmp_path_factory.mktemp("ck") / "llama")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.save({"ids": ids, "mask": mask}, folder.parent / "inputs.pt")
    return folder, ids, mask, logits


def _fresh_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a process that never imported flashsvd (its own HF modules cache)."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_checkpoint_config_names_flashsvd_and_the_shim(saved):
    folder = saved[0]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "flashsvd" and cfg["quantization_config"]["base_model_type"] == "llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "flashsvd_auto.FlashSVDForCausalLM"
    assert (folder / "flashsvd_auto.py").is_file() and not (folder / "model.safetensors").exists()


def test_without_flashsvd_plain_loading_refuses(saved, tmp_path):
    folder = saved[0]
    res = _fresh_python(
        f"""
        import sys, transformers as T
        try:
            T.AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except Exception as e:
            assert "trust_remote_code" in str(e), e
        else:
            sys.exit("AutoModelForCausalLM loaded a flashsvd checkpoint without flashsvd")
        try:
            T.LlamaForCausalLM.from_pretrained({str(folder)!r})
        except OSError as e:
            print("direct class:", type(e).__name__)
        else:
            sys.exit("LlamaForCausalLM loaded a flashsvd checkpoint without flashsvd")
        assert "flashsvd" not in " ".join(sys.modules)
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout


def test_without_import_trust_remote_code_loads_the_same_model(saved, tmp_path):
    folder, _, _, logits = saved
    out = tmp_path / "logits.pt"
    res = _fresh_python(
        f"""
        import torch, transformers as T
        x = torch.load({str(folder.parent / "inputs.pt")!r})
        m = T.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(m).__name__ == "LlamaForCausalLM", type(m)
        with torch.no_grad():
            torch.save(m(input_ids=x["ids"], attention_mask=x["mask"]).logits, {str(out)!r})
        """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.equal(torch.load(out), logits)


def test_after_import_auto_classes_use_the_strict_loader(saved):
    folder, ids, mask, logits = saved
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    base = T.AutoModel.from_pretrained(folder)  # the base model of a ...ForCausalLM checkpoint
    assert type(base).__name__ == "LlamaModel"
    assert all(torch.equal(base.state_dict()[k], v) for k, v in model.model.state_dict().items())


def test_a_missing_tensor_is_an_error_everywhere(saved, tmp_path):
    folder = saved[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "flashsvd.safetensors"))
    dropped = next(k for k in state if k.endswith(".u"))
    del state[dropped]
    save_file(state, str(broken / "flashsvd.safetensors"))
    for load in (fm.load, T.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(fm.CheckpointError, match="missing"):
            load(broken)


def _edit(folder, tmp_path, change) -> os.PathLike:
    out = tmp_path / "edited"
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    change(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("quantization_config"), "no quantization_config with quant_method 'flashsvd'"),
        (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "'gptq' checkpoint"),
        (
            lambda c: c["quantization_config"]["ranks"].update({"model.layers.0.mlp.up_proj": -5}),
            "positive integer",
        ),
        (
            lambda c: c["quantization_config"]["ranks"].update({"model.layers.0.mlp.up_proj": "abc"}),
            "positive integer",
        ),
        (lambda c: c.update(hidden_size="wide"), "invalid config"),
        (
            lambda c: c["quantization_config"].update(base_model_type="bert"),
            "another architecture|invalid config",
        ),
        (lambda c: c["quantization_config"].update(format_version="two"), "format_version"),
    ],
    ids=[
        "no-block",
        "other-quant-method",
        "negative-rank",
        "text-rank",
        "field-type",
        "other-arch",
        "version",
    ],
)
def test_bad_config_fields_are_clear_checkpoint_errors(saved, tmp_path, change, message):
    edited = _edit(saved[0], tmp_path, change)
    with pytest.raises(fm.CheckpointError, match=message):
        fm.load(edited)
