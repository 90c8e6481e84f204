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


def test_continued_run_card_lists_both_stages_with_reproduce_commands(tmp_path):
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    train_toy.train(str(first), seed=0, steps=1, minutes=None, eval_size=2)
    train_toy.train(str(second), seed=5, steps=1, minutes=None, eval_size=2, init_from=str(first),
                    overrides={"aux_weight": 4.0, "single_object_keep": 0.3, "relational_boost": 0.5,
                               "patch_weight": 2.0, "position_weight": 4.0})
    card = (second / "README.md").read_text()
    assert "| 1 | 1 |" in card and "| 2 | 1 |" in card
    assert "--seed 0 --steps 1 --lr 0.001 --aux-weight 2.0 --single-keep 1.0\n" in card
    assert ("--init-from localization_heads/models/toy-llava --seed 5 --steps 1 --lr 0.001 --aux-weight 4.0 --single-keep 0.3 "
            "--relational-boost 0.5 --patch-weight 2.0 --position-weight 4.0") in card


def test_relational_boost_one_always_picks_a_relational_expression_when_the_scene_has_one():
    rng = np.random.default_rng(3)
    scenes = [tw.make_scene(rng) for _ in range(60)]
    with_relational = [s for s in scenes if any(tw.is_relational(e) for _, e in s.expressions)]
    assert with_relational and len(with_relational) < len(scenes)
    for scene in scenes:
        i, expr = train_toy.pick_expression(scene, rng, relational_boost=1.0)
        assert (i, expr) in scene.expressions
        assert tw.is_relational(expr) == (scene in with_relational)


def test_patch_labels_name_the_owning_objects_shape_and_size_and_ignore_partly_covered_patches():
    scene = tw.make_scene(np.random.default_rng(11))
    labels = train_toy.patch_attribute_labels(scene)  # [2, 196]: shape (+ background), size
    assert labels.shape == (2, 196)
    cov = np.stack([tw.oracle_grid_map(o.mask, scene.width, scene.height).reshape(-1) for o in scene.objects])
    for p in range(196):
        k, most = int(cov[:, p].argmax()), cov[:, p].max()
        if most >= 0.5:
            assert labels[0, p] == tw.SHAPES.index(scene.objects[k].shape)
            assert labels[1, p] == tw.SIZES.index(scene.objects[k].size)
        elif most < 0.05:
            assert (labels[0, p], labels[1, p]) == (len(tw.SHAPES), -100)
        else:
            assert (labels[:, p] == -100).all()
    assert (labels[0] == len(tw.SHAPES)).any() and (labels[0] < len(tw.SHAPES)).any()


def test_patch_position_targets_are_row_major_grid_coordinates_scaled_to_unit_range():
    pos = train_toy.PATCH_POSITION  # [196, 2] (row, col)
    assert pos.shape == (196, 2)
    assert pos[0].tolist() == [-1.0, -1.0] and pos[13].tolist() == [-1.0, 1.0] and pos[195].tolist() == [1.0, 1.0]
    assert torch.allclose(pos[14], torch.tensor([-1 + 2 / 13, -1.0]))


def test_position_loss_is_the_mean_squared_target_for_a_zero_read_out_and_off_without_position_outputs():
    proc = train_toy.build_processor()
    vocab = proc.tokenizer.get_vocab()
    model = train_toy.build_model(len(tw.VOCAB), vocab["<image>"], vocab["<pad>"], vocab["<s>"], vocab["</s>"])
    batch = train_toy.sample_batch(np.random.default_rng(0), 2, proc, vocab)
    hidden = model.config.text_config.hidden_size
    with torch.no_grad():
        *_, position = train_toy.forward(model, batch, vocab["<image>"], train_toy.build_probe(hidden, with_position=True))
        *_, patch, no_position = train_toy.forward(model, batch, vocab["<image>"],
                                                   train_toy.build_probe(hidden, with_position=False))
    assert abs(position.item() - float((train_toy.PATCH_POSITION ** 2).mean())) < 1e-6
    assert no_position.item() == 0.0 and patch.item() > 0
