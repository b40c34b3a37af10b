import pytest
import torch
import transformers as T

C = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=100)


def _tiny(kind: str):
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**C, num_key_value_heads=2, max_position_embeddings=128))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**C, num_key_value_heads=2, sliding_window=None))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**C, num_key_value_heads=2))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=128)
        )
    if kind == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**C))
    if kind == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**C, max_position_embeddings=130))
    if kind == "distilbert":
        cfg = T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=100)
        return T.DistilBertForSequenceClassification(cfg)
    if kind == "modernbert":
        cfg = T.ModernBertConfig(**C, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0)
        return T.ModernBertForSequenceClassification(cfg)
    raise ValueError(kind)


DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ENCODERS = ("bert", "roberta", "distilbert", "modernbert")


@pytest.fixture
def tiny():
    def make(kind: str):
        torch.manual_seed(0)
        return _tiny(kind).eval()

    return make


@pytest.fixture
def make_inputs():
    return inputs


def token_batches(n: int = 3, rows: int = 4, seq: int = 10, pad: str | None = None, seed: int = 2):
    """``n`` tokenizer-style calibration batches of random ids; ``pad`` (``left`` or ``right``) masks
    three tokens of each batch's first row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad == "left":
            mask[0, :3] = 0
        elif pad == "right":
            mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def calib_batches():
    return token_batches


def inputs(kind: str, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if kind in DECODERS:
        mask[1, :3] = 0  # left padding
    else:
        mask[1, -4:] = 0  # right padding
    return ids, mask
