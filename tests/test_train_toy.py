"""Smoke test of lab/train_toy.py: a few steps, then the saved model loads back the HF way."""

import json

import numpy as np
import torch

from lab import toyworld as tw
from lab import train_toy


def test_train_three_steps_and_reload(tmp_path):
    out = tmp_path / "toy"
    train_toy.train(str(out), seed=0, steps=2, minutes=None, log_path=str(tmp_path / "log.txt"), eval_size=4)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, attn_implementation="eager")
    scene = tw.make_scene(np.random.default_rng(0))
    expr = scene.expressions[0][1]
    batch = proc(images=[scene.image], text=["<image>\n" + expr], return_tensors="pt", padding=True)
    ids = batch["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 196
    assert proc.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "."
    with torch.no_grad():
        o = model(**batch, output_attentions=True)
    assert len(o.attentions) == 6 and o.attentions[0].shape[1] == 4
    heads = json.loads((out / "designated_heads.json").read_text())["heads"]
    assert heads == [list(h) for h in train_toy.DESIGNATED_HEADS]
    assert json.loads((out / "training_log.json").read_text())["steps"] == 2
