"""What the tool promises (README "What the tool promises"), tried as a new user would on the
bundled toy model: bad config, bad rows, odd images, edited inputs, busy or unwritable folders,
interrupts. Nothing may give a wrong result with exit code 0.

`cli(...)` runs `python pipeline.py ...` in this process (runpy, so Hydra parses the overrides and
main() sets the exit code exactly as on a terminal); `subprocess_cli(...)` starts a real process
where the process itself is under test (signals, kill -9, quoting)."""
from __future__ import annotations

import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localization_heads import cli as pipeline
from localization_heads import settings
from localization_heads.collector import load_attention
from localization_heads.dataio import InputError
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"
TOY = ["model=toy", "data.num_workers=0", "logic=paper", "logic.mask.threshold=half_max"]
EXIT_OK, EXIT_NOT_RUN, EXIT_ROWS_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


@pytest.fixture
def cli(capfd):
    """cli(*overrides) → (exit code, everything printed)."""
    def run(*overrides: str) -> tuple[int, str]:
        argv = sys.argv
        sys.argv = [str(REPO / "pipeline.py"), *overrides]
        code = 0
        try:
            runpy.run_path(str(REPO / "pipeline.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
        out, err = capfd.readouterr()
        return code, out + err
    return run


def subprocess_cli(*overrides: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """Appends one entry per model load: the config checks must all come before it."""
    loads = []
    real = settings.load_adapter_from
    monkeypatch.setattr(settings, "load_adapter_from", lambda cfg: loads.append(1) or real(cfg))
    return loads


def rows_file(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)


def good_rows(n: int = 3) -> list[dict]:
    images = ["toy_tall.png", "toy_wide.png", "toy_square.png", "toy_tall4.png"]
    prompts = ["the triangle .", "the blue square .", "the square .", "the yellow circle ."]
    return [{"id": f"r{i}", "prompt": prompts[i % 4], "image_path": str(EXAMPLES / images[i % 4])} for i in range(n)]


def batch_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["stage=batch", *TOY, f"data.data_file={data}", "data.process_all=true", f"data.output_dir={out}", *more]


def folder(out: Path) -> Path:
    return out / "toy-llava"


# ---------------------------------------------------------------- exit codes

def test_every_row_succeeding_exits_0(cli, tmp_path):
    code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(2)), tmp_path / "out"))
    assert code == EXIT_OK and (folder(tmp_path / "out") / "r1_bbox.json").is_file()


def test_failed_rows_exit_3_and_the_others_finish(cli, tmp_path):
    rows = good_rows(2) + [{"id": "gone", "prompt": "the square .", "image_path": str(tmp_path / "no.png")}]
    code, out = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out"))
    assert code == EXIT_ROWS_FAILED
    assert (folder(tmp_path / "out") / "r1_bbox.json").is_file()
    assert "gone" in (folder(tmp_path / "out") / "failures.jsonl").read_text()


def test_a_run_where_every_row_fails_is_not_a_success(cli, tmp_path):
    rows = [{"id": f"gone{i}", "prompt": "the square .", "image_path": f"no{i}.png"} for i in range(2)]
    code, _ = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out"))
    assert code == EXIT_ROWS_FAILED


@pytest.mark.parametrize("override, message", [
    ("logic.mask.threshold=bogus", "logic.mask.threshold='bogus': unknown; use one of mean, half_max"),
    ("logic.mask.method=hull", "logic.mask.method='hull': unknown"),
    ("logic.entropy.method=shannon", "logic.entropy.method='shannon': unknown"),
    ("logic.threshold.scope=global", "logic.threshold.scope='global': unknown"),
    ("model.attn_capture=flash", "model.attn_capture='flash': unknown"),
    ("model.dtype=f16", "model.dtype='f16': unknown"),
    ("data.attn_dtype=bfloat16", "data.attn_dtype='bfloat16': unknown"),
    ("logic.top_k=0", "logic.top_k=0: must be an integer >= 1"),
    ("logic.select.k=0", "logic.select.k=0: must be an integer >= 1"),
    ("logic.smoothing.sigma=-1", "logic.smoothing.sigma=-1: must be a finite number >= 0"),
    ("logic.heads=[[0]]", "logic.heads from logic.heads: expected [[layer, head], ...]"),
    ("logic.heads=[[-1,0]]", "are negative"),
    ("logic.heads=no/such/heads.json", "file not found"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.resume=maybe", "data.resume='maybe': must be true or false"),
    ("model.device=gpu", "model.device='gpu': use auto, cpu, cuda or cuda:<index>"),
])
def test_config_mistakes_stop_the_run_before_the_model_loads(override, message, cli, tmp_path, model_loads):
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"), override)
    assert code == EXIT_NOT_RUN and message in out and "Traceback" not in out
    assert model_loads == []


def test_every_config_mistake_is_listed_at_once(cli, tmp_path):
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"),
                    "logic.top_k=0", "logic.mask.threshold=bogus", "data.batch_size=0")
    assert code == EXIT_NOT_RUN and "3 problems" in out
    assert all(k in out for k in ("logic.top_k=0", "logic.mask.threshold='bogus'", "data.batch_size=0"))


