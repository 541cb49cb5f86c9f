"""A word-level tokenizer over the scene vocabulary, as a standard ``PreTrainedTokenizerFast``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workbench.scenes import vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# Role markers are plain words; the normaliser lower-cases the chat template's "USER:"/"ASSISTANT:".
USER, ASSISTANT = "user:", "assistant:"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)


def build_tokenizer(special_tokens: Mapping[str, str] | None = None,
                    extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """The shipped model's tokenizer by default. ``special_tokens`` replaces its named special tokens
    ({"image_token": "<image>"}) and ``extra_words`` extends the vocabulary, so that tiny test models
    of other families can reuse it with their own markers (they add unnamed ones with
    ``add_special_tokens``)."""
    words = list(SPECIALS) + [USER, ASSISTANT] + vocabulary()
    words += [w for w in extra_words if w not in words]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("color", "colour")])
    # Words are runs of non-space, non-'?' characters; '?' is a word of its own.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("?", behavior="isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, words.index(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=dict(special_tokens or {"image_token": IMAGE}), padding_side="left",
    )
    return tokenizer
