"""The report as a person meets it: rendered by a real browser (headless Chromium), with no network, every image
loaded, and the figures drawn as documented."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import run_cli, write_config
from lora_trainer.outputs import plots

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
# No network at all: every host name fails to resolve, so a reference to anything remote could not load.
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("report")
    data = make_dataset(tmp / "data", n=4, trigger="ohwx")
    cfg = write_config(tmp / "c.json", dataset_path=str(data), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp / "out"), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                       max_train_steps=6, log_every_n_steps=1, validation_steps=3, validation_inference_steps=2,
                       validation_prompts=["ohwx, a red cube", "ohwx on a beach"], lr_scheduler="cosine",
                       lr_warmup_steps=2, keep_tokens=2)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "out", res


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: .ci/run installs Debian's chromium package")
def test_report_renders_offline_in_a_real_browser(finished_run, tmp_path):
    out, res = finished_run
    page = (out / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *OFFLINE, "--virtual-time-budget=10000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    n_img = len(re.findall(r"<img ", (out / "report.html").read_text()))
    assert n_img == 2  # the loss curve and the samples over steps
    assert f'data-images="{n_img}"' in body and 'data-images-broken="0"' in body, body
    assert not re.search(r'(src|href)="(https?:)?//', dom), "the report references the network"
    text = re.sub(r"<[^>]+>", " ", dom)
    for needed in ("completed", "step 6 of 6", "Loss", "Samples", "lora.safetensors", "pytorch_lora_weights.safetensors",
                   "README.md", "How to load", "LoraLoader", "&lt;lora:lora:1&gt; ohwx", "the CPU (", "fp32"):
        assert needed in text, needed
    assert "<th>keep_tokens</th><td>2</td>" in dom  # a count, not a secret: shown as is
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *OFFLINE, "--window-size=1100,2400", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        colours = len(set(im.convert("RGB").resize((110, 240)).getdata()))
    assert colours > 200, "the screenshot is (nearly) blank"


def test_loss_curve_shows_lr_gaps_and_a_log_axis_for_decades(tmp_path):
    history = [(s, 10.0 * math.exp(-s / 3), 1e-4 * s / 30) for s in range(1, 31)]
    history[9] = (10, None, history[9][2])  # a skipped, non-finite step
    fig = plots.loss_curve(history, tmp_path / "loss.png")
    ax, ax2 = fig.axes
    assert ax.get_yscale() == "log"  # 10 .. 0.0005: decades
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "training loss"
    assert ax2.get_ylabel() == "learning rate" and list(ax2.lines[0].get_ydata()) == [h[2] for h in history]
    raw, smoothed = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
    assert math.isnan(raw[9]) and math.isnan(smoothed[9]) and not math.isnan(raw[10])  # a gap, not a bridge
    assert list(ax.lines[2].get_xdata()) == [10]  # the skipped step is marked
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "learning rate"
    flat = plots.loss_curve([(s, 1.0 + 0.01 * s, 1e-4) for s in range(1, 5)], tmp_path / "flat.png")
    assert flat.axes[0].get_yscale() == "linear"
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (900, 420)


def test_samples_over_steps_is_prompt_by_step(finished_run):
    out, _ = finished_run
    with Image.open(out / plots.SAMPLES_PNG) as im:
        assert im.size[0] > im.size[1]  # 3 columns (base model, step 3, step 6) by 2 rows
    assert sorted(p.parent.name for p in (out / "samples").glob("step-*/p01_00_*.png")) == \
        ["step-000000", "step-000003", "step-000006"]


def test_model_card_is_what_the_hub_reads(finished_run):
    from huggingface_hub import ModelCard

    out, res = finished_run
    assert res.last("completed")["outputs"]["model_card"] == str(out / "README.md")
    card = ModelCard.load(out / "README.md")  # the Hub's own parser of the YAML front matter
    assert card.data.instance_prompt == "ohwx" and card.data.license == "other"
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id; the text names it instead
    urls = [w["output"]["url"] for w in card.data.widget]
    assert urls == ["samples/step-000006/p00_00_seed42.png", "samples/step-000006/p01_00_seed1042.png"]
    assert all((out / u).is_file() for u in urls)
    assert [w["text"] for w in card.data.widget] == ["ohwx, a red cube", "ohwx on a beach"]
    for needed in ("load_lora_weights", "models/loras/", "<lora:lora:1> ohwx", "## License"):
        assert needed in card.text, needed
