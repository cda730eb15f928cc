"""Batches of texts run without their padding: the texts' tokens packed into one sequence.

A batch of texts is padded to its longest, and a text encoder then computes every padded position as it
computes a token: its linear layers, most of its time, run on ``batch × longest`` positions. Packed, the
texts' tokens are one sequence of ``sum of lengths`` positions, each text at the positions it has alone
(``position_ids``), an attention mask that keeps each text to its own tokens (block-diagonal, 4-D; one for
each kind of layer where a model's layers attend within a sliding window or globally); the
encoder's output is put back in the padded layout before the model's head reads it (a forward hook on the
encoder, ``model.base_model``: a pooler on the first token, a classifier per token or per text, pooling
over the mask), so that the runtime reads the same tensors as from the padded batch.

On the demo text models (6 layers, 384 wide; one torch thread), a batch of 3 of the benchmark's four
sentences (7 to 12 tokens) took 0.86× the padded batch's time, 16 of them 0.82×, and 3 of the same length
0.99× (docs/performance.md). The attention then spans the whole packed sequence, so a batch is packed only
where its estimated cost is lower (``worth``). A lone text is never padded, so never packed.

Packing is used for a model only where its answers are the padded batch's (``Packing.checked``, at load,
on texts of different lengths): a model whose forward takes ``position_ids`` and a 4-D attention mask. Its
positions may be absolute (BERT), relative (MPNet's bias) or rotary (ModernBERT): the last two weigh the
distance between two tokens, which is the same within a packed text. DeBERTa, whose embeddings read the
mask as the padded batch's, gets a mask of ones, and its encoder the block mask (``MASK_TO_ENCODER``). A
model whose forward refuses the packed inputs, a decoder (its mask is causal), or one whose answers differ
is left to padded batches.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")  # the replica's log

PROBE_TEXTS = ("a b c d e f g h i j", "x", "hello world, again")
"""The texts of the check at load: three lengths, so that every one but the longest is padded."""

RTOL, ATOL = 1e-3, 1e-4
"""How close the packed batch's outputs must be to the padded one's at the check (float32; the order of the
sums differs, about 1e-7 apart on the demo models)."""
HALF_TOL = 2e-2
"""The same for a model in half precision."""


class PackingRefused(Exception):
    """A model whose batches cannot be packed (why, for the log)."""


class ForwardRefused(PackingRefused):
    """A model whose forward raised on the packed inputs at the check."""


class Packing:
    """Packs the batches of one model copy. It holds a forward hook on the model's encoder, which puts a
    packed output back in the padded layout for the calls that ``run`` makes in the same thread (a copy may
    run in several threads: its check at load, then its batches)."""

    def __init__(self, model: Any, position_offset: int, positions: int, to_encoder: bool = False) -> None:
        self.offset = position_offset
        self.positions = positions  # the rows of its position table past the offset: the most tokens packed
        self.pair = _pair_weight(model)  # a pair of positions in the attention, in positions' cost
        self.passes = 0  # forward passes run packed (GET /models: packed_batches); a copy runs one at a time
        self.to_encoder = to_encoder  # the block mask goes to the encoder (``_to_encoder``), the model gets ones
        self.window = _sliding_window(model)  # its layers' sliding window, if any
        self.by_kind = bool(getattr(model.config, "layer_types", None))  # a mask for each kind of layer
        self._local = threading.local()
        self._handles = [model.base_model.register_forward_hook(self._unpack)]
        if to_encoder:
            encoder = model.base_model.encoder
            self._handles.append(encoder.register_forward_pre_hook(self._to_encoder, with_kwargs=True))

    @classmethod
    def checked(
        cls, model: Any, tokenizer: Any, read: Callable[[Any], Any], padding_side: str = "right", **kwargs: Any
    ) -> Packing | None:
        """A packing of ``model``'s batches, or None where its answers would not be the padded batch's.
        ``read`` takes the tensor the runtime reads from the model's output (logits, the last hidden state);
        ``padding_side`` is the side the runtime's batches are padded on; ``kwargs`` go to every call of
        ``model``, as the runtime passes them."""
        # A model whose own layers read the mask as the padded batch's [batch, longest] (DeBERTa's embeddings
        # multiply by it) refuses the packed inputs: DeBERTa is tried again with the block mask given to its
        # encoder (MASK_TO_ENCODER).
        tries = (False, True) if _encoder(model) is not None else (False,)
        reasons: list[str] = []
        if padding_side != "right":  # a text's positions then depend on its batch's longest (the padded batch's
            # answer, which sentence-transformers gives too); packed, each text has its own
            tries, reasons = (), ["its batches are padded on the left"]
        for to_encoder in tries:
            packing = None
            try:
                packing = cls(model, *_positions(model), to_encoder=to_encoder)
                packing._check(model, tokenizer, read, kwargs)
                return packing
            except Exception as e:  # refused, a forward that refuses the packed inputs, or answers that differ
                if packing is not None:
                    packing.close()
                reasons.append(f"with the mask given to its encoder, {e}" if to_encoder else str(e))
                if not isinstance(e, ForwardRefused):
                    break
        logger.info("batches of %s run padded: %s", type(model).__name__, "; ".join(reasons))
        return None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def worth(self, mask: Any) -> bool:
        """Whether a batch of this attention mask ``[batch, longest]`` runs faster packed: its linear layers
        cost in proportion to the positions, its attention to the pairs of positions it spans, each a ``pair``
        of a position's cost (``_pair_weight``). The padded batch's pairs are each text's own,
        ``batch × longest²``; the packed sequence's, its length squared (the mask's zeros are computed too).
        So a lone text, or texts of one length, which save nothing, are never packed; nor a sequence longer
        than the model's positions."""
        batch, longest = mask.shape
        tokens = int(mask.sum())
        if self.pair <= 0 or tokens > self.positions:
            return False
        return tokens + tokens * tokens * self.pair < batch * longest * (1 + longest * self.pair)

    def run(self, model: Any, encoded: Any, **kwargs: Any) -> Any:
        """``model(**encoded, **kwargs)``, packed where it is worth it: the output as the padded batch's."""
        mask = encoded.get("attention_mask")
        if mask is None or not self.worth(mask):
            return model(**encoded, **kwargs)
        output = self._packed(model, encoded, mask.bool(), kwargs)
        self.passes += 1
        return output

    def _packed(self, model: Any, encoded: Any, mask: Any, kwargs: dict[str, Any]) -> Any:
        import torch

        lengths = mask.sum(dim=1)
        text = torch.repeat_interleave(torch.arange(len(lengths), device=mask.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = self._positions_of(encoded["input_ids"][mask], text, starts)
        inputs = {
            key: value[mask].unsqueeze(0)
            for key, value in encoded.items()
            if key != "attention_mask" and getattr(value, "shape", None) is not None and value.shape[:2] == mask.shape
        }
        inputs["position_ids"] = positions.unsqueeze(0)
        if self.to_encoder:  # every packed token is a text's own: the model's mask is ones, its encoder's the block
            inputs["attention_mask"] = torch.ones((1, len(text)), dtype=torch.long, device=mask.device)
            self._local.encoder_mask = (text[:, None] == text[None, :])[None]
        else:
            inputs["attention_mask"] = self._attention_mask(model, text)
        self._local.mask = mask
        try:
            output = model(**inputs, **kwargs)
        finally:
            self._local.mask = self._local.encoder_mask = None
        return output

    def _to_encoder(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The encoder's mask, where the model's own layers read the mask as the padded batch's: the block mask
        ``[1, tokens, tokens]``, boolean, as DeBERTa's encoder takes one (``get_attention_mask``)."""
        mask = getattr(self._local, "encoder_mask", None)
        if mask is None:  # a call of the padded batch, or another thread's
            return None
        if "attention_mask" in kwargs:
            return args, {**kwargs, "attention_mask": mask}
        if len(args) < 2:
            raise ForwardRefused("its encoder was called without a mask")
        return (args[0], mask, *args[2:]), kwargs

    def _positions_of(self, ids: Any, text: Any, starts: Any) -> Any:
        """The position id of each packed token (``ids``; ``text``: each token's text, ``starts``: where each
        text begins), the one it has alone. A model whose positions start after the padding token's
        (``offset`` > 0: RoBERTa and its kin, MPNet) numbers them as transformers does from the token ids
        (``create_position_ids_from_input_ids``): a padding token inside a text (a text that spells the
        tokenizer's ``<pad>``) takes the padding position and is not counted. Others count from 0."""
        import torch

        if not self.offset:
            return torch.arange(len(text), device=ids.device) - starts[text]
        padding = self.offset - 1
        counted = (ids != padding).long()
        before = torch.cumsum(counted, 0) - counted  # the tokens counted before each, over the whole sequence
        return (torch.cumsum(counted, 0) - before[starts][text]) * counted + padding

    def _attention_mask(self, model: Any, text: Any) -> Any:
        """The packed sequence's mask: one for every layer, windowed where every layer attends within a window;
        a mask for each kind of layer where some do (``config.layer_types``), as transformers builds them."""
        if self.window is None:
            return self._block_mask(model, text)
        if self.by_kind:
            return {
                "full_attention": self._block_mask(model, text),
                "sliding_attention": self._block_mask(model, text, self.window),
            }
        return self._block_mask(model, text, self.window)

    @staticmethod
    def _block_mask(model: Any, text: Any, window: int | None = None) -> Any:
        """The 4-D mask that keeps each token to its own text's (``text``: each token's text), and within
        ``window`` tokens of it either way for a layer of sliding-window attention (as transformers'
        ``sliding_window_bidirectional_overlay``: a distance of at most the window): boolean for SDPA
        attention, which runs faster with it than with an additive one (17.6 against 19.4 ms a batch of the
        demo sentiment model's, one thread); additive, in the model's dtype, for the others, as transformers
        builds its own (eager attention adds the mask to the scores: a boolean one would add 1.0)."""
        import torch

        same = text[:, None] == text[None, :]
        if window is not None:
            index = torch.arange(len(text), device=text.device)
            same &= (index[:, None] - index[None, :]).abs() <= window
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            return same[None, None]
        dtype = model.dtype
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)[
            None, None
        ]

    def _unpack(self, module: Any, args: Any, output: Any) -> Any:
        mask = getattr(self._local, "mask", None)
        if mask is None:  # a call of the padded batch, or another thread's
            return None
        hidden = output["last_hidden_state"]
        padded = hidden.new_zeros((*mask.shape, hidden.shape[-1]))
        padded[mask] = hidden[0]
        output["last_hidden_state"] = padded
        if output.get("pooler_output") is not None:
            pooler = getattr(module, "pooler", None)
            if pooler is None:
                raise PackingRefused("its encoder pools the sequence without a pooler module of its own")
            pooled = pooler(padded)
            # A pooler module that pools (BERT's: first token, dense, tanh) gives one vector a text; a bare
            # layer whose model pools around it (ALBERT's, BigBird's) gives one a token, without the pooling:
            # that pooler output is dropped, and a head or runtime that reads it fails instead of reading it.
            output["pooler_output"] = pooled if pooled.shape == (mask.shape[0], hidden.shape[-1]) else None
        return output

    def _check(self, model: Any, tokenizer: Any, read: Callable[[Any], Any], kwargs: dict[str, Any]) -> None:
        import torch

        texts = list(PROBE_TEXTS)
        window = self.window
        reach = window is not None and window + 1 < self.positions  # a text may be longer than the window
        if reach:  # a text past the window, so that the check sees a layer's window apply
            words = PROBE_TEXTS[0].split()
            texts.append(" ".join(words[k % len(words)] for k in range(min(window + 8, self.positions - 2))))
        encoded = tokenizer(texts, padding=True, truncation=True, padding_side="right", return_tensors="pt")
        encoded = encoded.to(model.device)
        mask = encoded["attention_mask"].bool()
        if bool(mask.all()):
            raise PackingRefused("its tokenizer gave the check's texts one length")
        if reach and int(mask.sum(dim=1).max()) <= window + 1:
            raise PackingRefused(f"its tokenizer gave the check's long text no more tokens than its window, {window}")
        # What the runtime reads, and the encoder's output at every token of the texts (seen after the unpacking):
        # a head that reads one token (a classifier's first) could hide a difference at the others.
        tokens: list[Any] = []
        seen = model.base_model.register_forward_hook(lambda _m, _a, output: tokens.append(output[0]))
        try:
            with torch.inference_mode():
                padded = read(model(**encoded, **kwargs))
                try:
                    packed = read(self._packed(model, encoded, mask, kwargs))
                except Exception as e:  # e.g. a layer that reads the mask as the padded batch's [batch, longest]
                    raise ForwardRefused(f"its forward refused the packed inputs ({type(e).__name__}: {e})") from e
        finally:
            seen.remove()
        if padded.shape != packed.shape:
            shapes = f"{tuple(packed.shape)}, not {tuple(padded.shape)}"
            raise PackingRefused(f"packed, it answered a tensor of shape {shapes}")
        half = model.dtype in (torch.float16, torch.bfloat16)
        rtol, atol = (HALF_TOL, HALF_TOL) if half else (RTOL, ATOL)
        for want, got in ((padded, packed), tokens):
            if want.dim() >= 2 and want.shape[:2] == mask.shape:  # one row per token: the texts' own tokens
                want, got = want[mask], got[mask]
            want, got = want.float(), got.float()
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                gap = float((got - want).abs().max())
                raise PackingRefused(f"packed, its answers differ from the padded batch's (by up to {gap:.3g})")


def _positions(model: Any) -> tuple[int, int]:
    """The first position id of a text in ``model`` (``transformers.first_position``), and
    the positions its table holds past it: no packed sequence is longer, since a model may keep buffers of
    that length (``token_type_ids``' default). A model of no table of absolute positions
    (``transformers.position_table``: rotary or relative positions, which weigh the distance between two
    tokens, the same within a packed text) counts from 0, up to its config's ``max_position_embeddings``.
    PackingRefused for a model whose forward takes no ``position_ids``, or of no table and no such number."""
    from deployments.runtimes.transformers import first_position, position_table

    for forward in (model.forward, model.base_model.forward):
        parameters = inspect.signature(forward).parameters
        if "position_ids" not in parameters:
            raise PackingRefused(f"{type(forward.__self__).__name__}.forward takes no position_ids")
    table = position_table(model)
    if table is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(limit, int) or limit <= 0:
            raise PackingRefused("it has no table of absolute positions, and no max_position_embeddings")
        return 0, limit
    offset = first_position(table)
    return offset, table.num_embeddings - offset


EAGER_PAIR_PER_HEAD = 200
"""What eager attention adds to a pair of positions, for each head, in multiply-adds' time: it writes every
head's scores out, adds the mask to them and runs a softmax over them, where SDPA fuses them. Measured on the
shape of MiniLM-L12 (384 wide, 12 heads; one thread), 6 texts of 50 to 90 tokens packed took 1.21× the padded
batch's time eager and 0.94× with SDPA, where the cost rule without it said 0.90× (about 210 a head fits
both); on base-size MPNet (eager, 12 heads), 8 texts of 6 to 65 tokens 0.70× measured, 0.70× estimated."""


MASK_TO_ENCODER = ("deberta", "deberta-v2")
"""The kinds of model (``config.model_type``) whose block mask may go to their encoder alone, the model getting a
mask of ones: DeBERTa's embeddings multiply by the mask, and nothing else of it reads the mask. Not every model
whose forward refuses the block mask: ESM's embeddings scale each text by its share of ``<mask>`` tokens over
the mask, which a mask of ones would take over the whole packed sequence (a review found its answers 8.8e-4
apart in a batch with a ``<mask>``, where the check's texts have none)."""


def _encoder(model: Any) -> Any | None:
    """The encoder module of ``model``'s base model where its block mask may go to it (``MASK_TO_ENCODER``),
    else None."""
    import torch

    if getattr(model.config, "model_type", None) not in MASK_TO_ENCODER:
        return None
    encoder = getattr(model.base_model, "encoder", None)
    return encoder if isinstance(encoder, torch.nn.Module) else None


def _pair_weight(model: Any) -> float:
    """What a pair of positions costs in the attention of ``model``'s encoder, in positions' cost: a position
    goes through every linear layer (a multiply-add for each of their weights), a pair through two products as
    wide as the attention's heads in each layer (a query by a key, a weight by a value: ``num_attention_heads
    × head_dim``, twice the hidden size in Gemma's layers), and eager attention's work on each head's scores
    (``EAGER_PAIR_PER_HEAD``). For BERT with SDPA (a feed-forward 4 times as wide: 12 hidden_size² weights a
    layer) that is 1/(6 × hidden_size); ModernBERT's narrower, gated feed-forward (8.5 hidden_size²) weighs
    its attention more, 1/(4.25 × hidden_size), where packing 8 texts of 80 to 299 tokens took 1.05× the
    padded batch's time. 0 (never packed) where the model does not say."""
    import torch

    config = model.config
    layers = getattr(config, "num_hidden_layers", None)
    weights = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    if not isinstance(layers, int) or layers <= 0 or weights <= 0:
        return 0.0
    try:  # a model's layers may differ (transformers' per_layer_config: EmbeddingGemma2's last, 512 a head)
        each = [config.per_layer_config[k] for k in range(layers)]
    except (AttributeError, IndexError, KeyError, TypeError):
        each = [config] * layers
    eager = getattr(config, "_attn_implementation", None) != "sdpa"
    pairs = 0
    for layer in each:
        width, heads = getattr(layer, "hidden_size", None), getattr(layer, "num_attention_heads", None)
        if not isinstance(width, int) or not isinstance(heads, int) or width <= 0 or heads <= 0:
            return 0.0
        pairs += 2 * heads * (getattr(layer, "head_dim", None) or width // heads) + eager * EAGER_PAIR_PER_HEAD * heads
    return pairs / weights


def _sliding_window(model: Any) -> int | None:
    """The window, in tokens either way, of a model whose layers attend within a sliding window
    (``config.sliding_window``): every layer's, where the config names no kinds of layer, else those of the
    kind ``sliding_attention`` (``config.layer_types``: ModernBERT's two layers of three, within 64 tokens;
    the third attends globally). None for a model of no such layer."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ()
    if kinds and "sliding_attention" not in kinds:
        return None
    if not kinds and window is None:
        return None
    if not isinstance(window, int) or window <= 0:
        raise PackingRefused(f"it has layers of sliding-window attention, of a sliding_window of {window!r}")
    return window


def run_batch(packing: Packing | None, model: Any, encoded: Any, **kwargs: Any) -> Any:
    """``model(**encoded, **kwargs)`` for a batch of texts: packed where ``packing`` (the copy's, None where its
    check refused it) finds it worth it."""
    return model(**encoded, **kwargs) if packing is None else packing.run(model, encoded, **kwargs)
