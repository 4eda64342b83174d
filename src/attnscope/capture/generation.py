"""Generation capture: the attention of every generated token, as one matrix per sample.

``capture(..., generate=dict(max_new_tokens=N, ...))`` runs ``model.generate`` on each
batch of prompts with the KV cache on. Every forward of the loop adds rows to each
selected array: the prefill gives the prompt's rows ``(B, H, P, P)``, each later step one
row ``(B, H, 1, P + k)`` over everything before it (cross-attention: ``(B, H, 1, S)``).
:class:`RowAssembler` stacks them into one causal matrix over the final sequence.

Two rows are not computed by ``generate`` itself:

* the last token's: the loop stops after sampling it, without feeding it back;
* the rows after an early stop: when every sample has hit EOS before ``N`` tokens, the
  loop ends early. So that every batch has the same length (``P + N`` decoder tokens,
  what a fixed-shape archive needs), the sequences are padded with the pad token, as
  ``generate`` pads a finished sample while others still run.

One more forward over those tokens with the returned cache (``model(...)`` with
``past_key_values``, position ids from the attention mask as ``generate`` makes them)
computes the missing rows. The result equals a forward pass over the final sequence
(tested), and :meth:`Generated.masks` marks the tokens after a sample's EOS as padding.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from attnscope.errors import CaptureError, ConfigError, InputError

if TYPE_CHECKING:  # the HF adapter calls into this module, never the other way round
    from attnscope.capture.base import Adapter, Sink

__all__ = ["check_generate", "generate_batch", "Generated", "RowAssembler"]

# generate() options capture sets itself, and why a user value is refused.
_FIXED = {
    "num_beams": (1, "beam search reorders the KV cache between beams, so a sample's rows "
                     "would come from several hypotheses"),
    "num_return_sequences": (1, "each prompt yields one sequence, one archive sample"),
    "use_cache": (True, "the rows are read from the cached decoding loop"),
    "return_dict_in_generate": (True, "capture reads the cache from generate's output"),
    "output_attentions": (None, "capture observes the attention modules itself"),
}  # fmt: skip


def check_generate(model: Any, options: Any, enc_dec: bool, decoder: bool) -> dict[str, Any]:
    """``generate=`` options checked for ``model``; each refusal names the model class."""
    cls = type(model).__name__
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"generate= must be a dict of generate() options, e.g. "
            f"dict(max_new_tokens=16), got {type(options).__name__} (model {cls})"
        )
    if not enc_dec and not decoder:
        raise ConfigError(
            f"generate=: {cls} is an encoder-only model and cannot generate; drop generate= "
            "(CLI: --max-new-tokens) to capture its forward pass, or use a decoder-only "
            "(...ForCausalLM) or encoder-decoder (...ForConditionalGeneration) model"
        )
    can = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or (callable(can) and not can()):
        raise ConfigError(
            f"generate=: {cls} has no language-model head and cannot generate; load the "
            "model with AutoModelForCausalLM or AutoModelForSeq2SeqLM"
        )
    n = options.get("max_new_tokens")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(
            f"generate= needs max_new_tokens, an integer >= 1, got {n!r} (model {cls}); "
            "e.g. generate=dict(max_new_tokens=16)"
        )
    if "max_length" in options:
        raise ConfigError(
            f"generate=: pass max_new_tokens, not max_length (model {cls}): the archive's "
            "length is prompt + max_new_tokens"
        )
    for key, (value, why) in _FIXED.items():
        if key in options and options[key] != value:
            raise ConfigError(
                f"generate=: {key}={options[key]!r} is not supported (model {cls}): {why}; "
                f"leave {key} out"
            )
    cache = options.get("cache_implementation")
    if cache not in (None, "dynamic"):
        raise ConfigError(
            f"generate=: cache_implementation={cache!r} is not supported (model {cls}): "
            "capture reads one row per token from the default dynamic cache; leave it out"
        )
    return {str(k): v for k, v in options.items() if k not in _FIXED}


class RowAssembler:
    """A sink that collects each array's blocks of rows and stacks them per array."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[Tensor]] = {}

    def __call__(self, name: str, w: Tensor) -> None:
        self.blocks.setdefault(name, []).append(w)

    def matrix(self, name: str) -> Tensor:
        """``(B, H, L, L)`` for self-attention (zeros above the diagonal), ``(B, H, L, S)``."""
        blocks = self.blocks.pop(name)
        if name.endswith("cross_attention"):
            return torch.cat(blocks, dim=2)
        rows = sum(b.shape[2] for b in blocks)
        b0 = blocks[0]
        out = b0.new_zeros((b0.shape[0], b0.shape[1], rows, rows))
        r = 0
        for b in blocks:
            t, s = b.shape[2], b.shape[3]
            if s != r + t:
                raise CaptureError(
                    f"{name}: a generation step gave {s} keys for rows {r}..{r + t - 1}, "
                    f"expected {r + t} (one per token so far); capture needs the default "
                    "dynamic KV cache"
                )
            out[:, :, r : r + t, :s] = b
            r += t
        return out