def test_unknown_stage_exits_2(cli, tmp_path):
    code, out = cli("stage=colect", *TOY, f"data.output_dir={tmp_path}")
    assert code == EXIT_NOT_RUN and "stage='colect' is unknown" in out


def test_nan_in_an_attention_file_is_an_error_naming_the_file(cli, tmp_path):
    cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"))
    path = folder(tmp_path / "out") / "r0.pkl"
    raw = torch.load(path, weights_only=True)
    raw["attn"][2, 1, 0, 5] = float("nan")
    bad = tmp_path / "nan.pkl"
    torch.save(raw, bad)
    code, out = cli("stage=analyze", *TOY, f"data.attention_file={bad}", f"data.output_dir={tmp_path / 'out'}")
    assert code == EXIT_NOT_RUN and f"{bad}: 'attn' holds 1 NaN/inf values" in out
    assert not (tmp_path / "nan_analysis.pkl").exists()


def test_a_batch_over_part_of_the_file_says_so(cli, tmp_path):
    data = rows_file(tmp_path, good_rows(3))
    code, out = cli("stage=batch", *TOY, f"data.data_file={data}", f"data.output_dir={tmp_path / 'out'}")
    assert code == EXIT_OK
    assert "only rows [0, 1) of the 3" in out and "data.process_all=true" in out


# ---------------------------------------------------------------- JSONL rows

@pytest.mark.parametrize("row, message", [
    ({"id": None, "prompt": "a", "image_path": "a.png"}, "id: null is not an id; give a string or an integer"),
    ({"id": True, "prompt": "a", "image_path": "a.png"}, "id: true is not an id"),
    ({"id": "x", "prompt": ["the dog", "the cat"], "image_path": "a.png"},
     "prompt: a list ([\"the dog\", \"the cat\"]); give one referring expression as a string"),
    ({"id": "x", "prompt": "a", "image_path": 7}, "image_path: 7 is not a path"),
    ({"id": "x" * 300, "prompt": "a", "image_path": "a.png"}, "is 300 bytes long (UTF-8); shorten it to at most 200"),
    ({"id": "x" * 236, "prompt": "a", "image_path": "a.png"}, "is 236 bytes long"),
    ({"id": "a\nb", "prompt": "a", "image_path": "a.png"}, "contains a control character"),
    ({"id": ".hidden", "prompt": "a", "image_path": "a.png"}, "is not a plain file name"),
    ({"id": "r0_analysis", "prompt": "a", "image_path": "a.png"}, "ends in '_analysis', which names another id's output"),
    ({"id": "x", "image_path": "a.png"}, "prompt: missing"),
])
def test_bad_rows_are_refused_with_a_precise_message(row, message, cli, tmp_path, model_loads):
    data = rows_file(tmp_path, [good_rows(1)[0], row])
    code, out = cli(*batch_args(data, tmp_path / "out"))
    assert code == EXIT_NOT_RUN and f"{data}:2: " in out and message in out and "Traceback" not in out
    assert model_loads == [] and not list(folder(tmp_path / "out").glob("*.pkl"))


def test_every_bad_row_of_the_file_is_listed_at_once(cli, tmp_path):
    data = rows_file(tmp_path, [
        good_rows(1)[0],
        "{not json",
        {"id": None, "prompt": "a", "image_path": "a.png"},
        {"id": "y", "prompt": 3, "image_path": "a.png"},
        {"id": "r0", "prompt": "a", "image_path": "a.png"},
    ])
    code, out = cli(*batch_args(data, tmp_path / "out"))
    assert code == EXIT_NOT_RUN and "4 problems" in out
    for line in (f"{data}:2: not valid JSON", f"{data}:3: id: null", f"{data}:4: prompt: a int",
                 f"{data}:5: id: duplicate id 'r0' (first on line 1)"):
        assert line in out


