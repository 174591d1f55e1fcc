"""Embedding LoRA on scaled word embeddings (Gemma, Gemma2, Gemma3, XGLM): the LoRA term is multiplied by the
embedding's ``embed_scale`` as PEFT does. Small random configs; a mixed batch against PEFT's forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from conftest import assert_close
from peft import LoraConfig, get_peft_model

import torch_xla_lora as tl
from torch_xla_lora.layers.embedding import embed_scale

TARGETS = ["embed_tokens", "q_proj"]
SMALL = {"vocab_size": 64, "num_attention_heads": 4}
DECODER = {**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_key_value_heads": 2}
MODELS = {
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, {**DECODER, "head_dim": 8}),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, {**DECODER, "head_dim": 8}),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, {**DECODER, "head_dim": 8}),
    "xglm": (
        transformers.XGLMForCausalLM,
        transformers.XGLMConfig,
        {**SMALL, "d_model": 32, "ffn_dim": 64, "num_layers": 1, "attention_heads": 4, "scale_embedding": True},
    ),
}
BATCH = ["a", None, "b", "a"]
IDS = torch.randint(0, 64, (len(BATCH), 5), generator=torch.Generator().manual_seed(3))


def _models(kind: str):
    cls, config_cls, kwargs = MODELS[kind]
    torch.manual_seed(0)
    clean = cls(config_cls(**kwargs)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = None
        for seed, name in enumerate(["a", "b"]):
            torch.manual_seed(10 + seed)
            config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, r=4, lora_alpha=8)
            if peft_model is None:
                peft_model = get_peft_model(copy.deepcopy(clean), config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    return clean, peft_model.eval()


def _serve(clean, peft_model, path, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path)
    model = copy.deepcopy(clean).to(device)
    lora = tl.patch_model(model, tl.LoRAConfig(max_loras=2, max_rank=4, target_modules=TARGETS))
    for name in ("a", "b"):
        lora.load_adapter(name, path / name)
    lora.set_batch(BATCH)
    return model


@pytest.mark.parametrize("kind", MODELS)
def test_embedding_lora_of_a_scaled_embedding_matches_peft(kind, tmp_path):
    clean, peft_model = _models(kind)
    assert embed_scale(clean.get_input_embeddings()) is not None  # the case under test: a scaled embedding
    model = _serve(clean, peft_model, tmp_path, torch.device("cpu"))
    with torch.no_grad():
        expected = peft_model(IDS, adapter_names=["__base__" if n is None else n for n in BATCH]).logits
        assert_close(model(IDS).logits, expected)


def test_embedding_lora_of_a_scaled_embedding_matches_peft_on_xla(tmp_path, xla_device):
    clean, peft_model = _models("gemma")
    model = _serve(clean, peft_model, tmp_path, xla_device)
    with torch.no_grad():
        expected = peft_model(IDS, adapter_names=["__base__" if n is None else n for n in BATCH]).logits
        assert_close(model(IDS.to(xla_device)).logits, expected)
