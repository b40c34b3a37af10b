"""peft LoRA adapters wrap compressed layers: only the adapters train, outputs start equal and then move."""

import pytest
import torch

import flashsvd.models as fm

peft = pytest.importorskip("peft")


def test_lora_on_compressed_llama_layers(tiny, make_inputs):
    from flashsvd.models.peft_lora import lora_config

    model, _ = fm.compress(tiny("llama"), keep_ratio=0.5)
    ids, mask = make_inputs("llama")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    config = lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, config)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: the wrapped model computes the same function
        torch.testing.assert_close(wrapped(input_ids=ids, attention_mask=mask).logits, before)
    loss = wrapped(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    for p in wrapped.parameters():
        if p.grad is not None and p.requires_grad:
            p.grad.normal_()  # a step in a random direction moves both A and B away from their start
    opt.step()
    opt.step()
    with torch.no_grad():
        after = wrapped(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(after, before)
    with pytest.raises(NotImplementedError, match="kept unmerged"):
        wrapped.merge_and_unload()
