"""``flashsvd finetune --task lm``: recovery fine-tuning of a tiny compressed LLaMA on local text (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEXT = "the quick brown fox jumps over the lazy dog and runs far away into the green forest"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two busy cores: one intra-op thread is many times faster than two that wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lm_text")
    (d / "train.txt").write_text("\n".join([TEXT] * 120) + "\n")
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{TEXT}\t1\n" for _ in range(120)))
    (d / "eval.txt").write_text("\n".join([TEXT] * 30) + "\n")
    (d / "wiki.test.raw").write_text(" = Valkyria = \n" + TEXT + "\n")
    return {p.stem if p.suffix != ".raw" else "wiki": p for p in d.iterdir()} | {
        "tsv": d / "train.tsv",
        "txt": d / "train.txt",
    }


@pytest.fixture(scope="module")
def tiny_llama_ckpt(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random LLaMA with SmolLM2's tokenizer, compressed with svd at keep 0.6."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import flashsvd.models as fm
    from flashsvd.app.modelio import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)  # fmt: skip
    model, _ = fm.compress(LlamaForCausalLM(config), method="svd", keep_ratio=0.6)
    out = tmp_path_factory.mktemp("ckpt") / "tiny_llama_svd"
    fm.save_compressed(model, out, tokenizer=tok)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from flashsvd.models.checkpoint import read_weights

    return read_weights(folder)


def _changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


def _factor_keys(weights: dict) -> set[str]:
    owners = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".u")}
    return {k for k in weights if k.rsplit(".", 1)[0] in owners}


def _run(cli, ckpt, files, out, *extra):
    return cli("finetune", "-c", ckpt, "--train-file", files["txt"], "--output-dir", out, "--batch-size", "4",
               "--max-length", "32", "--max-steps", "10", "--learning-rate", "3e-3", "--warmup-ratio", "0",
               "--device", "cpu", *(() if "--json" in extra else ("--quiet",)), *extra)  # fmt: skip


def test_all_factors_train_loss_falls_and_results_json(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "rec_all"
    res = _run(cli, tiny_llama_ckpt, lm_files, out, "--task", "lm", "--eval-file", lm_files["eval"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == "lm" and r["train_params"] == "all" and r["steps"] == 10
    assert r["tokens"] == 10 * 4 * 32
    assert r["last_loss"] < r["first_loss"]
    assert r["eval_perplexity_after"] < r["eval_perplexity_before"]
    assert r["keep_ratio"] == 0.6 and r["method"] == "svd" and r["ranks"]
    for key in ("train_loss", "seconds", "eval_tokens", "versions", "device_name"):
        assert r[key] is not None, key
    before, after = _weights(tiny_llama_ckpt), _weights(out)
    changed = _changed(before, after)
    assert changed and changed <= _factor_keys(before)
    assert any(k.endswith(".u") for k in changed) and any(k.endswith(".v") for k in changed)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    import flashsvd.models as fm

    model = fm.load(out)  # an ordinary flashsvd checkpoint
    assert fm.is_compressed(model)
    assert json.loads((out / "config.json").read_text()).get("use_cache", True)  # off only while training


def test_v_only_from_a_table_and_task_chosen_by_itself(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "rec_v"
    res = cli("finetune", "-c", tiny_llama_ckpt, "--train-file", lm_files["tsv"], "--train-params", "v",
              "--output-dir", out, "--batch-size", "4", "--max-length", "32", "--max-steps", "3", "--device", "cpu",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["task"] == "lm" and r["train_params"] == "v" and r["steps"] == 3
    changed = _changed(_weights(tiny_llama_ckpt), _weights(out))
    assert changed and all(k.endswith(".v") for k in changed)


def test_lora_is_merged_into_the_factors(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "rec_lora"
    res = _run(
        cli, tiny_llama_ckpt, lm_files, out, "--train-params", "lora", "--lora-r", "4", "--max-steps", "4"
    )
    assert res.exit_code == 0, res.output
    before, after = _weights(tiny_llama_ckpt), _weights(out)
    assert not any("lora" in k for k in after)
    changed = _changed(before, after)  # same keys and shapes: the ranks are kept
    assert changed and changed <= _factor_keys(before)
    assert all(before[k].shape == after[k].shape for k in before)
    r = json.loads((out / "results.json").read_text())
    assert r["train_params"] == "lora" and r["lora_merge_rel_error"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "flashsvd"
    assert not (out / "adapter_config.json").exists()
    import flashsvd.models as fm

    assert fm.is_compressed(fm.load(out))


def test_wikitext_test_file_is_refused(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "never"
    res = cli("finetune", "-c", tiny_llama_ckpt, "--task", "lm", "--train-file", lm_files["wiki"],
              "--output-dir", out, "--device", "cpu")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "WikiText-2 test" in res.stderr and not out.exists()


def test_decoder_with_glue_task_and_classifier_with_lm_are_refused(cli, tiny_llama_ckpt, lm_files, tmp_path):
    res = cli("finetune", "-c", tiny_llama_ckpt, "--task", "sst2", "--device", "cpu",
              "--output-dir", tmp_path / "a")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "causal LM" in res.stderr and "--task lm" in res.stderr
    from transformers import BertConfig, BertForSequenceClassification

    clf = tmp_path / "clf"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(clf)  # fmt: skip
    res = cli("finetune", "-m", clf, "--task", "lm", "--train-file", lm_files["txt"], "--device", "cpu",
              "--output-dir", tmp_path / "b")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "--task lm trains a causal LM" in res.stderr and "classification" in res.stderr


def test_time_budget_ends_the_run(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "rec_budget"
    res = _run(cli, tiny_llama_ckpt, lm_files, out, "--max-steps", "400", "--minutes", "0.00001", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert 5 <= r["steps"] <= 6  # the first estimate (after 5 steps) finds the budget spent


def test_distillation_from_a_teacher(cli, tiny_llama_ckpt, lm_files, tmp_path):
    out = tmp_path / "rec_kd"
    res = _run(
        cli, tiny_llama_ckpt, lm_files, out, "--teacher", tiny_llama_ckpt, "--max-steps", "3", "--json"
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["loss"] == "distill" and r["steps"] == 3
    assert r["first_loss"] < 1e-3  # the teacher is the model itself: nothing to learn at first


def test_teacher_samples_join_the_training_data(cli, tiny_llama_ckpt, lm_files, tmp_path):
    """``--teacher-samples N``: N more training blocks written by the teacher, recorded in results.json."""
    base = _run(cli, tiny_llama_ckpt, lm_files, tmp_path / "base", "--teacher", tiny_llama_ckpt,
                "--max-steps", "1", "--json")  # fmt: skip
    assert base.exit_code == 0, base.output
    out = tmp_path / "rec_samples"
    res = _run(cli, tiny_llama_ckpt, lm_files, out, "--teacher", tiny_llama_ckpt, "--teacher-samples", "6",
               "--max-steps", "2", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    r, b = json.loads(res.stdout), json.loads(base.stdout)
    assert (
        r["teacher_blocks"] == 6 and r["train_blocks"] == b["train_blocks"] + 6 and b["teacher_blocks"] == 0
    )
    refused = _run(cli, tiny_llama_ckpt, lm_files, tmp_path / "no_teacher", "--teacher-samples", "2")
    assert refused.exit_code != 0 and "--teacher" in refused.output


def test_teacher_blocks_continue_the_prompts_and_follow_the_seed():
    import transformers as T

    from flashsvd.app.lm_training import TEACHER_PROMPT_TOKENS, PackedBlocks, teacher_blocks

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                        vocab_size=50, max_position_embeddings=64, eos_token_id=1, pad_token_id=0)  # fmt: skip
    teacher = T.LlamaForCausalLM(cfg).eval()
    data = PackedBlocks(torch.randint(2, 50, (5 * 16,)), 16)
    a = teacher_blocks(teacher, data, 7, device="cpu", seed=3, batch_size=4)
    b = teacher_blocks(teacher, data, 7, device="cpu", seed=3, batch_size=4)
    c = teacher_blocks(teacher, data, 7, device="cpu", seed=4, batch_size=4)
    assert a.shape == (7, 16) and torch.equal(a, b) and not torch.equal(a, c)
    starts = {tuple(row[:TEACHER_PROMPT_TOKENS].tolist()) for row in data.data}
    assert all(tuple(row[:TEACHER_PROMPT_TOKENS].tolist()) in starts for row in a)


@pytest.mark.slow
def test_torchrun_two_processes_train_data_parallel_and_write_once(tiny_llama_ckpt, lm_files, tmp_path):
    """``torchrun --nproc-per-node 2 -m flashsvd.app finetune --task lm`` (gloo on CPU): Trainer splits the
    batches over the two processes (global batch = 2 × per-device), one folder and one result are written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", FLASHSVD_DIST_TIMEOUT="300")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "flashsvd.app", "finetune", "-c", str(tiny_llama_ckpt), "--task", "lm", "--train-file",
           str(lm_files["txt"]), "--output-dir", str(out), "--batch-size", "2", "--max-length", "32",
           "--max-steps", "4", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["steps"] == 4 and r["tokens"] == 4 * 2 * 2 * 32  # steps × per-device batch × processes × length
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp"]
    assert _changed(_weights(tiny_llama_ckpt), _weights(out))
