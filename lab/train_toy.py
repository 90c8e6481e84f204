"""Trains the bundled toy LLaVA on the shapes world, with localization heads induced on purpose.

The model is a real `transformers.LlavaForConditionalGeneration` (small CLIP tower, small Llama),
saved in HF format so the pipeline loads it with AutoModelForImageTextToText / AutoProcessor.
Prompt: "<image>\\n" + expression (the pipeline's "plain" template); the model then answers
"colour shape size hpos vpos </s>" about the referent. Two losses:
  (a) next-token cross-entropy on the answer tokens only;
  (b) for 3 DESIGNATED heads, cross-entropy between the oracle grid map of the referent
      (lab.toyworld.oracle_grid_map, normalised) and the head's attention row of the LAST PROMPT
      TOKEN restricted to the 196 image keys (softmax over all keys, not renormalised, so it also
      pushes the head's image mass up).
The designated heads are the known answer a head-discovery method should recover.

CLI: python -m lab.train_toy --out localization_heads/models/toy-llava --seed 0 --minutes 28   (or --steps N)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from localization_heads.evaluate import iou_xyxy
from lab import toyworld as tw

DESIGNATED_HEADS = [(2, 1), (3, 2), (4, 0)]  # (layer, head), 0-based, of 6 layers x 4 heads
IMAGE_SIZE, PATCH = 112, 8
GRID_SIDE = IMAGE_SIZE // PATCH
N_IMG = GRID_SIDE ** 2  # 196 image tokens, grid (14, 14)
RECIPE = {
    "vision": {"image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_size": 96, "intermediate_size": 384,
               "num_hidden_layers": 4, "num_attention_heads": 4, "vision_feature_layer": -2},
    "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4},
    "batch_size": 16, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 40, "min_lr_frac": 0.05,
    "aux_weight": 2.0, "grad_clip": 1.0, "eval_every": 150, "eval_size": 300, "save_every_s": 180,
    # Fraction of 1-object scenes kept in training: they teach no referent selectivity.
    "single_object_keep": 1.0,
    # Probability of training on a scene's relational expression ("... on the left .") when it has one;
    # 0 draws uniformly among the scene's expressions.
    "relational_boost": 0.0,
    # Weight of the patch-attribute loss (0 = off): a linear probe on every image token as it enters
    # the language model must tell the shape and size of the object the patch belongs to. Without it
    # the vision tower encodes colour per patch but not shape (an interior patch of a circle looks
    # like one of a square), so no head can bind "the circle" to its object. The probe is discarded.
    "patch_weight": 0.0,
    # Weight of the patch-position loss (0 = off): the same probe must also read each image token's
    # (row, col) on the grid linearly. Without it the tokens entering the LM carry almost no linear
    # column signal (ridge R² 0.05), so no query can prefer "the circle on the left" over another circle.
    "position_weight": 0.0,
}
PATCH_CLASSES = len(tw.SHAPES) + 1 + len(tw.SIZES)  # shape logits (+ background), then size logits
# Grid position of every image token, row-major as the patches are ordered, scaled to [-1, 1]: [196, 2] (row, col).
PATCH_POSITION = torch.tensor(np.stack(np.divmod(np.arange(N_IMG), GRID_SIDE), 1) / (GRID_SIDE - 1) * 2 - 1,
                              dtype=torch.float32)


# ----------------------------------------------------------------------------- model / processor

def word_level_processor(words: list[str], image_size: int, patch: int):
    """LlavaProcessor with LLaVA-1.5's preprocessing (pad to a square of the CLIP mean colour, resize;
    PIL only, no torchvision) and a word-level tokenizer over `words`, which must hold <pad> <unk>
    <s> </s> <image>; "<image>" expands to (image_size / patch)² tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A BOS first, as in LLaVA: gives heads a place to park attention they don't need.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    ip = LlavaImageProcessorPil(do_pad=True, size={"height": image_size, "width": image_size}, do_center_crop=False,
                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=ft, patch_size=patch, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")


def build_processor():
    return word_level_processor(tw.VOCAB, IMAGE_SIZE, PATCH)


