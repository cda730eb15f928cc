"""Batches of texts packed without their padding (deployments/runtimes/packing.py): the same answers as the
padded batch, in one forward pass over the texts' own tokens, and only for models where that holds."""

import logging
import threading

import numpy as np
import pytest
import transformers

from demo.tiny_models import WORDS, build_sentence_model, build_text_model, build_token_model
from deployments.runtimes import ModelRuntime, runtime_for
from deployments.runtimes import packing as packing_module
from deployments.runtimes.packing import Packing, run_batch
from deployments.worker.copies import ModelCopy
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import TaskCatalog

TEXTS = ["hello world", "win a free iphone now", "bad", "this movie was great this movie was great", "the movie"]
"""Five lengths (3 to 10 tokens with the tiny tokenizer's two special ones), so every text but one is padded."""


def _tokens_in(kwargs) -> int:
    """The positions one forward pass computes: batch × longest padded, the texts' own tokens packed."""
    return int(np.prod(kwargs["input_ids"].shape))


def _runtime(tmp_path, task):
    text = build_text_model(tmp_path / "text", "text")
    folder = {
        "text-classification": lambda: text,
        "token-classification": lambda: build_token_model(tmp_path / "ner", "ner"),
        "feature-extraction": lambda: build_sentence_model(tmp_path / "embed", text, prompts={}),
    }[task]()
    rt = runtime_for(ModelSpec(id="m", task=task, source={"path": str(folder)}), device="cpu")
    rt.load()
    return rt


def _model(rt):
    return rt.pipeline.model if hasattr(rt, "pipeline") else rt.model


def _same(got, want):
    """Answers equal to float precision: labels, spans and words exactly, numbers within 1e-5."""
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        for key in got:
            _same(got[key], want[key])
    elif isinstance(got, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    elif isinstance(got, str | int):
        assert got == want
    else:
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=1e-5)


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "feature-extraction"])
def test_a_batch_of_texts_of_several_lengths_runs_packed_and_answers_as_the_padded_batch(tmp_path, task):
    """Each text task's runtime packs a batch of five texts of different lengths into one forward pass over
    their 28 tokens (50 padded), and answers what the padded batch answers, which is what each text gets
    alone (``test_runtimes``)."""
    rt = _runtime(tmp_path, task)
    assert rt.packing is not None and rt.packing.passes == 0
    computed: list[int] = []
    _model(rt).register_forward_pre_hook(lambda _m, _a, kwargs: computed.append(_tokens_in(kwargs)), with_kwargs=True)
    packed = rt.predict(TEXTS)
    assert rt.packing.passes == 1 and computed == [28]
    rt.packing = None
    padded = rt.predict(TEXTS)
    assert computed == [28, 50]
    _same(packed, padded)


def test_a_lone_text_and_texts_of_one_length_are_not_packed(tmp_path):
    """A lone text is never padded, and texts of one length would gain nothing: both run as they are."""
    rt = _runtime(tmp_path, "text-classification")
    rt.predict(["hello world"])
    rt.predict(["hello world", "bad movie", "the spam"])
    assert rt.packing.passes == 0
    rt.predict(["hello world", "bad"])
    assert rt.packing.passes == 1


def _mask(*lengths, longest=None):
    import torch

    longest = longest or max(lengths)
    return torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])


def test_a_batch_is_packed_only_where_its_estimated_cost_is_lower():
    """The linear layers cost per position, the attention per pair of positions it spans (1/(6 × width) of a
    position each in BERT's layers): short texts of several lengths are packed; long ones whose packed
    sequence's attention would cost more than the padding saves are not, nor a sequence longer than the model's
    positions."""
    wide = Packing.__new__(Packing)
    wide.pair, wide.positions = 1 / (6 * 384), 512
    assert wide.worth(_mask(7, 8, 8, 12))
    assert not wide.worth(_mask(12))  # alone
    assert not wide.worth(_mask(9, 9, 9))  # nothing to save
    assert not wide.worth(_mask(300, 300, 10))  # 610 tokens: more than the model's 512 positions
    assert not wide.worth(_mask(*[500] * 15, 400))  # its attention: 7,900² pairs against 16 × 500²
    wide.positions = 10**6
    assert wide.worth(_mask(300, 300, 10))
    assert wide.worth(_mask(20, 20, 20, 4))
    assert not wide.worth(_mask(*[20] * 15, 4))  # 16 positions saved, against the attention over 304
    narrow = Packing.__new__(Packing)
    narrow.pair, narrow.positions = 1 / (6 * 16), 512
    assert wide.worth(_mask(*[20] * 8, 4)) and not narrow.worth(_mask(*[20] * 8, 4))  # its attention weighs more


