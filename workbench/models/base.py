"""The adapter interface: everything the workbench needs to know about one model family.

An adapter wraps a loaded ``transformers`` model and its processor. It says where the visual
tokens sit (``layout``), where the decoder and vision-tower layers are, whether the tower has a
[CLS] token and which tower layer feeds the projector, and runs a sample. Nothing outside
``workbench/models/`` branches on the model family.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
from PIL import Image
from transformers import BatchFeature, Cache

from probes.interception import install
from workbench.models.distinct_views import ViewSharing
from workbench.layout import VisualLayout


@dataclass(frozen=True)
class Answer:
    text: str
    logprob: float  # sum of the generated tokens' log-probabilities (end-of-sequence excluded)
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LLMInputs:
    """What the wrapper hands the decoder stack for one forward, captured at the decoder's call.

    ``position_ids`` is [B, L] for 1-D RoPE or [3|4, B, L] for M-RoPE (Qwen2-VL); when the wrapper
    passes None the decoder numbers tokens ``0..L-1`` itself, which is what is stored here, so a
    caller can always re-run the decoder with explicit positions. ``attention_mask`` is the 2-D
    padding mask [B, L] (ones where the wrapper passed none). ``extra`` holds any other keyword
    the wrapper passed on (caches and output flags left out).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RopeFreeQK:
    """Where one attention layer's query and key can be read before the rotary embedding: the
    linear layers that produce them, and how their outputs split into (query, key), each
    ``[..., S, heads, head_dim]``."""

    modules: tuple[torch.nn.Module, ...]
    split: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def separate_projections(attention: torch.nn.Module) -> RopeFreeQK:
    """``q_proj`` and ``k_proj`` outputs, split into heads (Llama, Qwen2, Mistral decoders)."""
    def split(outputs):
        query, key = outputs
        return query.unflatten(-1, (-1, attention.head_dim)), key.unflatten(-1, (-1, attention.head_dim))

    return RopeFreeQK((attention.q_proj, attention.k_proj), split)


@dataclass(frozen=True)
class PreparedInput:
    """One sample turned into model inputs, with the layout of its visual tokens."""

    inputs: BatchFeature
    layout: VisualLayout
    prompt: str
    image_size: tuple[int, int]  # (width, height) of the original image
    question: str = ""  # the text the prompt was built from (MMTok's keywords are read from it)
    # Filled by ``ModelAdapter.decoder_inputs``: every run of this input reuses one tower pass.
    _decoder_inputs: dict = field(default_factory=dict, compare=False, repr=False)


