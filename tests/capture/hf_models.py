"""Tiny random-config Hugging Face models of every family capture supports (no downloads).

Hidden 16-32, 2 layers (T5: asymmetric), vocab 100: each builds and runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

V = 100  # vocab


def _t(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def bert() -> Any:
    cfg = _t("BertConfig")(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32)  # fmt: skip
    return _t("BertModel")(cfg)


def roberta() -> Any:
    cfg = _t("RobertaConfig")(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=32,
                              max_position_embeddings=40)  # fmt: skip
    return _t("RobertaModel")(cfg)


def distilbert() -> Any:
    cfg = _t("DistilBertConfig")(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                 max_position_embeddings=40)  # fmt: skip
    return _t("DistilBertModel")(cfg)


def gpt2() -> Any:
    cfg = _t("GPT2Config")(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=40,
                           bos_token_id=0, eos_token_id=0)  # fmt: skip
    return _t("GPT2LMHeadModel")(cfg)


def gpt_neox() -> Any:
    cfg = _t("GPTNeoXConfig")(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=32, bos_token_id=0,
                              max_position_embeddings=40, eos_token_id=0)  # fmt: skip
    return _t("GPTNeoXForCausalLM")(cfg)


def llama_gqa() -> Any:
    cfg = _t("LlamaConfig")(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                            max_position_embeddings=40, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return _t("LlamaForCausalLM")(cfg)


def qwen2() -> Any:
    cfg = _t("Qwen2Config")(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                            max_position_embeddings=40, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return _t("Qwen2ForCausalLM")(cfg)


def bart() -> Any:
    cfg = _t("BartConfig")(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32,
                           max_position_embeddings=40)  # fmt: skip
    return _t("BartForConditionalGeneration")(cfg)


def t5(enc: int = 2, dec: int = 3) -> Any:
    cfg = _t("T5Config")(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=enc,
                         num_decoder_layers=dec, decoder_start_token_id=0, pad_token_id=0,
                         eos_token_id=1)  # fmt: skip
    return _t("T5ForConditionalGeneration")(cfg)


def vit() -> Any:
    cfg = _t("ViTConfig")(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, image_size=16, patch_size=8)  # fmt: skip
    return _t("ViTModel")(cfg)


def clip_text() -> Any:
    cfg = _t("CLIPTextConfig")(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=40)  # fmt: skip
    return _t("CLIPTextModel")(cfg)


def clip_vision() -> Any:
    cfg = _t("CLIPVisionConfig")(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, image_size=16, patch_size=8)  # fmt: skip
    return _t("CLIPVisionModel")(cfg)


FAMILIES: dict[str, Callable[[], Any]] = {
    "bert": bert,
    "roberta": roberta,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "llama_gqa": llama_gqa,
    "qwen2": qwen2,
    "bart": bart,
    "t5_2enc_3dec": lambda: t5(2, 3),
    "t5_3enc_2dec": lambda: t5(3, 2),
    "vit": vit,
    "clip_text": clip_text,
    "clip_vision": clip_vision,
}

IMAGE_FAMILIES = {"vit", "clip_vision"}


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """The family's tiny model in ``eval()`` mode, in ``dtype``."""
    torch.manual_seed(seed)
    return FAMILIES[name]().eval().to(dtype)


def batch_for(name: str, model: Any, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Two samples; text families get an ``attention_mask`` with zeros (sample 1 padded)."""
    g = torch.Generator().manual_seed(seed)
    if name in IMAGE_FAMILIES:
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g).to(dtype)}
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding: the model sees two real lengths, 7 and 5
    batch = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(3, V, (2, 4), generator=g)
    return batch


def reference_attentions(model: Any, batch: dict) -> dict[str, torch.Tensor]:
    """Array name -> the model's own ``output_attentions`` tensor, computed eagerly."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    # transformers 5.17's T5 keeps per-stack config copies the switch misses
    subs = {id(c): c for m in model.modules() if hasattr(c := m.__dict__.get("config"),
                                                        "_attn_implementation_internal")}
    saved = {k: c._attn_implementation_internal for k, c in subs.items()}
    for c in subs.values():
        c._attn_implementation_internal = "eager"
    try:
        with torch.inference_mode():
            out = model(**batch, output_attentions=True)
    finally:
        for k, c in subs.items():
            c._attn_implementation_internal = saved[k]
        model.set_attn_implementation(previous)
    if model.config.is_encoder_decoder:
        groups = [("encoder", "self_attention", out.encoder_attentions),
                  ("decoder", "self_attention", out.decoder_attentions),
                  ("decoder", "cross_attention", out.cross_attentions)]  # fmt: skip
    else:
        causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        groups = [("decoder" if causal else "encoder", "self_attention", out.attentions)]
    return {f"{s}/{i}/{k}": a for s, k, atts in groups for i, a in enumerate(atts)}


def as_stored(model: Any, batch: dict, want: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``want`` as a ragged archive stores it: rows and keys of padding tokens are zeros.

    A batch without any mask gives a fixed-length archive, stored as computed.
    """
    from attnscope.contracts import KIND_AXES

    if model.config.is_encoder_decoder:
        keys = {"encoder": "attention_mask", "decoder": "decoder_attention_mask"}
    else:
        keys = {"encoder": "attention_mask", "decoder": "attention_mask"}
    ragged = any(batch.get(k) is not None for k in keys.values())
    out = {}
    for name, w in want.items():
        x = w.float().numpy()
        if ragged:
            stack, _layer, kind = name.split("/")
            q, k = KIND_AXES[(stack, kind)]
            qm, km = _real(batch, keys[q], x.shape[2]), _real(batch, keys[k], x.shape[3])
            x = np.where(qm[:, None, :, None] & km[:, None, None, :], x, 0).astype(np.float32)
        out[name] = x
    return out


def _real(batch: dict, key: str, length: int) -> np.ndarray:
    m = batch.get(key)
    if m is None:
        n = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0]
        return np.ones((n, length), dtype=bool)
    return m.bool().numpy()