def test_a_pair_of_positions_weighs_what_the_models_own_layers_make_it():
    """A position goes through every weight of the encoder's linear layers, a pair through two products of
    the width in each layer: 1/(6 × width) of a position in BERT's layers (a feed-forward 4 times as wide),
    more in ModernBERT's (a gated feed-forward 1.5 times as wide: 1/(4.25 × width)). Of two models 768 wide,
    8 texts of 80 to 299 tokens pack in BERT's, not in ModernBERT's (where they took 1.05× the padded batch's
    time packed, docs/performance.md)."""
    from deployments.runtimes.packing import _pair_weight

    shape = {"vocab_size": 64, "pad_token_id": 0, "hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12}
    bert = transformers.BertModel(transformers.BertConfig(**shape, intermediate_size=3072), add_pooling_layer=False)
    modern = transformers.ModernBertModel(transformers.ModernBertConfig(**shape, intermediate_size=1152))
    assert _pair_weight(bert) == pytest.approx(1 / (6 * 768), rel=1e-6)
    assert _pair_weight(modern) == pytest.approx(1 / (4.25 * 768), rel=1e-6)
    lengths = _mask(299, 192, 288, 209, 296, 103, 273, 80)
    packing = Packing.__new__(Packing)
    packing.positions = 8192
    packing.pair = _pair_weight(bert)
    assert packing.worth(lengths)
    packing.pair = _pair_weight(modern)
    assert not packing.worth(lengths)


def test_eager_attention_and_heads_wider_than_the_model_weigh_a_pair_of_positions_more():
    """Eager attention writes each head's scores out, adds the mask and runs a softmax on them
    (``EAGER_PAIR_PER_HEAD`` a head, in multiply-adds' time), where SDPA fuses them: BERT's 768 wide, 12
    heads, weigh a pair 1/(6 × 768) of a position with SDPA, 2.6 times that eager. A model whose heads are
    wider together than its hidden size (Gemma's) computes its products at their width."""
    import torch

    from deployments.runtimes.packing import EAGER_PAIR_PER_HEAD, _pair_weight

    shape = {"vocab_size": 64, "pad_token_id": 0, "hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12}
    eager = transformers.BertConfig(**shape, intermediate_size=3072, attn_implementation="eager")
    bert = transformers.BertModel(eager, add_pooling_layer=False)
    assert _pair_weight(bert) == pytest.approx((2 * 768 + 12 * EAGER_PAIR_PER_HEAD) / (12 * 768**2), rel=1e-6)
    gemma = {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    gemma.update(num_key_value_heads=1, intermediate_size=128, attn_implementation="sdpa")
    narrow, wide = (
        transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**gemma, head_dim=head_dim)) for head_dim in (32, 64)
    )
    assert _pair_weight(wide) > 1.4 * _pair_weight(narrow)  # heads of 128 wide in all, against 64
    # Layers that differ (transformers' per_layer_config): EmbeddingGemma2's last attends with heads of 512.
    config = transformers.EmbeddingGemma2TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, layer_types=["sliding_attention"] * 2 + ["full_attention"],
        per_layer_config={"02": {"head_dim": 128}}, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.EmbeddingGemma2TextModel(config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    products = sum(2 * layer.self_attn.q_proj.out_features for layer in model.layers)  # 2 × (64, 64, 256)
    assert _pair_weight(model) == pytest.approx(products / weights, rel=1e-9)


def test_a_model_whose_every_layer_attends_within_a_window_is_packed_with_that_window(tokenizer, monkeypatch):
    """A model whose every layer attends within a window names no kinds of layer (transformers'
    OpenAIPrivacyFilter, a token classifier, says only ``sliding_window``). Its packed batch's one mask has the
    window, and the check at load, with a text longer than the window, finds the padded batch's answers; with
    no window the mask would let a token attend to its whole text, and the check runs it padded."""
    config = transformers.OpenAIPrivacyFilterConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=40, pad_token_id=0, num_labels=3, initializer_range=0.3,
    )  # fmt: skip
    model = transformers.OpenAIPrivacyFilterForTokenClassification(config).eval()
    assert getattr(model.config, "layer_types", None) is None
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is not None
    monkeypatch.setattr(packing_module, "_sliding_window", lambda _model: None)
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is None


def test_the_check_at_load_needs_a_text_longer_than_the_window_in_tokens(tokenizer, caplog):
    """Words are not tokens: where the tokenizer gives the check's long text no more tokens than the window
    (here it truncates at 12, the window's size), the check could not see the window apply, and the model runs
    padded, saying why."""
    model = _tiny("ModernBertForSequenceClassification", transformers.ModernBertConfig, local_attention=24)
    tokenizer.model_max_length = 12
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert Packing.checked(model, tokenizer, lambda output: output.logits) is None
    assert any("no more tokens than its window, 12" in r.message for r in caplog.records)


def _packs_as_padded(packing, model, tokenizer, texts=TEXTS, atol=1e-6):
    """One batch of ``texts`` run packed (one forward pass) answers the padded batch's logits within ``atol``."""
    import torch

    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        packed, padded = packing.run(model, encoded).logits, model(**encoded).logits
    assert packing.passes == 1
    np.testing.assert_allclose(packed.numpy(), padded.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("base, config_class", [("BertModel", "BertConfig"), ("AlbertModel", "AlbertConfig")])
def test_a_packed_batchs_pooler_output_is_the_padded_batchs_or_none(tokenizer, base, config_class):
    """BERT's pooler module pools (first token, dense, tanh) and is run again on the unpacked output; ALBERT's
    is a bare layer its model pools around, which run on every token would give the wrong tensor: dropped."""
    import torch

    model = _tiny(base, getattr(transformers, config_class))
    packing = Packing.checked(model, tokenizer, lambda output: output.last_hidden_state)
    assert packing is not None
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        packed, padded = packing.run(model, encoded), model(**encoded)
    assert packing.passes == 1
    if base == "BertModel":
        np.testing.assert_allclose(packed.pooler_output.numpy(), padded.pooler_output.numpy(), rtol=0, atol=1e-6)
    else:
        assert packed.pooler_output is None


def _tiny(head, config_class, **extra):
    shape = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    config = config_class(vocab_size=64, max_position_embeddings=40, **{**shape, "pad_token_id": 0, **extra})
    return getattr(transformers, head)(config).eval()


WIDE = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}
"""A real model's width (MiniLM's), for a model of eager attention: at 16 wide its attention weighs so much
more than its layers (``EAGER_PAIR_PER_HEAD``) that no batch of the tests' texts would pack."""


@pytest.fixture
def tokenizer(tmp_path):
    return transformers.AutoTokenizer.from_pretrained(build_text_model(tmp_path / "t", "t"))


def test_a_roberta_models_texts_are_packed_at_the_positions_after_its_padding_tokens(tokenizer, monkeypatch):
    """RoBERTa and its kin count a text's positions from the padding token's id + 1, which the packed
    sequence gives each text; from 0, its answers would differ and the check at load would refuse it."""
    model = _tiny("RobertaForSequenceClassification", transformers.RobertaConfig)
    packing = Packing.checked(model, tokenizer, lambda output: output.logits)
    assert packing is not None and packing.offset == 1
    packing.close()
    positions = packing_module._positions
    monkeypatch.setattr(packing_module, "_positions", lambda m: (0, positions(m)[1]))
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is None


@pytest.fixture
def mpnet_tokenizer():
    """A tokenizer of MPNet's layout: ``<pad>`` is token 1, the padding position MPNet's embeddings keep whatever
    its config says (with the tiny tokenizer's, [UNK] would be 1: an unknown word would take the padding
    position in the padded batch)."""
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *WORDS]
    return transformers.MPNetTokenizer(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>")


def test_an_mpnet_model_is_packed_at_the_positions_after_its_padding_token(mpnet_tokenizer):
    """MPNet (all-mpnet-base-v2's kind) has a table of absolute positions from its padding token's id + 1 and
    a bias by relative position, which a packed text has as it has alone (its own tokens, in their order):
    its batches pack, with the padded batch's answers."""
    model = _tiny("MPNetForSequenceClassification", transformers.MPNetConfig, pad_token_id=1, **WIDE)  # eager
    packing = Packing.checked(model, mpnet_tokenizer, lambda output: output.logits)
    assert packing is not None and packing.offset == 2
    encoded = mpnet_tokenizer(TEXTS, padding=True, return_tensors="pt")
    _same(packing.run(model, encoded).logits.tolist(), model(**encoded).logits.tolist())
    assert packing.passes == 1


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_a_text_that_spells_the_padding_token_is_packed_at_the_positions_it_has_alone(tokenizer, mpnet_tokenizer, kind):
    """A model whose positions start after its padding token's numbers a text's tokens from the token ids, as
    transformers does: a padding token that the text itself spells takes the padding position and is not
    counted. Packed, such a text keeps the positions it has alone, so its answer is the padded batch's to
    float precision (1e-9 apart here; counted, it would be about 4e-6 apart)."""
    head, config_class, tok = {
        "roberta": ("RobertaForSequenceClassification", transformers.RobertaConfig, tokenizer),
        "mpnet": ("MPNetForSequenceClassification", transformers.MPNetConfig, mpnet_tokenizer),
    }[kind]
    model = _tiny(head, config_class, pad_token_id=tok.pad_token_id, **WIDE)  # MPNet's attention is eager
    packing = Packing.checked(model, tok, lambda output: output.logits)
    texts = [f"hello {tok.pad_token} world this is", "the movie", "a b"]
    assert tok(texts)["input_ids"][0].count(tok.pad_token_id) == 1  # spelled: one token of the text
    _packs_as_padded(packing, model, tok, texts, atol=1e-7)


RELATIVE = {"relative_attention": True, "position_biased_input": False}


@pytest.mark.parametrize(
    ("head", "config_class", "positions"),
    [
        ("DebertaV2ForSequenceClassification", transformers.DebertaV2Config, RELATIVE),  # v3
        ("DebertaV2ForSequenceClassification", transformers.DebertaV2Config, {}),  # v2: absolute and relative
        ("DebertaForSequenceClassification", transformers.DebertaConfig, RELATIVE),  # v1
    ],
)
def test_a_deberta_model_is_packed_with_the_block_mask_given_to_its_encoder(
    tokenizer, caplog, monkeypatch, head, config_class, positions
):
    """DeBERTa's embeddings multiply by the mask as the padded batch's ``[batch, longest]``, so they refuse the
    packed block mask. Its relative positions (v3's alone; v2's beside a table of absolute ones) weigh the
    distance between two tokens, the same within a packed text: it packs with a mask of ones to the model and
    the block mask to its encoder, and answers as the padded batch."""
    model = _tiny(head, config_class, **positions, **WIDE)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        packing = Packing.checked(model, tokenizer, lambda output: output.logits)
    assert packing is not None and packing.to_encoder and not caplog.records
    _packs_as_padded(packing, model, tokenizer)
    packing.close()
    assert not model.base_model.encoder._forward_pre_hooks
    monkeypatch.setattr(packing_module, "_encoder", lambda _model: None)  # no second try
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert Packing.checked(model, tokenizer, lambda output: output.logits) is None
    assert any("refused the packed inputs" in r.message for r in caplog.records)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_modernbert_model_is_packed_with_a_mask_for_each_kind_of_layer(tokenizer, monkeypatch, attention):
    """ModernBERT has rotary positions (they weigh the distance between two tokens, the same within a packed
    text), and attends globally in every third layer and within a window in the others. Its packed batch has a
    mask for each kind of layer, the window's as transformers builds it, and answers as the padded batch. With
    one mask for every layer, its sliding layers would attend past their window: the check at load finds its
    answers differ, and runs it padded."""
    config = {"local_attention": 4, "attn_implementation": attention, **WIDE}  # a window of 2 tokens either way
    model = _tiny("ModernBertForSequenceClassification", transformers.ModernBertConfig, **config)
    packing = Packing.checked(model, tokenizer, lambda output: output.logits)
    assert packing is not None and packing.offset == 0
    _packs_as_padded(packing, model, tokenizer)
    packing.close()
    monkeypatch.setattr(packing_module, "_sliding_window", lambda _model: None)  # one mask for every layer
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is None


def test_the_check_at_load_sees_a_window_longer_than_its_texts_apply(tokenizer, monkeypatch, caplog):
    """A window of 12 tokens either way spans each of the check's three texts whole, so the check adds a text
    past it: a packed batch whose sliding layers attended past their window (here, given no window) is found
    to answer otherwise, and runs padded."""
    model = _tiny("ModernBertForSequenceClassification", transformers.ModernBertConfig, local_attention=24)
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is not None
    block_mask = Packing.__dict__["_block_mask"].__func__
    monkeypatch.setattr(Packing, "_block_mask", staticmethod(lambda model, text, window=None: block_mask(model, text)))
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert Packing.checked(model, tokenizer, lambda output: output.logits) is None
    assert any("answers differ" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("head", "config_class", "extra", "reason"),
    [
        (
            "DebertaV2ForSequenceClassification",
            transformers.DebertaV2Config,
            {"relative_attention": True, "position_biased_input": False, "conv_kernel_size": 3},  # v2 xlarge's
            "with the mask given to its encoder, its forward refused the packed inputs",
        ),
        (
            "ModernBertForSequenceClassification",
            transformers.ModernBertConfig,
            {"classifier_pooling": "mean"},
            "refused the packed inputs",
        ),
        ("T5EncoderModel", transformers.T5Config, {}, "takes no position_ids"),
        (
            "EsmForSequenceClassification",
            transformers.EsmConfig,
            {"token_dropout": True, "mask_token_id": 4},
            "refused the packed inputs",
        ),
        ("ConvBertForSequenceClassification", transformers.ConvBertConfig, {"embedding_size": 16}, "answers differ"),
        (
            "AlbertForSequenceClassification",
            transformers.AlbertConfig,
            {"embedding_size": 8},
            "must be Tensor, not None",
        ),
    ],
)
def test_a_model_whose_packed_batch_would_answer_otherwise_runs_padded(
    tokenizer, caplog, head, config_class, extra, reason
):
    """The check at load packs only a model whose forward takes ``position_ids`` (T5's encoder does not) and
    whose answers, and its encoder's output at every token, are the padded batch's with texts of three lengths
    run both ways: ModernBERT's mean pooling reads the mask as the padded batch's, and so do ESM's embeddings
    (which a mask of ones to the model would not keep to each text: only DeBERTa gets that second try), DeBERTa
    v2's convolution (its xlarge models') reads it too, and would reach across texts, as ConvBERT's do; ALBERT's
    pooler is a bare linear layer its model pools around, whose output the unpacking drops (its classifier
    then fails on None). Each is left to padded batches,
    saying why in the replica's log, and without the refused packing's hooks."""
    model = _tiny(head, config_class, **extra)
    with caplog.at_level(logging.INFO, logger="ray.serve"):  # the replica's log
        assert Packing.checked(model, tokenizer, lambda output: output.logits) is None
    assert any(f"batches of {head} run padded" in r.message and reason in r.message for r in caplog.records)
    assert not model.base_model._forward_hooks
    assert not getattr(model.base_model, "encoder", model.base_model)._forward_pre_hooks


def test_a_model_of_eager_attention_is_packed_with_an_additive_mask(tokenizer):
    """Eager attention adds the mask to its scores (a boolean one would add 1.0 and mask nothing): its packed
    mask is additive, as transformers builds its own, and its batches pack with the padded batch's answers."""
    model = _tiny("BertForSequenceClassification", transformers.BertConfig, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert Packing.checked(model, tokenizer, lambda output: output.logits) is not None


def test_batches_padded_on_the_left_are_not_packed(tokenizer):
    """A model of absolute positions reads a text padded on the left at other positions than alone, and
    sentence-transformers answers it so: the packing, which gives each text its own, would answer otherwise."""
    model = _tiny("BertModel", transformers.BertConfig)
    assert Packing.checked(model, tokenizer, lambda output: output.last_hidden_state, "left") is None
    assert Packing.checked(model, tokenizer, lambda output: output.last_hidden_state, "right") is not None


def test_a_packed_call_leaves_a_padded_call_of_the_same_model_as_it_was(tokenizer):
    """The hook that puts a packed output back in the padded layout acts on the packed calls only."""
    import torch

    model = _tiny("BertForTokenClassification", transformers.BertConfig)
    packing = Packing.checked(model, tokenizer, lambda output: output.logits)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**encoded).logits
        packed = packing.run(model, encoded).logits
        after = model(**encoded).logits
    assert packing.passes == 1
    assert before.shape == packed.shape == after.shape == (5, 10, 2)
    assert torch.equal(before, after)
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(packed[mask], before[mask], rtol=1e-4, atol=1e-5)


class OwnEncoder(ModelRuntime):
    """A text runtime of one's own that packs its batches as docs/models.md says."""

    task = "feature-extraction"

    def load(self) -> None:
        folder, _ = self.model_files()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).eval()
        self.packing = Packing.checked(self.model, self.tokenizer, lambda out: out.last_hidden_state)

    def predict(self, inputs):
        import torch

        encoded = self.tokenizer(inputs, padding=True, padding_side="right", return_tensors="pt")
        with torch.inference_mode():
            hidden = run_batch(self.packing, self.model, encoded).last_hidden_state
        return list(hidden[:, 0].numpy())

    def unload(self) -> None:
        self.model = self.tokenizer = None