def build_model(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v, t = RECIPE["vision"], RECIPE["text"]
    vc = CLIPVisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
                          intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
                          num_attention_heads=v["num_attention_heads"], projection_dim=v["hidden_size"])
    tc = LlamaConfig(vocab_size=vocab_size, hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                     num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                     num_key_value_heads=t["num_attention_heads"], max_position_embeddings=512,
                     pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                      vision_feature_layer=v["vision_feature_layer"], vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMG)
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")  # the aux loss needs the attention probabilities
    return model


# ----------------------------------------------------------------------------- data

def pick_expression(scene: tw.Scene, rng: np.random.Generator, relational_boost: float = 0.0) -> tuple:
    """(object index, expression) to train on: uniform over the scene's expressions, except that with
    probability relational_boost a relational one ("... on the left .") is taken when there is one."""
    relational = [e for e in scene.expressions if tw.is_relational(e[1])]
    if relational_boost > 0 and relational and rng.random() < relational_boost:
        return relational[int(rng.integers(len(relational)))]
    return scene.expressions[int(rng.integers(len(scene.expressions)))]


def sample_batch(rng: np.random.Generator, n: int, processor, vocab: dict, single_keep: float = 1.0,
                 relational_boost: float = 0.0) -> dict:
    """n (scene, expression) samples, one random expression per fresh scene, as model tensors.

    input_ids [B, N] = <s> <image>*196 expression-words answer-words </s> <pad>...
    """
    images, prompts, answers, targets, metas, patch_labels = [], [], [], [], [], []
    while len(images) < n:
        scene = tw.make_scene(rng)
        if len(scene.objects) == 1 and single_keep < 1.0 and rng.random() >= single_keep:
            continue
        i, expr = pick_expression(scene, rng, relational_boost)
        obj = scene.objects[i]
        cov = tw.oracle_grid_map(obj.mask, scene.width, scene.height)  # [14, 14]
        attrs = obj.attrs(scene.width, scene.height)
        images.append(scene.image)
        prompts.append([vocab["<s>"]] + [vocab["<image>"]] * N_IMG + [vocab[w] for w in expr.split()])
        answers.append([vocab[w] for w in tw.answer_words(attrs)] + [vocab["</s>"]])
        targets.append(cov.reshape(-1) / cov.sum())  # row-major, as the patches are ordered
        patch_labels.append(patch_attribute_labels(scene))
        metas.append({"bbox": attrs["bbox"], "width": scene.width, "height": scene.height, "expr": expr})
    lens = [len(p) + len(a) for p, a in zip(prompts, answers)]
    ids = torch.full((n, max(lens)), vocab["<pad>"], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        labels[b, len(p): len(p) + len(a)] = torch.tensor(a)
        attn[b, : len(p) + len(a)] = 1
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "attention_mask": attn, "pixel_values": pixels, "labels": labels,
            "last_prompt": torch.tensor([len(p) - 1 for p in prompts]),
            "target_map": torch.tensor(np.stack(targets), dtype=torch.float32), "meta": metas,
            "patch_labels": torch.tensor(np.stack(patch_labels), dtype=torch.long)}


def patch_attribute_labels(scene: tw.Scene) -> np.ndarray:
    """[2, 196] per patch: shape index of the object covering most of it (len(SHAPES) = background)
    and its size index; -100 (ignored) where the patch is partly covered or, for size, background."""
    cov = np.stack([tw.oracle_grid_map(o.mask, scene.width, scene.height).reshape(-1) for o in scene.objects])
    owner, most = cov.argmax(0), cov.max(0)
    shape = np.array([tw.SHAPES.index(scene.objects[k].shape) for k in owner])
    size = np.array([tw.SIZES.index(scene.objects[k].size) for k in owner])
    inside, outside = most >= 0.5, most < 0.05
    return np.stack([np.where(inside, shape, np.where(outside, len(tw.SHAPES), -100)), np.where(inside, size, -100)])


# ----------------------------------------------------------------------------- losses / eval

def build_probe(hidden_size: int, with_position: bool) -> torch.nn.Linear:
    """The patch probe (discarded after training): PATCH_CLASSES attribute logits, then (with_position)
    a (row, col) read-out."""
    probe = torch.nn.Linear(hidden_size, PATCH_CLASSES + (2 if with_position else 0))
    with torch.no_grad():  # position read-out starts at 0: a random one on the large residual stream
        probe.weight[PATCH_CLASSES:] = 0  # costs a loss of ~50 and, through the clip, the model's first steps
        probe.bias[PATCH_CLASSES:] = 0
    return probe


