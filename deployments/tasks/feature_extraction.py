"""``feature-extraction``: sentences in, one embedding each, pooled and normalised as the model was trained.

The pooling comes from the model's own sentence-transformers files, when it has them: ``modules.json``
(the modules in order: the transformer, its folder; a ``Normalize`` module means unit-length vectors) and
the pooling module's ``config.json``: ``pooling_mode`` (a mode, or a list of modes whose vectors are
concatenated, as sentence-transformers 5 and later write it) or the older ``pooling_mode_*_token(s)`` flags
(none set: mean, as sentence-transformers reads them), with ``sentence_bert_config.json``'s
``max_seq_length``. The modes are sentence-transformers': ``cls``, ``max``, ``mean``, ``mean_sqrt_len``
(its ``mean_sqrt_len_tokens``), ``weightedmean`` and ``lasttoken``. A model without those files is
mean-pooled and not normalised; a model of texts and images in one space (CLIP, SigLIP:
``get_text_features``) answers its projected text features, which its image embeddings are compared with.
``Dense`` modules between the pooling and ``Normalize`` (LaBSE's kind
of model: an activation of a linear map, with or without a residual) run in order, and
``sentence_bert_config.json``'s ``do_lower_case`` lowercases every text before the tokenizer's own
normalisation, as sentence-transformers does. Registry ``parameters`` override the pooling and the
normalisation: ``{"pooling": "mean" (or a list of modes), "normalize": true | false, "max_seq_length":
128}``. Prompts are put before every input as ``encode`` puts them: the model's default
(``config_sentence_transformers.json``'s ``default_prompt_name``), or the one the registry's
``"prompt_name": "query"`` names among the model's ``prompts``, or its ``"prompt": "query: "`` (``""``
for none); a pooling module with ``include_prompt`` false leaves the prompt's tokens out of the pooling. A
model with other modules (or these in another order), or that renders its texts through a chat template
(the ``message`` modality), fails its load with the reason.

Each batch is one tokenizer call and one forward pass (up to 32 sentences a pass), as sentence-transformers'
``encode`` computes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from deployments.runtimes.base import ModelRuntime
from deployments.runtimes.packing import Packing, run_batch
from deployments.runtimes.transformers import (
    bound_tokenizer,
    checked_flag,
    checked_tokens,
    embedding_rows,
    forward_batch,
    in_forward_passes,
    joint_space,
    projected,
    quiet_tokenizers,
    trained_weights,
)
from serve_app.core.errors import InvalidInput, echo
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import EMBEDDING, EmbeddingOptions
from serve_app.core.tasks import Task

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
"""The pooling modes, by this runtime's names (sentence-transformers calls ``mean_sqrt_len``
``mean_sqrt_len_tokens``)."""

_ST_MODES = {**{m: m for m in POOLING_MODES}, "mean_sqrt_len_tokens": "mean_sqrt_len"}
_LEGACY_FLAGS = {  # sentence-transformers' order, which is the order of their vectors
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """The modes of a sentence-transformers pooling module's ``config.json``, in order."""
    modes = config.get("pooling_mode")
    if modes is None:
        unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _LEGACY_FLAGS]
        if unknown:
            raise ValueError(f"unsupported sentence-transformers pooling: {unknown}")
        modes = [mode for key, mode in _LEGACY_FLAGS.items() if config.get(key)] or ["mean"]
    return checked_modes(modes, "sentence-transformers pooling")


def checked_modes(modes: Any, what: str) -> tuple[str, ...]:
    """Pooling modes (a name or a list of names) by this runtime's names; ValueError for an unknown one."""
    names = [modes] if isinstance(modes, str) else list(modes) if isinstance(modes, (list, tuple)) else []
    if not names or not all(isinstance(m, str) and m in _ST_MODES for m in names):
        raise ValueError(f"unknown {what} {modes!r}: one of {', '.join(POOLING_MODES)}, or a list of them")
    return tuple(_ST_MODES[m] for m in names)


def _file(model: str, revision: str | None, name: str, folder: str = "") -> Path | None:
    """One file of a model, in its ``folder`` (a sentence-transformers module's; "" for the model's own), from
    a local folder or a hub revision in the local cache; None if it has none."""
    from transformers.utils import cached_file

    found = cached_file(
        model,
        f"{folder}/{name}" if folder else name,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_gated_repo=False,
    )
    return Path(found) if found else None