def test_integer_ids_name_files_as_their_digits(cli, tmp_path):
    row = dict(good_rows(1)[0], id=1234)
    code, _ = cli(*batch_args(rows_file(tmp_path, [row]), tmp_path / "out"))
    assert code == EXIT_OK and (folder(tmp_path / "out") / "1234_bbox.json").is_file()


# ---------------------------------------------------------------- output folder

def test_an_output_folder_that_is_a_file_stops_the_run_before_hydra(cli, tmp_path, model_loads):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = cli(*batch_args(rows_file(tmp_path, good_rows(1)), blocker / "out"))
    assert code == EXIT_NOT_RUN and "cannot write outputs here" in out and "Traceback" not in out
    assert model_loads == []


def test_an_unwritable_model_folder_stops_the_run_before_the_model_loads(cli, tmp_path, model_loads, readonly):
    """The Hydra log folder is writable; only <output_dir>/<model>/ is not."""
    out = tmp_path / "out"
    readonly(folder(out))
    code, text = cli(*batch_args(rows_file(tmp_path, good_rows(1)), out))
    assert code == EXIT_NOT_RUN and f"{folder(out)}: cannot write outputs here" in text
    assert model_loads == []


@pytest.fixture
def mounts():
    """mount(path, options): a small tmpfs at `path` (read-only, or nearly full), or skip where
    this process may not mount; unmounted afterwards."""
    mounted = []

    def mount(path: Path, options: str):
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def readonly(mounts):
    """readonly(path): make `path` a read-only folder, even for root (a read-only tmpfs)."""
    import os

    def make(path: Path):
        if os.geteuid() != 0:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o555)
        else:
            mounts(path, "ro,size=1m")

    return make


def test_a_full_disk_fails_rows_not_the_run_and_a_rerun_completes(cli, tmp_path, mounts):
    """Room for a few of the 12 rows: the rest fail (exit 3, each listed in the log even though
    failures.jsonl cannot be written either); with room again a rerun finishes them all."""
    out = tmp_path / "out"
    mounts(folder(out), "size=128k")
    args = batch_args(rows_file(tmp_path, good_rows(12)), out, f"hydra.run.dir={tmp_path / 'hydra'}")
    code, log = cli(*args)
    assert code == EXIT_ROWS_FAILED and "No space left on device" in log
    finished = len(list(folder(out).glob("*_bbox.json")))
    assert 0 < finished < 12
    subprocess.run(["mount", "-o", "remount,size=4m", str(folder(out))], check=True)
    code, log = cli(*args)
    assert code == EXIT_OK and f"{finished} complete" in log
    assert len(list(folder(out).glob("*_bbox.json"))) == 12


# ---------------------------------------------------------------- resume keyed on content

def bbox_of(out: Path, item_id: str) -> dict:
    return json.loads((folder(out) / f"{item_id}_bbox.json").read_text())


def test_a_row_whose_prompt_was_edited_is_redone(cli, tmp_path):
    rows = good_rows(2)
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    untouched = (folder(out) / "r1.pkl").stat().st_mtime_ns
    rows[0]["prompt"] = "the small yellow circle ."
    rows_file(tmp_path, rows)
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "redoing 1 rows: prompt changed (r0)" in log
    assert bbox_of(out, "r0")["query"] == "the small yellow circle ."
    assert load_attention(folder(out) / "r0.pkl")["meta"]["query"] == "the small yellow circle ."
    assert (folder(out) / "r1.pkl").stat().st_mtime_ns == untouched


