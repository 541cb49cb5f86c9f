"""The shipped model's card: the recipe, the training curve and the measured figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curve(curve: list[dict], path: Path) -> None:
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for key in sorted(k for k in curve[0] if k.startswith("acc_")):
        ax.plot(steps, [c[key] for c in curve], label=key[4:], lw=2.4 if key == "acc_overall" else 1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (first answer token)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(model_dir: Path, figures: str = "") -> Path:
    """Write README.md (and the curve PNG) into ``model_dir`` from its saved training curve.

    ``figures`` is Markdown with the measured evaluation (from ``workbench evaluate``)."""
    curve = json.loads((model_dir / "training_curve.json").read_text())
    config = json.loads((model_dir / "train_config.json").read_text())
    arch = json.loads((model_dir / "config.json").read_text())
    vision, decoder = arch["vision_config"], arch["text_config"]
    size, patch = vision["image_size"], vision["patch_size"]
    grid = size // patch
    tower = f"hidden {vision['hidden_size']}, {vision['num_hidden_layers']} layers, {vision['num_attention_heads']} heads"
    llm = (f"hidden {decoder['hidden_size']}, {decoder['num_hidden_layers']} layers, "
           f"{decoder['num_attention_heads']} heads of {decoder['head_dim']} dims")
    plot_curve(curve, model_dir / "training_curve.png")
    table = "| step | minutes | answer loss | " + " | ".join(k[4:] for k in curve[0] if k.startswith("acc_")) + " |\n"
    table += "|" + "---|" * (3 + sum(k.startswith("acc_") for k in curve[0])) + "\n"
    for c in curve:
        table += f"| {c['step']} | {c['minutes']} | {c['answer_loss']} | " + " | ".join(
            f"{c[k]:.3f}" for k in c if k.startswith("acc_")) + " |\n"
    text = f"""# shapes-vlm: the workbench's shipped VLM

A small `LlavaForConditionalGeneration` trained from scratch on CPU on grounded synthetic scenes
(`workbench/scenes.py`): 2-4 objects (4 shapes x 5 colours x 2 sizes) in a 3x3 grid over a noisy
background with grey clutter. Because the scenes are generated, every question's evidence (the
pixel boxes and masks of the objects its answer depends on) is known.

## Architecture
- Vision tower: `CLIPVisionModel`, {size}x{size} input, patch {patch} -> a [CLS] token + **{grid * grid} patch
  tokens** ({grid}x{grid}), {tower}. `vision_feature_layer={arch['vision_feature_layer']}`,
  `vision_feature_select_strategy="default"` (the [CLS] output is dropped before the projector).
- Projector: LLaVA's 2-layer GELU MLP.
- Decoder: `LlamaForCausalLM`-style `LlamaModel`, {llm}, RoPE, SDPA.
- Tokenizer: word-level `PreTrainedTokenizerFast` over the scene vocabulary; chat template
  `USER: <image> {{question}} ASSISTANT:`; answers are one word followed by `</s>`.

## Question types
attribute (colour of a shape, size of a named object), object (shape of the only object of a
colour), existence (colour-shape binding; negatives usually combine a colour and a shape that are
both present), position (3x3 cell), counting (objects of a colour or shape), relation (left of /
above between two named objects).

## Recipe (`workbench train-shapes`, seed {config['seed']})
- Curriculum over the number of objects: 1 until step {config['one_object_until']}, 1-2 until
  step {config['up_to_two_objects_until']}, then 2-{config['max_objects']}.
- {config['questions_per_image']} questions per image in one multi-turn sequence, loss on every answer token.
- Dense auxiliary loss (weight {config['aux_weight']}): linear heads on the projected visual tokens
  predict, for the object under each patch, its {', '.join(config['aux_targets'])} ("pair" = the
  colour-shape combination, "cell" = its 3x3 grid cell); the heads are not saved.
- Decoder `initializer_range` 0.05; AdamW lr {config['lr']}, {config['warmup_steps']} warm-up steps,
  linear decay over the last {round((1 - config['decay_start']) * 100)} % of {config['steps']} steps,
  batch {config['batch_size']} images, gradient clipping 1.0, {config['threads']} CPU threads.

## Training curve
Held-out accuracy of the first answer token on {config['eval_scenes']} scenes drawn apart from training.

![training curve](training_curve.png)

{table}
{figures}
"""
    path = model_dir / "README.md"
    path.write_text(text.rstrip() + "\n")  # rewriting a card from its own text must not grow it
    return path