def sentence_transformers_config(model: str, revision: str | None) -> dict[str, Any]:
    """The pooling, normalisation, transformer folder and maximum length a sentence-transformers model was
    trained with (an empty dict for a model without sentence-transformers files)."""
    modules_file = _file(model, revision, "modules.json")
    if modules_file is None:
        return {}
    modules = json.loads(modules_file.read_text())
    config: dict[str, Any] = {"normalize": False, "dense": []}
    st_file = _file(model, revision, "config_sentence_transformers.json")
    st_config = json.loads(st_file.read_text()) if st_file is not None else {}
    config["prompts"] = st_config.get("prompts") or {}
    config["prompt_name"] = st_config.get("default_prompt_name")
    for m in modules:
        kind, path = m["type"].rsplit(".", 1)[-1], m.get("path", "")
        if kind == "Transformer":
            config["subfolder"] = path
            bert = _file(model, revision, "sentence_bert_config.json", path)
            if bert is not None:
                transformer = json.loads(bert.read_text())
                if "message" in (transformer.get("modality_config") or {}):  # sentence-transformers 6's chat models
                    raise ValueError("the model renders its texts through a chat template (modality 'message')")
                config["max_seq_length"] = transformer.get("max_seq_length")
                config["lowercase"] = bool(transformer.get("do_lower_case", False))
        elif kind == "Pooling":
            pooling_file = _file(model, revision, "config.json", path)
            pooling = json.loads(pooling_file.read_text()) if pooling_file is not None else {}
            config["pooling"] = pooling_modes(pooling)
            config["include_prompt"] = bool(pooling.get("include_prompt", True))
        elif kind == "Dense" and "pooling" in config and not config["normalize"]:
            config["dense"].append(dense_layer(model, revision, path))
        elif kind == "Normalize":
            config["normalize"] = True
        else:
            raise ValueError(f"unsupported sentence-transformers module {m['type']!r} (or not in this order)")
    return config