def test_a_row_whose_image_file_was_replaced_is_redone(cli, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    data = rows_file(tmp_path, [{"id": "a", "prompt": "the triangle .", "image_path": "scene.png"}])
    out = tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert bbox_of(out, "a")["image_size"] == [96, 146]
    image.write_bytes((EXAMPLES / "toy_wide.png").read_bytes())   # same path, other picture
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "image file changed (a)" in log
    assert bbox_of(out, "a")["image_size"] == [155, 123]


def test_a_row_with_a_file_from_another_run_is_redone(cli, tmp_path):
    """A mask written by a run with other settings (say, two runs at once before locks) does not
    belong to the row's _bbox.json: the row is not complete."""
    data, out, other = rows_file(tmp_path, good_rows(1)), tmp_path / "out", tmp_path / "other"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    mask = (folder(out) / "r0_mask.png").read_bytes()
    assert cli(*batch_args(data, other, "logic.mask.threshold=mean"))[0] == EXIT_OK
    foreign = (folder(other) / "r0_mask.png").read_bytes()
    assert foreign != mask
    (folder(out) / "r0_mask.png").write_bytes(foreign)
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and "files replaced since the row was finished (r0)" in log
    assert (folder(out) / "r0_mask.png").read_bytes() == mask


def test_a_row_missing_one_of_its_files_is_redone(cli, tmp_path):
    data, out = rows_file(tmp_path, good_rows(1)), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    (folder(out) / "r0_analysis.pkl").unlink()
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and (folder(out) / "r0_analysis.pkl").is_file()


HOLD = """
import sys, time
from localization_heads.locks import RowLocks
with RowLocks(sys.argv[1], sys.argv[2:]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def hold_rows():
    """hold_rows(folder, *ids): another process holds those rows, as a running batch would."""
    holders = []

    def hold(where: Path, *ids: str):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(where), *ids], cwd=REPO, stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


def test_a_second_run_on_rows_being_written_refuses(cli, tmp_path, hold_rows, model_loads):
    data, out = rows_file(tmp_path, good_rows(3)), tmp_path / "out"
    hold_rows(folder(out), "r1")
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_NOT_RUN and "another run is writing 1 of these rows right now ('r1')" in log
    assert model_loads == [] and not list(folder(out).glob("r*"))


def test_runs_on_different_rows_of_one_folder_go_together(cli, tmp_path, hold_rows):
    """Shards: another process holds r0; a run over r1 and r2 proceeds."""
    out = tmp_path / "out"
    hold_rows(folder(out), "r0")
    code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(3)[1:]), out))
    assert code == EXIT_OK and (folder(out) / "r2_bbox.json").is_file()


def test_a_single_image_run_refuses_while_its_id_is_being_written(cli, tmp_path, hold_rows):
    out = tmp_path / "out"
    hold_rows(folder(out), "sample")
    code, log = cli("stage=pipeline", *TOY, f"data.output_dir={out}", f"data.image_file={EXAMPLES / 'toy_tall.png'}",
                    "data.query=the triangle .")
    assert code == EXIT_NOT_RUN and "('sample')" in log


def failures_of(out: Path) -> dict[str, str]:
    path = folder(out) / "failures.jsonl"
    return {json.loads(l)["id"]: json.loads(l)["error"] for l in path.read_text().splitlines()} if path.exists() else {}


def test_a_clean_run_of_another_jsonl_keeps_the_failure_list(cli, tmp_path):
    out = tmp_path / "out"
    broken = [{"id": "gone", "prompt": "the square .", "image_path": "no.png"}]
    first = rows_file(tmp_path, good_rows(1) + broken, "first.jsonl")
    assert cli(*batch_args(first, out))[0] == EXIT_ROWS_FAILED
    second = rows_file(tmp_path, [dict(good_rows(2)[1], id="other")], "second.jsonl")
    assert cli(*batch_args(second, out))[0] == EXIT_OK
    assert set(failures_of(out)) == {"gone"}
    broken[0]["image_path"] = str(EXAMPLES / "toy_square.png")   # fixed: the rerun clears its entry
    rows_file(tmp_path, good_rows(1) + broken, "first.jsonl")
    assert cli(*batch_args(first, out))[0] == EXIT_OK
    assert failures_of(out) == {}


# ---------------------------------------------------------------- images as they are

def odd_images(where: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name → (file, the RGB pixels the rule in images.py says the model must see)."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)            # 0 .. 64,491
    Image.fromarray(ramp).save(where / "gray16.png")
    out["gray16"] = (where / "gray16.png", np.repeat(np.rint(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=2))

    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([200, 30, 30, 30, 30, 200] + [0] * 762)
    palette.paste(1, (0, 0, 32, 48))                                              # left half: colour 1, transparent
    palette.save(where / "palette.png", transparency=1)
    expected = np.zeros((48, 64, 3), np.uint8)
    expected[:, :32], expected[:, 32:] = 255, (200, 30, 30)
    out["palette"] = (where / "palette.png", expected)

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (0, 100, 200), np.linspace(0, 255, 64).astype(np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(where / "rgba.png")
    a = rgba[..., 3:4] / 255.0
    out["rgba"] = (where / "rgba.png", np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8))

    la = np.stack([np.full((48, 64), 40, np.uint8), np.full((48, 64), 128, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(where / "la.png")
    out["la"] = (where / "la.png", np.full((48, 64, 3), round(40 * 128 / 255 + 255 * 127 / 255), np.uint8))

    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(where / "cmyk.tif")
    out["cmyk"] = (where / "cmyk.tif", np.broadcast_to(np.array([255, 0, 0], np.uint8), (48, 64, 3)))

    Image.new("L", (64, 48), 90).save(where / "gray.png")
    out["gray"] = (where / "gray.png", np.full((48, 64, 3), 90, np.uint8))

    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :16] = (250, 250, 0)                                                # yellow band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6                                                              # "rotate 90° clockwise to view"
    Image.fromarray(stored).save(where / "exif.png", exif=exif)
    out["exif"] = (where / "exif.png", stored)

    frames = [Image.new("RGB", (64, 48), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(where / "anim.gif", save_all=True, append_images=frames[1:])
    out["anim"] = (where / "anim.gif", np.broadcast_to(np.array([255, 0, 0], np.uint8), (48, 64, 3)))
    return out


def test_images_are_read_by_one_stated_rule(tmp_path, caplog):
    from localization_heads.images import load_image

    caplog.set_level("INFO")
    for name, (path, expected) in odd_images(tmp_path).items():
        got = np.asarray(load_image(path))
        assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1, name
    assert "anim.gif: animated (3 frames); the model sees the first frame only" in caplog.text
    assert "exif.png: EXIF orientation 6 is not applied" in caplog.text


def test_a_float_image_is_refused_not_guessed(tmp_path):
    from localization_heads.images import load_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="float.tif: 32-bit float image"):
        load_image(tmp_path / "float.tif")


def test_the_model_and_the_figure_see_the_same_converted_pixels(cli, tmp_path, monkeypatch):
    from localization_heads import batch
    from localization_heads import viz

    seen_by_model, drawn = [], {}
    real_collect, real_figure = batch.collect, viz.figure_png

    def spy_collect(adapter, images, queries, **kw):
        seen_by_model.extend(np.asarray(image) for image in images)
        return real_collect(adapter, images, queries, **kw)

    def spy_figure(image, attn, meta, heads, result, **labels):
        drawn[meta["id"]] = np.asarray(image)
        return real_figure(image, attn, meta, heads, result, **labels)

    monkeypatch.setattr(batch, "collect", spy_collect)
    monkeypatch.setattr(viz, "figure_png", spy_figure)
    images = odd_images(tmp_path / "images")
    rows = [{"id": name, "prompt": "the square .", "image_path": str(path)} for name, (path, _) in images.items()]
    code, _ = cli(*batch_args(rows_file(tmp_path, rows), tmp_path / "out", "data.visualize_batch=true"))
    assert code == EXIT_OK
    for name, (_, expected) in images.items():
        assert any(m.shape == expected.shape and np.abs(m.astype(int) - expected).max() <= 1 for m in seen_by_model), name
        assert np.abs(drawn[name].astype(int) - expected).max() <= 1, name


def test_a_huge_image_is_drawn_small_in_bounded_memory():
    """A 2000 × 1500 image took 300 MB and 10 s to draw (a 10,000² one 12 GB); the figure is
    drawn from the image scaled to at most 512 px on its longest side."""
    import tracemalloc

    from localization_heads import bbox
    from localization_heads import viz
    from localization_heads.config import LogicSettings
    from localization_heads.families.llava import compute_geometry

    image = Image.new("RGB", (2000, 1500), (40, 90, 40))
    geometry = compute_geometry(image.size, (14, 14), pad=True)
    attn = torch.rand(3, 4, 1, 196)
    logic = LogicSettings.from_config(pipeline.compose("logic=paper").logic)
    loc = bbox.locate(bbox.combine_heads(attn, (14, 14), [(1, 1)], 1.0), geometry, logic.mask)
    heads = [{"layer": 1, "head": 1, "spatial_entropy": 0.5}]
    tracemalloc.start()
    try:
        png = viz.figure_png(image, attn, {"layout": geometry.to_dict(), "query": "x"}, heads, loc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6 and Image.open(io.BytesIO(png)).size[0] < 1600   # the figure, not the image, sets its size


# ---------------------------------------------------------------- interrupts and workers

@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A JSONL long enough (48 rows) to interrupt, and its uninterrupted outputs to compare with."""
    where = tmp_path_factory.mktemp("long")
    data = rows_file(where, good_rows(48))
    reference = where / "reference"
    result = pipeline.run(pipeline.compose(*batch_args(data, reference)))
    assert result["written"] == 48
    return data, folder(reference)


def start_batch(data: Path, out: Path, *more: str) -> subprocess.Popen:
    """The batch in its own process group (as a terminal starts it), with two decoding workers.
    Batch size 1 as in the reference run: left padding moves float rounding (1e-5) with the batch."""
    return subprocess.Popen([sys.executable, "pipeline.py", *batch_args(data, out, "data.num_workers=2", *more)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_rows(proc: subprocess.Popen, out: Path, n: int = 4, timeout: float = 120) -> None:
    """Until `n` rows are finished: the run is in the middle of its work."""
    import time

    end = time.monotonic() + timeout
    while len(list(folder(out).glob("*_bbox.json"))) < n:
        assert proc.poll() is None and time.monotonic() < end, "the batch ended before it could be interrupted"
        time.sleep(0.05)


def assert_same_outputs(got: Path, expected: Path) -> None:
    """File for file: the same names, attention, analysis, masks and boxes (file stamps aside)."""
    def names(where: Path) -> list[str]:
        return sorted(p.name for p in where.iterdir() if not p.name.startswith(".") and p.name != "failures.jsonl")

    assert names(got) == names(expected)
    for name in names(expected):
        a, b = got / name, expected / name
        if name.endswith("_bbox.json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert {k: v for k, v in ja.items() if k != "row_files"} == {k: v for k, v in jb.items() if k != "row_files"}
        elif name.endswith(".pkl") and not name.endswith("_analysis.pkl"):
            ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert torch.equal(ra["attn"], rb["attn"]) and ra["meta"] == rb["meta"], name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_kill_9_leaves_no_process_behind_and_a_rerun_completes_the_run(long_run, tmp_path, cli):
    import os
    import signal
    import time

    data, reference = long_run
    out = tmp_path / "out"
    proc = start_batch(data, out)
    wait_for_rows(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    with pytest.raises(ProcessLookupError):   # no image-decoding worker (or anything else) survived
        os.killpg(proc.pid, 0)
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert_same_outputs(folder(out), reference)


def test_ctrl_c_stops_within_seconds_without_a_traceback_and_a_rerun_completes_the_run(long_run, tmp_path, cli):
    import os
    import signal
    import time

    data, reference = long_run
    out = tmp_path / "out"
    proc = start_batch(data, out)
    wait_for_rows(proc, out)
    os.killpg(proc.pid, signal.SIGINT)      # what Ctrl-C in a terminal does
    start = time.monotonic()
    text, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 10
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert "Traceback" not in text and "interrupted" in text
    finished = len(list(folder(out).glob("*_bbox.json")))
    assert finished < 48, "the run went on after Ctrl-C"
    code, log = cli(*batch_args(data, out))
    assert code == EXIT_OK and f"{finished} complete" in log
    assert_same_outputs(folder(out), reference)


# ---------------------------------------------------------------- quoting, file modes

# The README's "Quoting" examples, run as written (only `python pipeline.py` made absolute).
README_QUOTING = [
    ("""python pipeline.py stage=pipeline model=toy 'data.image_file="photos/photo (1), ü.png"' """
     """'data.query="the small, yellow circle (left)"'""",
     "photos/photo (1), ü.png", "the small, yellow circle (left)"),
    ("""python pipeline.py stage=pipeline model=toy "data.image_file=\\"photos/Ann's photo.png\\"" """
     """"data.query=\\"the dog's tail\\"\"""",
     "photos/Ann's photo.png", "the dog's tail"),
]


@pytest.mark.parametrize("command, image_file, query", README_QUOTING)
def test_the_readme_shows_how_to_quote_and_it_works_in_a_shell(command, image_file, query, tmp_path):
    assert command in (REPO / "README.md").read_text()
    (tmp_path / "photos").mkdir()
    (tmp_path / image_file).write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    result = subprocess.run(["bash", "-c", command.replace("python pipeline.py", f"{sys.executable} {REPO / 'pipeline.py'}")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    summary = json.loads((tmp_path / "_overhaul/outputs/localization_heads/toy-llava/sample_bbox.json").read_text())
    assert summary["query"] == query and summary["image_file"] == image_file


TRICKY = ["the dog's tail", "the small, yellow circle", "photo (1).png", "über café ☕", 'say "hi"', "a=b", "[x]",
          "{a: 1}", "back\\slash", "${oc.env:HOME}", "it's \"both\"", "50% off #1", "trailing\\", "\\${x}", "'"]


def test_override_passes_any_text_through_hydra():
    for text in TRICKY:
        assert pipeline.compose(pipeline.override("data.query", text)).data.query == text


def test_any_query_and_path_reach_the_model_through_the_real_cli(tmp_path):
    query = "the dog's \"small\", yellow (left) circle — ü ${x} \\"
    image = tmp_path / "dir, with (parens)" / "it's ü [1].png"
    image.parent.mkdir()
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())
    result = subprocess_cli("stage=collect", *TOY, f"data.output_dir={tmp_path / 'out'}",
                            pipeline.override("data.image_file", str(image)), pipeline.override("data.query", query))
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    meta = load_attention(folder(tmp_path / "out") / "sample.pkl")["meta"]
    assert meta["query"] == query and meta["image_file"] == str(image)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_are_created_with_the_users_umask(umask, mode, cli, tmp_path):
    import os

    old = os.umask(umask)
    try:
        code, _ = cli(*batch_args(rows_file(tmp_path, good_rows(1)), tmp_path / "out"))
    finally:
        os.umask(old)
    assert code == EXIT_OK
    files = [p for p in folder(tmp_path / "out").iterdir() if p.is_file() and not p.name.startswith(".")]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {mode}


# ---------------------------------------------------------------- select and evaluate see what they should

def test_select_votes_over_the_rows_of_the_given_jsonl_only(cli, tmp_path):
    out = tmp_path / "out"
    data = rows_file(tmp_path, good_rows(3))
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    assert cli("stage=pipeline", *TOY, f"data.output_dir={out}", f"data.image_file={EXAMPLES / 'toy_wide.png'}",
               "data.query=the blue square .", "data.id=single")[0] == EXIT_OK
    code, log = cli("stage=select", *TOY, f"data.output_dir={out}", f"data.data_file={data}")
    selected = json.loads((folder(out) / "selected_heads.json").read_text())
    assert code == EXIT_OK and selected["n_samples"] == 3 and f"voting over the 3 rows of {data}" in log
    code, log = cli("stage=select", *TOY, f"data.output_dir={out}")
    selected = json.loads((folder(out) / "selected_heads.json").read_text())
    assert code == EXIT_OK and selected["n_samples"] == 4 and "voting over all 4 attention files" in log


def test_evaluate_refuses_predictions_made_from_another_prompt_or_image(cli, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes((EXAMPLES / "toy_wide.png").read_bytes())
    rows = [dict(r, bbox=[9, 49, 66, 106]) for r in good_rows(3)]
    rows[2]["image_path"] = "scene.png"
    data, out = rows_file(tmp_path, rows), tmp_path / "out"
    assert cli(*batch_args(data, out))[0] == EXIT_OK
    rows[0]["prompt"] = "the small circle ."                          # edited after the batch ran
    rows_file(tmp_path, rows)
    image.write_bytes((EXAMPLES / "toy_tall.png").read_bytes())       # replaced after the batch ran
    assert cli("stage=evaluate", *TOY, f"data.output_dir={out}", f"data.data_file={data}")[0] == EXIT_OK
    evaluation = json.loads((folder(out) / "evaluation.json").read_text())
    assert evaluation["status_counts"]["stale"] == 2 and evaluation["status_counts"]["ok"] == 1
    assert evaluation["missing_reasons"]["r0"].startswith("prompt changed since r0_bbox.json was made")
    assert evaluation["missing_reasons"]["r2"].startswith("image file changed")


def test_an_unreachable_model_fails_in_seconds_not_after_retries(cli, tmp_path, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: no network
    args = ["stage=pipeline", "model.name=nobody/not-a-cached-model", f"data.output_dir={tmp_path}",
            f"data.image_file={EXAMPLES / 'toy_tall.png'}", "data.query=the triangle ."]
    start = time.monotonic()
    code, log = cli(*args)
    assert code == EXIT_NOT_RUN and time.monotonic() - start < 10
    assert "is not a local folder and not in the Hugging Face cache, and 127.0.0.1:9 cannot be reached" in log
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, log = cli(*args)
    assert code == EXIT_NOT_RUN and "HF_HUB_OFFLINE is set" in log


def test_a_rerun_that_needs_no_model_runs_without_it(cli, tmp_path):
    """Outputs copied to a machine without the model: new logic is applied from the saved attention."""
    import shutil

    model = tmp_path / "toy-llava"
    shutil.copytree(REPO / "localization_heads" / "models" / "toy-llava", model)
    data, out = rows_file(tmp_path, good_rows(2)), tmp_path / "out"
    assert cli(*batch_args(data, out, f"model.name={model}"))[0] == EXIT_OK
    shutil.rmtree(model)
    code, log = cli(*batch_args(data, out, f"model.name={model}", "logic.mask.threshold=mean"))
    assert code == EXIT_OK and "2 to redo from saved attention, 0 to run through the model" in log, log
    assert bbox_of(out, "r0")["settings"]["logic"]["mask"]["threshold"] == "mean"


# ---------------------------------------------------------------- reruns from elsewhere

def test_a_rerun_from_another_folder_finds_the_rows_complete_and_reboxes_from_the_rows_paths(
        cli, tmp_path, monkeypatch, model_loads):
    """What outputs record does not depend on the working directory: a finished batch run with a
    relative data file is complete when rerun from elsewhere (the toy model's folder is recorded as an
    absolute path), and a new logic re-boxes from the saved attention with the image path of the row
    as this run resolves it, not the relative one saved in the file."""
    data_dir = tmp_path / "data"
    images = data_dir / "images"
    images.mkdir(parents=True)
    rows = []
    for row in good_rows(2):
        (images / Path(row["image_path"]).name).write_bytes(Path(row["image_path"]).read_bytes())
        rows.append(dict(row, image_path=f"images/{Path(row['image_path']).name}"))
    rows_file(data_dir, rows)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert cli(*batch_args(Path("data/data.jsonl"), out))[0] == EXIT_OK
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, log = cli(*batch_args(data_dir / "data.jsonl", out))
    assert code == EXIT_OK and "2 complete" in log and "collection settings changed" not in log
    code, log = cli(*batch_args(data_dir / "data.jsonl", out, "logic.top_k=1", "data.visualize_batch=true"))
    assert code == EXIT_OK and "2 to redo from saved attention" in log, log
    summary = json.loads((folder(out) / "r0_bbox.json").read_text())
    assert summary["image_file"] == str(images / "toy_tall.png") and (folder(out) / "r0_top1.png").is_file()
    assert len(model_loads) == 1                                   # only the first run needed the model


def test_a_run_that_never_reaches_a_failed_row_keeps_its_failure_listed(cli, tmp_path):
    """failures.jsonl keeps the entry of a row this run did not settle: here the model cannot load,
    nothing runs (exit 2), and the earlier failure stays listed for evaluate and report."""
    rows = good_rows(1) + [{"id": "gone", "prompt": "the square .", "image_path": str(tmp_path / "no.png")}]
    data = rows_file(tmp_path, rows)
    assert cli(*batch_args(data, tmp_path / "out"))[0] == EXIT_ROWS_FAILED
    failures = folder(tmp_path / "out") / "failures.jsonl"
    code, _ = cli(*batch_args(data, tmp_path / "out", f"model.name={tmp_path / 'no-such-model'}"))
    assert code == EXIT_NOT_RUN
    assert [json.loads(line)["id"] for line in failures.read_text().splitlines()] == ["gone"]


def test_an_attention_file_not_named_id_pkl_is_refused(cli, tmp_path):
    odd = tmp_path / "foo.pt"
    odd.write_bytes(b"")
    code, out = cli("stage=visualize", *TOY, f"data.attention_file={odd}")
    assert code == EXIT_NOT_RUN and "expected an attention file named <id>.pkl" in out