def encoder_layers(tower: torch.nn.Module):
    """The layer list of a CLIP/SigLIP-style tower, whichever wrapper transformers puts around it."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        module = tower
        try:
            for part in path.split("."):
                module = getattr(module, part)
            return module
        except AttributeError:
            continue
    raise AttributeError(f"no encoder layers found in {type(tower).__name__}")


class _StopForward(Exception):
    pass


@dataclass
class TowerCls:
    """The tower's [CLS] outputs at the projector's feed layer, through the projector: [views, D]
    (one row per view the tower encoded), filled by the last tower pass seen (None before); and,
    when asked (``tower_cls_capture(patches=True)``), its patch outputs there, projected the same way:
    [views, P, D], the tower's order ([CLS] left out), before any unpadding or newline; ``feed``, those
    patch outputs before the projector ([views, P, D_tower]: what an ``Append`` on the tower's features
    sums)."""

    features: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    feed: torch.Tensor | None = None


# What a wrapper passes its decoder besides the inputs proper: not part of ``LLMInputs``.
_CALL_FLAGS = ("input_ids", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
               "cache_position", "logits_to_keep")


class ModelAdapter(ABC):
    """Base class; subclasses name the HF ``architectures`` they serve and implement ``layout``."""

    architectures: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    mrope: ClassVar[bool] = False  # multi-axis rotary positions (Qwen2-VL)
    multi_view: ClassVar[bool] = False  # a base view of the whole image beside high-resolution crops

    def __init__(self, model: torch.nn.Module, processor, name: str = ""):
        self.model = model.eval()
        install(self.model)  # every attention call goes through the workbench's listened kernel
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # batched generation appends after the prompt
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # --- structure -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Digest of the weights (``weights_fingerprint``); results folders record it."""
        from workbench.models.fingerprint import weights_fingerprint

        return weights_fingerprint(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def _view_sharing(self) -> ViewSharing:
        return ViewSharing(self.vision_tower())

    def distinct_views(self):
        """Within it, each pass of the vision tower on a batch of image views runs once per distinct
        view (``workbench.models.distinct_views``): what reads the tower's layers meanwhile sees
        those views only."""
        return self._view_sharing.active()

    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm) that receives ``inputs_embeds``."""

    @abstractmethod
    def vision_tower(self) -> torch.nn.Module:
        ...

    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return self.language_model().layers

    def vision_layers(self) -> Sequence[torch.nn.Module]:
        """The tower's layers; CLIP/SigLIP-style towers by default."""
        return encoder_layers(self.vision_tower())

    def decoder_attention(self, layer: int) -> torch.nn.Module:
        """The self-attention module of decoder layer ``layer`` (its q/k/v/o projections)."""
        return self.decoder_layers()[layer].self_attn

    def vision_attention(self, layer: int) -> torch.nn.Module:
        """The self-attention module of vision-tower layer ``layer``."""
        return self.vision_layers()[layer].self_attn

    @property
    @abstractmethod
    def has_cls_token(self) -> bool:
        ...

    @property
    @abstractmethod
    def projector_feed_layer(self) -> int:
        """Index into the tower's ``hidden_states`` (0 = embeddings, i = after layer i) that feeds
        the projector, normalised to be non-negative."""

    @property
    def projector_feed_tower_layer(self) -> int:
        """The tower layer whose output feeds the projector (``tower_layer_of``)."""
        return tower_layer_of(self.projector_feed_layer)

    def projector(self) -> torch.nn.Module:
        """The module that maps the tower's features at the feed layer to the decoder's width, token
        by token (the [CLS] is passed through it when a plan hands it to the LLM)."""
        raise NotImplementedError(f"{type(self).__name__}: no projector known")

    @contextlib.contextmanager
    def tower_cls_capture(self, patches: bool = False):
        """Within it, every pass of the vision tower leaves its [CLS] outputs at the projector's feed
        layer, projected, in the yielded ``TowerCls`` (and its patch outputs, with ``patches``: what
        the model's own feature packing starts from, padding patches included). The feed layer's
        output as that pass computed it: a pass with pruning stages inside the tower gives that
        pass's [CLS]. Without ``patches`` the tower must have a [CLS]."""
        if not self.has_cls_token and not patches:
            raise ValueError(f"{type(self).__name__}: the vision tower has no [CLS] token")
        seen, feed, layers = TowerCls(), self.projector_feed_layer, self.vision_layers()
        projector, first = self.projector(), int(self.has_cls_token)

        def keep(states: torch.Tensor) -> None:  # [views, S, D_tower]: each view's [CLS] (its first row), patches
            states = self._view_sharing.spread(states)  # a pass on the distinct views: every view's
            if self.has_cls_token:
                seen.features = projector(states[:, :1])[:, 0]
            if patches:
                seen.feed = states[:, first:]
                seen.patches = projector(seen.feed)

        if feed == 0:  # hidden_states[0]: what enters the first layer
            handle = layers[0].register_forward_pre_hook(lambda module, args: keep(args[0]))
        else:
            handle = layers[feed - 1].register_forward_hook(
                lambda module, args, output: keep(output[0] if isinstance(output, tuple) else output))
        try:
            yield seen
        finally:
            handle.remove()

    @torch.no_grad()
    def tower_cls(self, prepared: "PreparedInput") -> torch.Tensor:
        """[views, D]: the projected [CLS] outputs of the sample's own (unpruned) tower pass, computed
        once per prepared input (that pass also fills ``decoder_inputs`` when it was missing)."""
        if "cls" not in prepared._decoder_inputs:
            with self.tower_cls_capture() as seen:
                call = self._decoder_call(prepared.inputs)
            prepared._decoder_inputs.setdefault("llm", self._llm_call(call))
            prepared._decoder_inputs["cls"] = seen.features
        return prepared._decoder_inputs["cls"]

    @torch.no_grad()
    def tower_patches(self, prepared: "PreparedInput", projected: bool = True) -> torch.Tensor:
        """[views, P, D]: the projected patch outputs at the feed layer of the sample's own (unpruned)
        tower pass (``TowerCls.patches``), computed once per prepared input; with ``projected`` False,
        the same patches before the projector ([views, P, D_tower], ``TowerCls.feed``)."""
        if "patches" not in prepared._decoder_inputs:
            with self.tower_cls_capture(patches=True) as seen:
                call = self._decoder_call(prepared.inputs)
            prepared._decoder_inputs.setdefault("llm", self._llm_call(call))
            if seen.features is not None:
                prepared._decoder_inputs.setdefault("cls", seen.features)
            prepared._decoder_inputs["patches"] = seen.patches
            prepared._decoder_inputs["feed"] = seen.feed
        return prepared._decoder_inputs["patches" if projected else "feed"]

    # --- inputs ----------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def processor_inputs(self, images: list[Image.Image], prompts: list[str]) -> BatchFeature:
        return self.processor(images=images, text=prompts, return_tensors="pt", padding=True)

    def prepare(self, image: Image.Image, question: str) -> PreparedInput:
        image = image.convert("RGB")
        prompt = self.prompt(question)
        inputs = self.processor_inputs([image], [prompt]).to(self.device)
        return PreparedInput(inputs, self.layout(inputs, [image.size]), prompt, image.size, question)

    def with_image_of(self, prepared: PreparedInput, other: PreparedInput) -> PreparedInput:
        """``prepared``'s prompt on ``other``'s image, of the same size, without a processor call:
        ``other``'s image tensors (what the image processor made) in place of ``prepared``'s. Its
        text tensors and layout are kept: the processor expands the image's placeholder by the
        image's size alone, on every supported family. Every blank-image control of a size reuses
        one processed blank image this way."""
        if other.image_size != prepared.image_size:
            raise ValueError(f"an image of size {other.image_size} in place of one of {prepared.image_size}: "
                             "only one of the same size keeps the layout")
        names = set(self.processor.image_processor.model_input_names)
        inputs = BatchFeature({name: other.inputs[name] if name in names else tensor
                               for name, tensor in prepared.inputs.items()})
        return PreparedInput(inputs, prepared.layout, prepared.prompt, prepared.image_size, prepared.question)

    @abstractmethod
    def layout(self, inputs: BatchFeature, image_sizes: list[tuple[int, int]]) -> VisualLayout:
        """Layout of the first sequence in ``inputs``; ``image_sizes`` are (width, height)."""

    def image_token_positions(self, inputs: BatchFeature, row: int = 0) -> torch.Tensor:
        token_id = self.model.config.image_token_id
        return (inputs["input_ids"][row] == token_id).nonzero().flatten().cpu()

    def rope_free_qk(self, stack: str, layer: int) -> RopeFreeQK | None:
        """Where layer ``layer`` of ``stack`` has its query and key before the rotary embedding, or
        None where that stack applies none (its q/k are the same either way): CLIP/SigLIP-style
        towers by default."""
        return separate_projections(self.decoder_attention(layer)) if stack == "llm" else None

    def decoder_rotary(self) -> torch.nn.Module:
        """The decoder's rotary-embedding module: ``rotary(x, position_ids) -> (cos, sin)``."""
        rotary = getattr(self.language_model(), "rotary_emb", None)
        if rotary is None:
            raise AttributeError(f"{type(self).__name__}: no rotary_emb on the decoder stack")
        return rotary

    def final_norm(self) -> torch.nn.Module:
        """The decoder's last norm, applied to the residual stream before the LM head."""
        return self.language_model().norm

    def output_head(self) -> torch.nn.Module:
        """The LM head that turns the decoder's final hidden states into vocabulary logits."""
        return self.model.get_output_embeddings()

    def token_embeddings(self) -> torch.nn.Module:
        """The decoder's token-embedding table (what the wrapper applies to ``input_ids``)."""
        return self.model.get_input_embeddings()

    # --- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def llm_inputs(self, inputs: BatchFeature) -> LLMInputs:
        """What the decoder receives: the embeddings (text with the visual features merged in), the
        padding mask and the position ids (3-D M-RoPE ones included).

        Captured at the decoder's call and the forward stopped there, so it is the model's own
        merging and position code, whatever the family, at the cost of the vision tower only.
        """
        return self._llm_call(self._decoder_call(inputs))

    def _decoder_call(self, inputs: BatchFeature) -> dict:
        """The keyword arguments the wrapper calls the decoder stack with on ``inputs``, as given."""
        captured = {}

        def grab(module, args, kwargs):
            captured.update(kwargs)
            raise _StopForward

        handle = self.language_model().register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured

    def _llm_call(self, captured: dict) -> LLMInputs:
        """``LLMInputs`` of a captured decoder call (``_decoder_call``)."""
        captured = dict(captured)
        embeds = captured.pop("inputs_embeds", None)
        if embeds is None:
            raise RuntimeError(f"{type(self).__name__}: the decoder was not called with inputs_embeds")
        batch, length = embeds.shape[:2]
        mask = captured.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        elif mask.dim() != 2:
            raise RuntimeError(f"{type(self).__name__}: the decoder got a {mask.dim()}-D attention mask; "
                               "expected the 2-D padding mask")
        positions = captured.pop("position_ids", None)
        if positions is None:  # the decoder's own default for a fresh sequence
            positions = torch.arange(length, device=embeds.device).unsqueeze(0).expand(batch, -1)
        for name in _CALL_FLAGS:
            captured.pop(name, None)
        # A cache the wrapper made for this forward (whatever its argument's name) is not an input.
        extra = {k: v for k, v in captured.items() if v is not None and not isinstance(v, Cache)}
        return LLMInputs(embeds, mask, positions, extra)

    def decoder_inputs(self, prepared: PreparedInput) -> LLMInputs:
        """``llm_inputs`` of a prepared input, computed once: the vision tower and the merging of
        its features run once per sample however many plans are executed on it."""
        if "llm" not in prepared._decoder_inputs:
            prepared._decoder_inputs["llm"] = self.llm_inputs(prepared.inputs)
        return prepared._decoder_inputs["llm"]

    @torch.no_grad()
    def decoder_inputs_batch(self, prepared: Sequence[PreparedInput]) -> list[LLMInputs]:
        """``decoder_inputs`` of several prepared inputs, the missing ones made by one forward of
        the vision tower on all their distinct images where their processor tensors stack (same image
        shapes; AnyRes inputs with different tilings, or a wrapper passing the decoder extra
        inputs, go one at a time). Each equals its own ``llm_inputs`` up to float rounding."""
        groups: dict[tuple, list[PreparedInput]] = {}
        for item in prepared:
            if "llm" not in item._decoder_inputs:
                groups.setdefault(_stack_key(item.inputs), []).append(item)
        for key, group in groups.items():
            if key is None or len(group) == 1:
                continue
            lengths = [item.inputs["input_ids"].shape[1] for item in group]
            with self.distinct_views():  # several questions on one image: one tower pass for it
                captured = self._decoder_call(stacked_inputs([item.inputs for item in group], self.tokenizer.pad_token_id))
            for item, parts in zip(group, _split_call(captured, lengths)):
                if parts is not None:
                    item._decoder_inputs["llm"] = self._llm_call(parts)
        return [self.decoder_inputs(item) for item in prepared]

    @contextlib.contextmanager
    def decoder_inputs_from_forward(self, prepared: Sequence[PreparedInput], inputs: BatchFeature,
                                    cache: Cache | None = None):
        """Within it, a forward of the whole model on ``inputs`` themselves (a recording's traced
        forward: one sample's own inputs, or several stacked right-padded by ``stacked_inputs``)
        also fills each sample's ``decoder_inputs`` from its rows of the decoder call, so the vision
        tower does not run again for the sample's plans. Other forwards (generation, passes on the
        prompt with an answer appended) are not taken: their decoder calls differ. Given an empty
        ``cache``, that decoder call fills it (the keys and values of every layer it runs, the
        samples' rows first, padding after), and its layers are called with it: the unpruned
        prefill can go on from there. On a tower with a [CLS], that forward's tower pass also leaves
        each sample's ``tower_cls``."""
        own = {"forward": False}
        cls = self.tower_cls_capture() if self.has_cls_token else contextlib.nullcontext()
        lengths = [item.inputs["input_ids"].shape[1] for item in prepared]

        def entered(module, args, kwargs):
            own["forward"] = kwargs.get("input_ids") is inputs["input_ids"]

        def grab(module, args, kwargs):
            mine = own["forward"] and kwargs.get("inputs_embeds") is not None
            own["forward"] = False
            if not mine:
                return None
            parts = [kwargs] if len(prepared) == 1 else _split_call(kwargs, lengths, "right")
            for b, (item, call) in enumerate(zip(prepared, parts)):
                if "llm" not in item._decoder_inputs and call is not None:
                    item._decoder_inputs["llm"] = self._llm_call(call)
                if seen is not None and seen.features is not None:  # the tower pass this forward just made
                    views = len(seen.features) // len(prepared)  # each sample's, side by side
                    item._decoder_inputs.setdefault("cls", seen.features[b * views:(b + 1) * views])
            # Not a second forward (it would extend the cache), nor one with a cache of its own (generation).
            if cache is None or cache.get_seq_length() > 0 or kwargs.get("cache") is not None:
                return None
            return args, {**kwargs, "cache": cache, "use_cache": True}

        handles = [self.model.register_forward_pre_hook(entered, with_kwargs=True),
                   self.language_model().register_forward_pre_hook(grab, with_kwargs=True)]
        try:
            with cls as seen:
                yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def llm_input_embeddings(self, inputs: BatchFeature) -> torch.Tensor:
        """The embeddings the decoder receives (text embeddings with the visual features merged in)."""
        return self.llm_inputs(inputs).inputs_embeds

    @torch.no_grad()
    def answer_batch(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8) -> list[Answer]:
        prompts = [self.prompt(q) for q in questions]
        inputs = self.processor_inputs([im.convert("RGB") for im in images], prompts).to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        scores = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        eos = set(self._eos_ids())
        answers = []
        for ids, logp in zip(new.tolist(), scores.tolist()):
            kept = []
            for t in ids:
                if t in eos or t == self.tokenizer.pad_token_id:
                    break
                kept.append(t)
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            answers.append(Answer(text, float(sum(logp[: len(kept)])), tuple(kept)))
        return answers

    def answer(self, image: Image.Image, question: str, max_new_tokens: int = 8) -> Answer:
        return self.answer_batch([image], [question], max_new_tokens)[0]

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