@dataclass
class Generated:
    """One batch's generation: final ids per side and which tokens are real."""

    ids: dict[str, Tensor]  # side -> (B, L) ids; the decoder side is prompt + generated
    masks: dict[str, np.ndarray]  # side -> (B, L) bool, True = real token
    prompt_length: int  # decoder-side prompt tokens (decoder start token for enc-dec)
    new_tokens: list[int]  # per sample: tokens generated up to and including its EOS

    def records(self, tokenizer: Any = None) -> list[dict[str, Any]]:
        """Per sample: the final decoder ids, prompt length, generated count, text."""
        seq = self.ids["decoder"].tolist()
        out = []
        for i, row in enumerate(seq):
            rec: dict[str, Any] = {
                "ids": row,
                "prompt_length": self.prompt_length,
                "new_tokens": self.new_tokens[i],
            }
            new = row[self.prompt_length : self.prompt_length + self.new_tokens[i]]
            if tokenizer is not None and hasattr(tokenizer, "decode"):
                rec["text"] = tokenizer.decode(new, skip_special_tokens=True)
            out.append(rec)
        return out


def generate_batch(
    adapter: Adapter, batch: Mapping[str, Any], sink: Sink, wanted: set[str]
) -> Generated:
    """Generate from one batch of prompts; report each wanted array's full matrix."""
    model = adapter.model
    opts = dict(adapter.generation or {})
    n_max = int(opts["max_new_tokens"])
    inputs = dict(batch)
    prompt = inputs.get("input_ids")
    if not adapter.is_enc_dec and not isinstance(prompt, Tensor):
        raise InputError(
            f"generate= needs the prompts as 'input_ids' in each batch for "
            f"{type(model).__name__}, got keys {sorted(inputs)}"
        )
    if isinstance(prompt, Tensor) and inputs.get("attention_mask") is None:
        inputs["attention_mask"] = torch.ones_like(prompt)
    gcfg = getattr(model, "generation_config", None)
    pad = _pad_id(opts, gcfg)
    gen_opts = {k: v for k, v in opts.items() if k != "pad_token_id"}
    asm = RowAssembler()
    legacy = not adapter.layer_by_layer
    calls = [0]
    enc_out: list[Any] = []
    hooks = [model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))]
    if adapter.is_enc_dec:
        hooks.append(model.get_encoder().register_forward_hook(lambda m, a, o: enc_out.append(o)))
    try:
        with adapter.observing(asm, wanted):
            out = model.generate(
                **inputs, **gen_opts, num_beams=1, num_return_sequences=1, use_cache=True,
                return_dict_in_generate=True, output_attentions=legacy, pad_token_id=pad,
            )  # fmt: skip
            n_new = calls[0]
            if legacy:
                _feed_legacy_steps(adapter, out, asm, wanted)
            seq = out.sequences
            prompt_len = seq.shape[1] - n_new
            if n_new < 1 or prompt_len < 1:
                raise CaptureError(
                    f"{type(model).__name__}.generate ran {n_new} forward passes for "
                    f"{seq.shape[1]} tokens; expected one per generated token"
                )
            computed = seq.shape[1] - 1  # rows the loop computed
            target = prompt_len + n_max
            if seq.shape[1] < target:
                fill = seq.new_full((seq.shape[0], target - seq.shape[1]), pad)
                seq = torch.cat([seq, fill], dim=1)
            last = _finish(adapter, inputs, seq, computed, out, enc_out, legacy)
            if legacy:
                adapter.feed_legacy(
                    last, asm, wanted, groups=("decoder/self_attention", "decoder/cross_attention")
                )
    finally:
        for h in hooks:
            h.remove()
    for name in sorted(wanted, key=adapter.names().index):
        sink(name, asm.matrix(name))
    return _generated(adapter, inputs, seq, prompt_len, n_max, opts, gcfg)


def _finish(
    adapter: Adapter,
    inputs: Mapping[str, Any],
    seq: Tensor,
    computed: int,
    out: Any,
    enc_out: list[Any],
    legacy: bool,
) -> Any:
    """One forward over the tokens whose rows ``generate`` did not compute, with its cache."""
    model = adapter.model
    params = set(inspect.signature(model.forward).parameters)
    cache_key = "cache" if "cache" in params else "past_key_values"
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        cache = getattr(out, "cache", None)
    if cache is None:
        raise CaptureError(f"{type(model).__name__}.generate returned no KV cache to continue")
    kw: dict[str, Any] = {cache_key: cache, "use_cache": True}
    if legacy:
        kw["output_attentions"] = True
    if adapter.is_enc_dec:
        if not enc_out:
            raise CaptureError(f"{type(model).__name__}: the encoder output was not seen")
        kw.update(encoder_outputs=enc_out[0], decoder_input_ids=seq[:, computed:])
        if inputs.get("attention_mask") is not None:
            kw["attention_mask"] = inputs["attention_mask"]
        dmask = inputs.get("decoder_attention_mask")
        if dmask is not None:
            kw["decoder_attention_mask"] = _extend(dmask, seq.shape[1])
        return model(**kw)
    mask = _extend(inputs["attention_mask"], seq.shape[1])
    kw.update(input_ids=seq[:, computed:], attention_mask=mask)
    # other per-token prompt inputs (token_type_ids, ...) continue with their last column
    # over the generated tokens, as generate extends them
    for key, v in _per_token(inputs, params).items():
        kw[key] = _repeat_last(v, seq.shape[1])[:, computed:]
    if "position_ids" in params:
        # as generate makes them: positions count real tokens, padding gets 0
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kw["position_ids"] = pos[:, computed:]
    return model(**kw)