def test_a_runtime_of_ones_own_packs_its_batches_as_the_docs_say_and_the_replica_counts_them(tmp_path):
    """``Packing.checked`` at load, ``run_batch`` on a batch: packed, with the padded batch's answers; a
    model copy reads its runtime's ``packing`` for GET /models (``packed_batches``), none once unloaded."""
    spec = ModelSpec(id="own", task="feature-extraction", source={"path": str(build_text_model(tmp_path / "m", "m"))})
    copy = ModelCopy(spec, OwnEncoder(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    rt = copy.runtime
    packed = rt.predict(TEXTS)
    assert copy.packed_batches == rt.packing.passes == 1
    packing, rt.packing = rt.packing, None
    np.testing.assert_allclose(np.array(packed), np.array(rt.predict(TEXTS)), atol=1e-5)
    assert copy.packed_batches is None  # its batches run padded
    rt.packing = packing
    copy.unload()
    assert copy.packed_batches is None


def test_a_packed_call_and_a_padded_call_of_one_model_in_two_threads_each_get_their_own_answer(tokenizer):
    """The unpacking acts on the calls of the thread that packed: a padded call that runs on another thread
    while a packed one is inside the encoder gets its own padded output, and the packed one its own."""
    import torch

    model = _tiny("BertForTokenClassification", transformers.BertConfig)
    packing = Packing.checked(model, tokenizer, lambda output: output.logits)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    other = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want, want_other = model(**encoded).logits, model(**other).logits
    inside, done, got = threading.Event(), threading.Event(), {}

    def hold(_module, _args):  # the packed call waits inside the encoder until the padded one is done
        if threading.current_thread().name == "packed":
            inside.set()
            assert done.wait(10)

    held = model.base_model.register_forward_pre_hook(hold)

    def packed():
        with torch.inference_mode():
            got["packed"] = packing.run(model, encoded).logits

    thread = threading.Thread(target=packed, name="packed")
    thread.start()
    assert inside.wait(10)
    with torch.inference_mode():
        got["padded"] = model(**other).logits
    done.set()
    thread.join(10)
    held.remove()
    assert packing.passes == 1
    assert torch.equal(got["padded"], want_other)
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(got["packed"][mask], want[mask], rtol=1e-4, atol=1e-5)


def test_the_check_at_load_needs_texts_its_tokenizer_pads(tokenizer, monkeypatch, caplog):
    """Texts of one length would test no padding: a tokenizer that gives the check's texts one length leaves
    the model to padded batches."""
    monkeypatch.setattr(packing_module, "PROBE_TEXTS", ("hello world", "bad movie", "the spam"))
    model = _tiny("BertModel", transformers.BertConfig)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert Packing.checked(model, tokenizer, lambda output: output.last_hidden_state) is None
    assert any("gave the check's texts one length" in r.message for r in caplog.records)