# --- stacking prepared inputs -----------------------------------------------------------------------
# Keys of a processor's output with one entry per token ([1, L] like ``input_ids``) are left-padded to
# one length; every other tensor (pixel values, image sizes, grids) is concatenated along its first
# axis, which needs the same trailing shape.

def _stack_key(inputs: BatchFeature) -> tuple | None:
    """What must agree for prepared inputs to stack into one batch (None: this one cannot)."""
    ids = inputs["input_ids"]
    key = []
    for name, value in sorted(inputs.items()):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        if value.shape == ids.shape:
            key.append((name, "tokens", value.dtype))
        else:
            key.append((name, tuple(value.shape[1:]), value.dtype))
    return tuple(key)


def tower_layer_of(hidden_state: int) -> int:
    """The tower layer recordings store ``hidden_states[hidden_state]`` under: they index layers, so
    the output of layer i - 1 (the embeddings entering layer 0 for index 0)."""
    return max(hidden_state - 1, 0)


def views_key(inputs: BatchFeature) -> tuple | None:
    """What must agree for samples to share a forward, the decoder's batch axis being the samples:
    tokens with a padding-free mask, and one image whose tensor stacks with theirs: [1, C, H, W] or
    [1, views, C, H, W] (tiles, crops) of the same shape, their views side by side in the tower,
    sample after sample; or [patches, D] flattened patches of the same width, which the tower takes
    one sample's after another's. Any other input is per token or one sample's ([1, ...]) of the
    same trailing shape. None: this sample records alone."""
    pixels, mask, ids = inputs.get("pixel_values"), inputs.get("attention_mask"), inputs["input_ids"]
    if not isinstance(pixels, torch.Tensor) or (mask is not None and not bool(mask.all())):
        return None
    if pixels.dim() == 2:
        shape = ("patches", pixels.shape[1])
    elif pixels.dim() in (4, 5) and pixels.shape[0] == 1:
        shape = tuple(pixels.shape)
    else:
        return None
    others = []
    for name, value in sorted(inputs.items()):
        if name in ("input_ids", "attention_mask", "pixel_values"):
            continue
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != 1:
            return None
        others.append((name, "tokens" if value.shape == ids.shape else tuple(value.shape[1:]), value.dtype))
    return shape, pixels.dtype, tuple(others)