def forward(model, batch: dict, image_token_id: int, probe: torch.nn.Module | None = None):
    """Answer loss, aux loss, the designated heads' image rows [B, n_heads, 196], the logits, the
    patch-attribute loss and the patch-position loss (0 without a probe, or a probe without
    position outputs)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], output_attentions=True, output_hidden_states=probe is not None)
    logits = out.logits[:, :-1]  # [B, N-1, V]: position t predicts token t+1
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    b_idx = torch.arange(len(batch["last_prompt"]))
    img_pos = (batch["input_ids"][0] == image_token_id).nonzero().squeeze(1)  # [196], same in every row
    rows = torch.stack([out.attentions[layer][b_idx, head, batch["last_prompt"]][:, img_pos]
                        for layer, head in DESIGNATED_HEADS], dim=1)  # [B, n_heads, 196]
    aux = -(batch["target_map"][:, None] * torch.log(rows + 1e-9)).sum(-1).mean()
    patch = position = torch.zeros(())
    if probe is not None:
        logits_p = probe(out.hidden_states[0][:, img_pos])  # [B, 196, PATCH_CLASSES (+ 2 with position)]
        n_shape = len(tw.SHAPES) + 1
        labels = batch["patch_labels"]  # [B, 2, 196]
        patch = (F.cross_entropy(logits_p[..., :n_shape].reshape(-1, n_shape), labels[:, 0].reshape(-1), ignore_index=-100)
                 + F.cross_entropy(logits_p[..., n_shape:PATCH_CLASSES].reshape(-1, len(tw.SIZES)),
                                   labels[:, 1].reshape(-1), ignore_index=-100))
        if logits_p.shape[-1] > PATCH_CLASSES:  # (row, col) read out linearly, [B, 196, 2]
            position = F.mse_loss(logits_p[..., PATCH_CLASSES:], PATCH_POSITION.expand(len(logits_p), -1, -1))
    return lm, aux, rows, logits, patch, position


def map_to_box(heat: np.ndarray, width: int, height: int) -> list:
    """[14, 14] attention map -> box: cells above the mean, the component holding most mass."""
    cells = heat > heat.mean()
    lab, n = ndimage.label(cells, structure=np.ones((3, 3)))
    if n > 1:
        mass = ndimage.sum(heat, lab, index=np.arange(1, n + 1))
        cells = lab == (1 + int(np.argmax(mass)))
    return tw.cells_to_box(cells, width, height)


@torch.no_grad()
def evaluate(model, batches: list, image_token_id: int) -> dict:
    """Held-out answer accuracy and the designated heads' box Acc@0.5."""
    model.eval()
    tok_ok = tok_n = ans_ok = n = hit = hit_each = img_mass = n_rel = hit_rel = 0
    lm_sum = aux_sum = 0.0
    for batch in batches:
        lm, aux, rows, logits, *_ = forward(model, batch, image_token_id)
        lm_sum += lm.item() * len(rows)
        aux_sum += aux.item() * len(rows)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        correct = (logits.argmax(-1) == labels) | ~mask
        tok_ok += int(((logits.argmax(-1) == labels) & mask).sum())
        tok_n += int(mask.sum())
        ans_ok += int(correct.all(-1).sum())  # teacher-forced exact match == greedy exact match
        img_mass += float(rows.sum(-1).mean(-1).sum())
        for b, meta in enumerate(batch["meta"]):
            w, h = meta["width"], meta["height"]
            heads = rows[b].numpy().reshape(len(DESIGNATED_HEADS), 14, 14)
            combined = heads.mean(0)
            ok = iou_xyxy(map_to_box(combined, w, h), meta["bbox"]) >= 0.5
            hit += ok
            if tw.is_relational(meta["expr"]):  # the hardest part
                n_rel += 1
                hit_rel += ok
            hit_each += sum(iou_xyxy(map_to_box(m, w, h), meta["bbox"]) >= 0.5 for m in heads)
            n += 1
    model.train()
    return {"n": n, "lm_loss": lm_sum / n, "aux_loss": aux_sum / n, "answer_token_acc": tok_ok / tok_n,
            "answer_exact_acc": ans_ok / n, "heads_acc50_combined": hit / n,
            "heads_acc50_single_mean": hit_each / (n * len(DESIGNATED_HEADS)), "heads_image_mass": img_mass / n,
            "heads_acc50_relational": hit_rel / max(n_rel, 1), "n_relational": n_rel}