# batch keys _finish sets itself, or that are not per-token
_OWN_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels")


def _per_token(inputs: Mapping[str, Any], params: set[str]) -> dict[str, Tensor]:
    """The prompt's other ``(B, L)`` inputs that the model's forward takes."""
    prompt = inputs["input_ids"]
    return {
        k: v
        for k, v in inputs.items()
        if k not in _OWN_KEYS and k in params and isinstance(v, Tensor)
        and v.ndim == 2 and tuple(v.shape) == tuple(prompt.shape)
    }  # fmt: skip


def _repeat_last(t: Tensor, length: int) -> Tensor:
    """A ``(B, L)`` tensor continued with its last column up to ``length``."""
    extra = length - t.shape[1]
    if extra <= 0:
        return t
    return torch.cat([t, t[:, -1:].expand(-1, extra)], dim=1)


def _extend(mask: Tensor, length: int) -> Tensor:
    """A 2-D mask continued with ones (generated tokens are attended) up to ``length``."""
    extra = length - mask.shape[1]
    if extra <= 0:
        return mask
    return torch.cat([mask, mask.new_ones((mask.shape[0], extra))], dim=1)


def _feed_legacy_steps(adapter: Adapter, out: Any, sink: Sink, wanted: set[str]) -> None:
    """Rows of an ``output_attentions=True`` generate: encoder once, then per step."""
    if adapter.is_enc_dec:
        enc = getattr(out, "encoder_attentions", None)
        for i, a in enumerate(enc or ()):
            if f"encoder/{i}/self_attention" in wanted:
                sink(f"encoder/{i}/self_attention", a)
        steps = zip(out.decoder_attentions or (), out.cross_attentions or ())
        for self_atts, cross_atts in steps:
            for kind, atts in (("self_attention", self_atts), ("cross_attention", cross_atts)):
                for i, a in enumerate(atts):
                    if f"decoder/{i}/{kind}" in wanted:
                        sink(f"decoder/{i}/{kind}", a)
        return
    for step in out.attentions or ():
        for i, a in enumerate(step):
            if f"decoder/{i}/self_attention" in wanted:
                sink(f"decoder/{i}/self_attention", a)


def _pad_id(opts: Mapping[str, Any], gcfg: Any) -> int:
    for v in (opts.get("pad_token_id"), getattr(gcfg, "pad_token_id", None)):
        if v is not None:
            return int(v)
    eos = _eos_ids(opts, gcfg)
    return eos[0] if eos else 0


def _eos_ids(opts: Mapping[str, Any], gcfg: Any) -> list[int]:
    eos = opts.get("eos_token_id", getattr(gcfg, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generated(
    adapter: Adapter,
    inputs: Mapping[str, Any],
    seq: Tensor,
    prompt_len: int,
    n_max: int,
    opts: Mapping[str, Any],
    gcfg: Any,
) -> Generated:
    """Final ids and real-token masks: a sample's tokens after its EOS are padding."""
    new = seq[:, prompt_len:].cpu()
    eos = _eos_ids(opts, gcfg)
    counts = []
    for row in new.tolist():
        hit = [i for i, t in enumerate(row) if t in eos]
        counts.append(hit[0] + 1 if hit else n_max)
    real_new = np.arange(n_max)[None, :] < np.asarray(counts)[:, None]
    if adapter.is_enc_dec:
        head = np.ones((seq.shape[0], prompt_len), dtype=bool)
        masks = {"decoder": np.concatenate([head, real_new], axis=1)}
        ids = {"decoder": seq}
        if isinstance(inputs.get("input_ids"), Tensor):
            ids["encoder"] = inputs["input_ids"]
            masks["encoder"] = inputs["attention_mask"].bool().cpu().numpy()
    else:
        head = inputs["attention_mask"].bool().cpu().numpy()
        masks = {"decoder": np.concatenate([head, real_new], axis=1)}
        ids = {"decoder": seq}
    return Generated(ids=ids, masks=masks, prompt_length=prompt_len, new_tokens=counts)