def dense_layer(model: str, revision: str | None, path: str) -> Any:
    """A sentence-transformers ``Dense`` module (after the pooling, before ``Normalize``): its activation
    of a linear map of the pooled vector, plus the vector (or a linear map of it) with ``use_residual``.
    Its activation is a ``torch.nn`` module class, as sentence-transformers takes it without remote code;
    anything else fails the load."""
    import importlib

    import torch

    config = json.loads(_file(model, revision, "config.json", path).read_text())
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"unsupported sentence-transformers Dense input {config['module_input_name']!r}")
    activation = config.get("activation_function") or "torch.nn.modules.activation.Tanh"
    module_name, _, class_name = activation.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None) if activation.startswith("torch.") else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"unsupported sentence-transformers Dense activation {activation!r}: a torch.nn module")
    residual = bool(config.get("use_residual", False))

    class Dense(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
            self.activation_function = cls()  # sentence-transformers' name: a PReLU's weight is saved under it
            if residual and config["in_features"] != config["out_features"]:
                self.residual = torch.nn.Linear(config["in_features"], config["out_features"], bias=False)

        def forward(self, x: Any) -> Any:
            out = self.activation_function(self.linear(x))
            if residual:
                out = out + (self.residual(x) if hasattr(self, "residual") else x)
            return out

    layer = Dense()
    safetensors = _file(model, revision, "model.safetensors", path)
    if safetensors is not None:
        from safetensors.torch import load_file

        weights = load_file(safetensors)
    else:
        pickled = _file(model, revision, "pytorch_model.bin", path)
        if pickled is None:
            raise ValueError(f"the Dense module in {path!r} has no weights (model.safetensors, pytorch_model.bin)")
        weights = torch.load(pickled, map_location="cpu", weights_only=True)
    layer.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: every weight, none other
    return layer.eval()


def lowercase_first(tokenizer: Any) -> None:
    """Lowercase every text before the tokenizer's own normalisation (a fast tokenizer's normaliser)."""
    from tokenizers.normalizers import Lowercase, Sequence

    if not tokenizer.is_fast:
        raise ValueError("do_lower_case needs a fast tokenizer")
    normalizer = tokenizer.backend_tokenizer.normalizer
    tokenizer.backend_tokenizer.normalizer = Sequence([Lowercase(), normalizer]) if normalizer else Lowercase()


def pool(hidden: Any, mask: Any, modes: str | tuple[str, ...], attention: Any = None) -> Any:
    """Token embeddings ``[batch, tokens, dim]`` to sentence embeddings ``[batch, dim]`` (times the number
    of modes: their vectors concatenated), the tokens outside ``mask`` (padding on either side, a prompt)
    left out, as sentence-transformers pools them. ``attention``: the tokenizer's attention mask when
    ``mask`` also leaves out a prompt (``weightedmean`` counts positions from the first token that is not
    padding, the prompt's included)."""
    import torch

    if not isinstance(modes, str):
        return torch.cat([pool(hidden, mask, mode, attention) for mode in modes], dim=1)
    hidden = hidden.float()  # sums in float32, as sentence-transformers sums them, whatever the model's dtype
    mode, rows, tokens = modes, torch.arange(hidden.shape[0], device=hidden.device), hidden.shape[1]
    if mode == "cls":  # the first token that is not padding
        return hidden[rows, mask.to(torch.int).argmax(dim=1)]
    if mode == "lasttoken":  # the last token that is not padding
        found, from_end = mask.to(torch.int).flip(1).max(dim=1)
        return hidden[rows, torch.where(found == 0, 0, tokens - 1 - from_end)]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "weightedmean":  # token i of a text weighs i + 1, counted from its first token
        first = (mask if attention is None else attention).to(torch.int).argmax(dim=1).view(-1, 1, 1)
        weights = weights * (torch.arange(1, tokens + 1, device=hidden.device).view(1, -1, 1) - first)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    summed, counts = (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def chosen_prompt(prompts: dict[str, Any], default_name: str | None, parameters: dict[str, Any]) -> str:
    """The text put before every input, as sentence-transformers' ``encode`` puts it: the registry's
    ``prompt`` (a text; "" for none), else the prompt its ``prompt_name`` names, else the model's default
    (``default_prompt_name``), else none; a parameter that is null is not given, and a prompt saved as null
    is "" (as sentence-transformers reads them). ValueError for a name the model has no prompt of, and for
    both parameters at once."""
    prompt, name = parameters.get("prompt"), parameters.get("prompt_name")
    if prompt is not None and name is not None:
        raise ValueError("parameters name a prompt and give one: prompt_name or prompt, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {prompt!r} is not a text")
        return prompt
    name = name if name is not None else default_name
    if name is None:
        return ""
    if not isinstance(name, str) or name not in prompts:
        raise ValueError(f"unknown prompt_name {name!r}: the model's prompts are {known_prompts(prompts)}")
    if not isinstance(prompts[name] or "", str):
        raise ValueError(f"the model's prompt {name!r} is not a text: {prompts[name]!r}")
    return prompts[name] or ""


def known_prompts(prompts: dict[str, Any]) -> str:
    """The names of a model's prompts, for a message (at most 20)."""
    return ", ".join(repr(name) for name in list(prompts)[:20]) or "none"


def without_prompt(mask: Any, prompt_tokens: int) -> Any:
    """The attention mask for pooling, its first ``prompt_tokens`` tokens after any left padding left out."""
    if not prompt_tokens:
        return mask
    import torch

    first = mask.to(torch.int).argmax(dim=1, keepdim=True)  # the first token that is not padding
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask * (positions >= first + prompt_tokens).to(mask.dtype)


class SentenceEmbeddingRuntime(ModelRuntime):
    task = "feature-extraction"
    entry_parameters = frozenset({"pooling", "normalize", "max_seq_length", "prompt", "prompt_name"})

    def load(self) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

        quiet_tokenizers()
        model, revision = self.model_files()
        config = {
            "pooling": ("mean",),
            "normalize": False,
            "dense": [],
            "lowercase": False,
            "prompts": {},
            "prompt_name": None,
            "include_prompt": True,
            **sentence_transformers_config(model, revision),
        }
        given = {  # the entry's own, a null one not given
            k: v
            for k, v in self.spec.parameters.items()
            if k in ("pooling", "normalize", "max_seq_length") and v is not None
        }
        if "normalize" in given:
            checked_flag(given["normalize"], "normalize")
        if "max_seq_length" in given:
            checked_tokens(given["max_seq_length"], "max_seq_length", least=1)
        config.update(given)
        config["pooling"] = checked_modes(config["pooling"], "pooling")
        prompt = chosen_prompt(config["prompts"], config["prompt_name"], self.spec.parameters)
        sub = {"subfolder": config["subfolder"]} if config.get("subfolder") else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, **sub)
        # An encoder-decoder's encoder alone (sentence-T5, GTR: T5EncoderModel), as sentence-transformers loads it.
        config_of = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=False, **sub)
        encoder = MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(config_of.model_type, "").endswith("EncoderModel")
        auto = AutoModelForTextEncoding if encoder or getattr(config_of, "is_encoder_decoder", False) else AutoModel
        self.model, info = auto.from_pretrained(
            model, config=config_of, revision=revision, trust_remote_code=False, output_loading_info=True, **sub
        )
        trained_weights(info, may_lack=lambda key: key.startswith("pooler."))  # the pooler is not read here
        self.model.to(self.device).eval()
        limit = bound_tokenizer(self.tokenizer, self.model)
        self.pooling, self.normalize = config["pooling"], bool(config["normalize"])
        self.dense = [layer.to(self.device) for layer in config["dense"]]
        # A model of texts and images in one space (CLIP, SigLIP): its projected text features, which its image
        # embeddings (image-feature-extraction) are compared with, in place of pooling its hidden states.
        self.joint = joint_space(self.model)
        # SigLIP reads a text's last position and was trained on texts padded to the tokenizer's length: every
        # text is padded to it, alone or in a batch, as transformers' zero-shot image pipeline pads them.
        self.pad_to_length = self.joint and "siglip" in (getattr(self.model.config, "model_type", "") or "")
        if config["lowercase"]:  # sentence_bert_config.json's do_lower_case, as sentence-transformers applies it
            lowercase_first(self.tokenizer)
        max_length = config.get("max_seq_length")  # sentence-transformers' own, which wins over the tokenizer's
        self.max_length = min(max_length, limit or max_length) if max_length else None
        self.prompts = {name: text or "" for name, text in config["prompts"].items() if isinstance(text or "", str)}
        self.include_prompt = config["include_prompt"]
        self.prompt = prompt  # the entry's: the model's default, or the registry's choice
        self._prompt_tokens: dict[str, int] = {}
        # Batches packed without their padding where the model answers the same (not a joint-space model's
        # text features, nor texts padded to a length on purpose).
        self.packing = (
            None
            if self.joint or self.pad_to_length
            else Packing.checked(
                self.model, self.tokenizer, lambda output: output.last_hidden_state, self.tokenizer.padding_side
            )
        )

    def prompt_tokens(self, prompt: str, tokenizer: Any) -> int:
        """The tokens the prompt takes at the start of a text, as sentence-transformers counts them: the prompt
        tokenized alone, less its closing special token (``[SEP]``, ``</s>``). 0 when the pooling takes the
        prompt's tokens too (``include_prompt``, the default); INSTRUCTOR's kind of model leaves them out."""
        if self.include_prompt or not prompt:
            return 0
        if prompt not in self._prompt_tokens:
            ids = tokenizer([prompt], truncation=True, max_length=self.max_length)["input_ids"][0]
            self._prompt_tokens[prompt] = len(ids) - 1 if ids and ids[-1] in tokenizer.all_special_ids else len(ids)
        return self._prompt_tokens[prompt]

    def unload(self) -> None:
        self.model = self.tokenizer = self.packing = None  # the packing's hook goes with the model

    def predict(self, inputs: list[str], prompt_name: str | None = None) -> list[Any]:
        """``prompt_name``: a request's choice among the model's prompts, in place of the entry's prompt."""
        model, tokenizer = self.model, self.tokenizer  # local references: an unload meanwhile breaks nothing
        if model is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        prompt = self.prompt if prompt_name is None else self.prompts.get(prompt_name)
        if prompt is None:
            raise InvalidInput(
                f"parameters.prompt_name: model {self.spec.id!r} has no prompt {echo(prompt_name)} (its prompts: "
                f"{known_prompts(self.prompts)})",
                field="parameters.prompt_name",
            )
        skip, packing = self.prompt_tokens(prompt, tokenizer), self.packing
        embed = lambda texts: self._embed(model, tokenizer, packing, texts, prompt, skip)  # noqa: E731
        return in_forward_passes(inputs, forward_batch(tokenizer), embed)

    def _embed(
        self, model: Any, tokenizer: Any, packing: Packing | None, texts: list[str], prompt: str, prompt_tokens: int
    ) -> list[Any]:
        import torch

        with torch.inference_mode():
            padding = "max_length" if self.pad_to_length else len(texts) > 1
            texts = [prompt + text for text in texts] if prompt else texts
            encoded = tokenizer(
                texts, truncation=True, max_length=self.max_length, padding=padding, return_tensors="pt"
            ).to(model.device)
            if self.joint:
                features = model.get_text_features(
                    input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
                )
                vectors = projected(features)
            else:
                hidden = run_batch(packing, model, encoded).last_hidden_state
                attention = encoded["attention_mask"]
                vectors = pool(hidden, without_prompt(attention, prompt_tokens), self.pooling, attention)
            for layer in self.dense:
                vectors = layer(vectors)
            return embedding_rows(vectors, self.normalize)


class EmbeddingParameters(EmbeddingOptions):
    """What a request for a sentence embedding may choose (``dimensions``: the output kind's)."""

    model_config = ConfigDict(extra="forbid")

    prompt_name: str | None = Field(
        None,
        max_length=256,
        description="one of the model's prompts (config_sentence_transformers.json's prompts: 'query', "
        "'passage', ...), put before every input in place of the registry entry's",
    )


TASK = Task(
    name="feature-extraction",
    input=TEXT,
    output=EMBEDDING,
    runtimes=(SentenceEmbeddingRuntime,),
    parameters=EmbeddingParameters,
    description="one embedding per sentence, pooled and normalised as the model was trained (search, RAG)",
)