def tower_rows(inputs: BatchFeature) -> tuple[int, int | None]:
    """(views, patches) of one sample's image tensor (``views_key``'s inputs): how many tower views
    it holds, and how many patches of a flattened-patch tower's one sequence are its (else None)."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 2:
        return 1, pixels.shape[0]
    return (1 if pixels.dim() == 4 else pixels.shape[1]), None


def stacked_inputs(inputs: Sequence[BatchFeature], pad_id: int, side: str = "left") -> BatchFeature:
    """Processor outputs as one batch, token tensors padded to the longest. ``left``: padding
    before each sample's tokens, masked (the layout decoding appends to). ``right``: after them and
    left unmasked: a sample's causal rows never reach it, so each keeps the positions and the
    unmasked causal kernel of its own forward."""
    longest = max(item["input_ids"].shape[1] for item in inputs)
    out = {}
    for name, first in inputs[0].items():
        if first.shape == inputs[0]["input_ids"].shape:
            fill = pad_id if name == "input_ids" else int(name == "attention_mask" and side == "right")
            out[name] = torch.cat([torch.nn.functional.pad(
                item[name], (longest - item[name].shape[1], 0) if side == "left" else (0, longest - item[name].shape[1]),
                value=fill) for item in inputs])
        else:
            out[name] = torch.cat([item[name] for item in inputs])
    return BatchFeature(out)


def _split_call(captured: dict, lengths: list[int], side: str = "left") -> list[dict | None]:
    """Each sample's part of a decoder call on stacked inputs (its rows, the padding cut off), or
    None where it cannot be told apart (the wrapper passed other batched inputs)."""
    embeds, mask = captured.get("inputs_embeds"), captured.get("attention_mask")
    positions = captured.get("position_ids")
    known = {"inputs_embeds", "attention_mask", "position_ids", *_CALL_FLAGS}
    others = [k for k, v in captured.items() if k not in known and v is not None and not isinstance(v, Cache)]
    if embeds is None or others or (mask is not None and mask.dim() != 2):
        return [None] * len(lengths)
    longest, out = embeds.shape[1], []
    for b, n in enumerate(lengths):
        rows = slice(longest - n, None) if side == "left" else slice(0, n)
        if mask is not None and not bool(mask[b, rows].all()):
            out.append(None)  # a padded sample of its own: it is made alone
            continue
        parts = {"inputs_embeds": embeds[b:b + 1, rows]}
        if mask is not None:
            parts["attention_mask"] = mask[b:b + 1, rows]
        if positions is not None:  # None: the decoder numbers the sample's own rows from 0
            row = b if positions.shape[-2] > 1 else 0  # one row of positions serves the whole batch
            parts["position_ids"] = positions[..., row:row + 1, rows]
        out.append(parts)
    return out