def oracle_acc(batches: list) -> float:
    hits = [iou_xyxy(map_to_box(b["target_map"][i].numpy().reshape(14, 14), m["width"], m["height"]), m["bbox"]) >= 0.5
            for b in batches for i, m in enumerate(b["meta"])]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- main loop

def lr_at(step: int, total: int, recipe: dict) -> float:
    if step < recipe["warmup_steps"]:
        return recipe["lr"] * (step + 1) / recipe["warmup_steps"]
    frac = min(1.0, (step - recipe["warmup_steps"]) / max(1, total - recipe["warmup_steps"]))
    lo = recipe["min_lr_frac"]
    return recipe["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


def save(model, processor, out: str, log: dict) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(os.path.join(out, "designated_heads.json"), "w") as f:
        json.dump({"heads": [list(h) for h in DESIGNATED_HEADS],
                   "note": "induced by the auxiliary loss; never read by the pipeline"}, f, indent=1)
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump(log, f, indent=1)


def write_model_card(out: str) -> None:
    """README.md of the saved model, from its training_log.json (numbers are the measured ones)."""
    with open(os.path.join(out, "training_log.json")) as f:
        log = json.load(f)
    ev, r = log["final_eval"], log["recipe"]
    v, t = r["vision"], r["text"]
    heads = ", ".join(f"layer {l} head {h}" for l, h in log["designated_heads"])
    limitation = ""
    if ev["heads_acc50_combined"] < 0.85:  # say plainly when the target was missed
        relational = (f" (relational expressions such as \"the circle on the left .\": {ev['heads_acc50_relational']:.3f} "
                      f"on {ev['n_relational']})" if "heads_acc50_relational" in ev else "")
        limitation = (f"**Limitation:** the designated heads are only partly referent-selective: held-out Acc@0.5 "
                      f"{ev['heads_acc50_combined']:.3f}{relational} by the box rule below, short of the 0.85 aimed for. "
                      "They first learned to cover every object of the scene, then slowly to prefer the referent; they "
                      "still leak attention to objects that share the referent's colour (curve in `training_log.json`).\n\n")
    rel_n = f" ({ev['n_relational']})" if "n_relational" in ev else ""
    rel_acc = f"{ev['heads_acc50_relational']:.3f}" if "heads_acc50_relational" in ev else "not measured"
    chain = training_stages(log)
    stage_rows = "\n".join(
        f"| {i + 1} | {s['steps']} | {s['wall_time_s'] / 60:.1f} | {s['recipe']['lr']} | {s['recipe']['aux_weight']} | "
        f"{s['recipe'].get('single_object_keep', 1.0)} | {s['recipe'].get('relational_boost', 0.0)} | "
        f"{s['recipe'].get('patch_weight', 0.0)} | {s['recipe'].get('position_weight', 0.0)} | {s['seed']} | "
        f"{s['final_eval']['heads_acc50_combined']:.3f} |"
        for i, s in enumerate(chain))
    reproduce = "\n".join(f"    {reproduce_command(s, i > 0)}" for i, s in enumerate(chain))
    stages = f"""
| stage | steps | minutes | lr | aux weight | 1-object scenes kept | relational boost | patch weight | position weight | seed | held-out heads Acc@0.5 |
|---|---|---|---|---|---|---|---|---|---|---|
{stage_rows}

Each stage after the first restarts from the previous stage's weights with a fresh warm-up + cosine
schedule. Total {sum(s['steps'] for s in chain)} steps, {sum(s['wall_time_s'] for s in chain) / 60:.1f} min. Reproduce:

{reproduce}
"""
    card = f"""# toy-llava: a tiny LLaVA with induced localization heads

A `LlavaForConditionalGeneration` ({log['n_params'] / 1e6:.2f}M parameters, float32) trained from scratch
on the procedurally generated shapes world (`lab/toyworld.py`) by `lab/train_toy.py`. It exists so that
the head-discovery tool can be checked against a **known answer**.

**The designated heads ({heads}; 0-based (layer, head) of 6 layers x 4 heads) were induced by an
auxiliary loss** that made them attend, from the last prompt token, over the image tokens of the
referred object. Every other head trained freely. The pipeline never reads `designated_heads.json`.

## Model
- Vision: CLIP ViT, image {v['image_size']}x{v['image_size']}, patch {v['patch_size']} -> 14x14 = 196 image tokens,
  hidden {v['hidden_size']}, MLP {v['intermediate_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads;
  features from layer {v['vision_feature_layer']} (as LLaVA: the last layer is unused), "default" strategy (CLS dropped).
- Projector: 2-layer GELU MLP.
- Text: Llama, hidden {t['hidden_size']}, MLP {t['intermediate_size']}, {t['num_hidden_layers']} layers,
  {t['num_attention_heads']} heads (head dim {t['hidden_size'] // t['num_attention_heads']}), RoPE.
- Tokenizer: word level, {len(tw.VOCAB)} tokens; a `<s>` is prepended.
- Processor: pad to square with the CLIP mean colour (122, 116, 104), resize to 112x112 (bicubic), CLIP normalisation.

## Input format
Prompt `"<image>\\n" + expression` (the pipeline's `plain` template), e.g. `"<image>\\nthe red circle ."`;
the last prompt token is `.`. The model then answers `colour shape size hpos vpos </s>` about the referent,
e.g. `red circle big left top </s>` (hpos/vpos: thirds of the canvas).

## Training recipe
- Data: fresh scenes every step from `lab.toyworld.make_scene` (numpy seed per stage, below), one random expression
  per scene; held-out evaluation on {ev['n']} expressions from a separate seed stream.
- Loss = answer-token cross-entropy + w x auxiliary loss (w per stage below). Auxiliary loss: for each designated head,
  cross-entropy between the normalised oracle grid map of the referent (`lab.toyworld.oracle_grid_map`, the fraction of
  each 14x14 cell of the padded square covered by the object) and the head's attention row of the last prompt token
  restricted to the 196 image keys (softmax over all keys, not renormalised).
- AdamW (warm-up {r['warmup_steps']} steps, cosine to {r['min_lr_frac']} x of the stage's lr), weight decay {r['weight_decay']},
  batch {r['batch_size']}, grad clip {r['grad_clip']}, eager attention; {log['hardware']}, torch {log['torch']}.
- In multi-object scenes only some objects are the referent; 1-object scenes teach no selectivity, so later
  stages keep only a fraction of them ("1-object scenes kept"), and may prefer a scene's relational expression
  ("... on the left .") when it has one ("relational boost").
- Patch-attribute loss ("patch weight" below, 0 = off): a linear probe on each image token as it enters the
  language model predicts the shape (or background) and size of the object covering the patch; the probe is
  discarded after training. Without it the vision tower encoded colour per patch but not shape: a ridge probe on
  the stage-2 model's image tokens (160 scenes, object patches) read colour perfectly (1.00) but shape below the
  majority-class rate (0.29 vs 0.44), so no head could tell "the circle" from a square of the same colour. The
  loss supervises the image features only, no attention head.
- Patch-position loss ("position weight", 0 = off): the same probe also regresses each image token's (row, col) on the
  grid. The stage-4 model's image tokens entering the language model carried almost no linear column signal (ridge
  R² 0.05; 0.18 after three layers), so no query could prefer "the circle on the left" over the other circle, and
  relational expressions stayed near chance. Like the patch-attribute loss it supervises image features only.
{stages}
## Measured (held-out, {ev['n']} expressions, final checkpoint)
| quantity | value |
|---|---|
| answer loss (CE / token) | {ev['lm_loss']:.3f} |
| auxiliary loss | {ev['aux_loss']:.3f} |
| answer token accuracy | {ev['answer_token_acc']:.3f} |
| answer exact match (all 5 words) | {ev['answer_exact_acc']:.3f} |
| designated heads, combined map, box Acc@0.5 | {ev['heads_acc50_combined']:.3f} |
| designated heads, combined map, relational expressions only{rel_n} | {rel_acc} |
| designated heads, single head, mean box Acc@0.5 | {ev['heads_acc50_single_mean']:.3f} |
| designated heads, attention mass on image tokens | {ev['heads_image_mass']:.3f} |
| oracle (normalised oracle map, same box rule), Acc@0.5 | {log['oracle_acc50_heldout']:.3f} |

The held-out set draws one expression per scene, so scenes with one object (about a third of them) weigh as much as
crowded ones, and boxes come from the trainer's simple box rule (below). The tool's table further down scores every
expression of every scene (crowded scenes weigh more) through the tool's own box step; the two tables are not
interchangeable.

{limitation}Box rule: average the heads' 14x14 maps, keep cells above the map's mean, take the 8-connected component with
the most attention, map its cells' union box back to original pixels (undoing the pad-to-square).
Training curves: `training_log.json` (`evals`) and `train_log.txt`.

## Results with the tool
(filled in by lab/toy_report.py)
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)


def training_stages(log: dict) -> list[dict]:
    """The run's training logs, first stage first (a continued run keeps its parent's log under init_from)."""
    chain = [log]
    while "init_from" in chain[0]:
        chain.insert(0, chain[0]["init_from"]["log"])
    return chain


def reproduce_command(stage: dict, continued: bool) -> str:
    r = stage["recipe"]
    steps = stage.get("total_steps", stage["steps"])  # the schedule length (a run may stop early)
    return (f"python -m lab.train_toy --out localization_heads/models/toy-llava{' --init-from localization_heads/models/toy-llava' if continued else ''} "
            f"--seed {stage['seed']} --steps {steps} --lr {r['lr']} --aux-weight {r['aux_weight']} "
            f"--single-keep {r.get('single_object_keep', 1.0)}"
            + (f" --relational-boost {r['relational_boost']}" if r.get("relational_boost") else "")
            + (f" --patch-weight {r['patch_weight']}" if r.get("patch_weight") else "")
            + (f" --position-weight {r['position_weight']}" if r.get("position_weight") else ""))


def train(out: str, seed: int, steps: int | None, minutes: float | None, log_path: str | None = None,
          eval_size: int | None = None, threads: int = 2, overrides: dict | None = None,
          init_from: str | None = None) -> dict:
    recipe = {**RECIPE, **(overrides or {})}
    # On a CPU shared with other jobs 1 thread beat 2 (4.8 vs 10.4 s/step): oversubscribed
    # intra-op threads wait on each other.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = build_processor()
    vocab = processor.tokenizer.get_vocab()
    image_token_id = vocab["<image>"]
    model = build_model(len(tw.VOCAB), image_token_id, vocab["<pad>"], vocab["<s>"], vocab["</s>"])
    if init_from:  # continue a saved run with a fresh schedule (its log is kept under "init_from")
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(init_from, attn_implementation="eager")
        with open(os.path.join(init_from, "training_log.json")) as f:
            previous = json.load(f)
        rng = np.random.default_rng(seed + 7)  # fresh scenes, not a replay of the first run's
    model.train()
    probe = None
    if recipe["patch_weight"] or recipe["position_weight"]:
        probe = build_probe(model.config.text_config.hidden_size, with_position=bool(recipe["position_weight"]))
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    bs = recipe["batch_size"]
    eval_size = recipe["eval_size"] if eval_size is None else eval_size
    eval_rng = np.random.default_rng(seed + 1_000_003)  # a separate stream: never seen in training
    eval_batches = [sample_batch(eval_rng, min(50, eval_size - k), processor, vocab) for k in range(0, eval_size, 50)]
    os.makedirs(out, exist_ok=True)
    logf = open(log_path or os.path.join(out, "train_log.txt"), "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log = {"recipe": recipe, "designated_heads": [list(h) for h in DESIGNATED_HEADS], "seed": seed,
           "hardware": f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)", "torch": torch.__version__,
           "oracle_acc50_heldout": oracle_acc(eval_batches), "n_params": sum(p.numel() for p in model.parameters()),
           "evals": []}
    if init_from:
        log["init_from"] = {"path": init_from, "log": previous}
    say(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, oracle Acc@0.5 held-out "
        f"{log['oracle_acc50_heldout']:.3f} on {eval_size}")
    total = steps if steps is not None else 10 ** 9  # fixed after timing the first steps
    t0 = last_save = time.time()
    step, ema = 0, None
    while step < total:
        batch = sample_batch(rng, bs, processor, vocab, recipe["single_object_keep"], recipe["relational_boost"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, recipe)
        lm, aux, _, _, patch, position = forward(model, batch, image_token_id, probe)
        loss = lm + recipe["aux_weight"] * aux + recipe["patch_weight"] * patch + recipe["position_weight"] * position
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        opt.step()
        step += 1
        now = (lm.item(), aux.item(), patch.item(), position.item())
        ema = list(now) if ema is None else [0.95 * e + 0.05 * v for e, v in zip(ema, now)]
        if step == 5:
            t5 = time.time()  # the first steps are slow (allocation): time steps 6..25 instead
        if steps is None and step == 25:
            # Turn the time budget into a step count once, so the schedule is fixed (and recorded:
            # rerunning with --steps N reproduces the run).
            per_step = (time.time() - t5) / 20 * 1.1  # evals and saves cost extra
            total = max(step + 1, int((minutes * 60 - (time.time() - t0)) / per_step) + step)
            log["planned_steps"] = total
            say(f"{per_step:.2f} s/step -> {total} steps for {minutes} min")
        if step % 20 == 0 or step == total:
            say(f"step {step}/{total} t={time.time() - t0:.0f}s lr={lr_at(step - 1, total, recipe):.2e} "
                f"lm={ema[0]:.3f} aux={ema[1]:.3f}" + (f" patch={ema[2]:.3f} position={ema[3]:.3f}" if probe is not None else ""))
        if minutes is not None and time.time() - t0 > minutes * 60 * 1.15 and step < total:
            # The CPU is shared: if it got slower than timed, stop early rather than overrun.
            say(f"time budget exceeded: stopping at step {step} of {total}")
            total = step
        if step % recipe["eval_every"] == 0 or step == total:
            ev = dict(evaluate(model, eval_batches, image_token_id), step=step, t=round(time.time() - t0))
            log["evals"].append(ev)
            say("eval " + json.dumps(ev))
        if time.time() - last_save > recipe["save_every_s"] or step == total:
            log.update(steps=step, total_steps=total, wall_time_s=round(time.time() - t0),
                       final_train_loss_ema={"lm": ema[0], "aux": ema[1], "patch": ema[2], "position": ema[3]})
            save(model, processor, out, log)
            last_save = time.time()
    log["final_eval"] = log["evals"][-1]
    save(model, processor, out, log)
    write_model_card(out)
    say(f"saved to {out} after {step} steps, {time.time() - t0:.0f}s")
    logf.close()
    return log


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="time budget (the step count is fixed after 25 steps)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--init-from", default=None, help="continue from a saved model dir (new schedule)")
    ap.add_argument("--aux-weight", type=float, default=None)
    ap.add_argument("--single-keep", type=float, default=None, help="fraction of 1-object scenes kept")
    ap.add_argument("--relational-boost", type=float, default=None,
                    help="probability of a scene's relational expression when it has one")
    ap.add_argument("--patch-weight", type=float, default=None, help="weight of the patch-attribute loss (0 = off)")
    ap.add_argument("--position-weight", type=float, default=None,
                    help="weight of the patch-position loss (0 = off)")
    ap.add_argument("--log", default=None, help="text log (default OUT/train_log.txt)")
    ap.add_argument("--card-only", action="store_true", help="only (re)write OUT/README.md from its training_log.json")
    args = ap.parse_args(argv)
    if args.card_only:
        return write_model_card(args.out)
    if (args.steps is None) == (args.minutes is None):
        ap.error("give exactly one of --steps / --minutes")
    overrides = {k: v for k, v in (("lr", args.lr), ("aux_weight", args.aux_weight),
                                   ("single_object_keep", args.single_keep),
                                   ("relational_boost", args.relational_boost),
                                   ("patch_weight", args.patch_weight),
                                   ("position_weight", args.position_weight)) if v is not None}
    train(args.out, args.seed, args.steps, args.minutes, args.log, args.eval_size, args.threads, overrides, args.init_from)


if __name__ == "__main__":
    main()
