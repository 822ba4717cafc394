"""The run report: the HTML builder on a synthetic run dir, the callback's guarantees, a real 6-step tiny run's
report.html, and both opened in headless Chromium (skipped with the reason when no browser is installed)."""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from ldm.callbacks.report import RunReport
from ldm.report import ReportBuilder
from tests.conftest import TINY_MODEL, main_py, run_dirs, write_train_yaml

STEPS = (10, 20, 30)
PROMPTS = ["a photo of a cat", "a red car"]
COLORS = {10: (255, 0, 0), 20: (0, 255, 0), 30: (0, 0, 255)}


def write_metrics(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def metric_rows() -> list[dict]:
    """Per step a train loss and LR row; at each of STEPS a validation row (val/loss rises after step 20) and a
    digits figure, as Lightning's CSV logger writes them (one metric family per row)."""
    rows = []
    for step in range(31):
        epoch = step // 10
        rows.append({"step": step, "lr-AdamW": 1e-4 * min(1, (step + 1) / 10)})
        rows.append({"step": step, "epoch": epoch, "train/loss_step": 1.0 / (1 + step) + 0.05})
        if step in STEPS:
            val = {10: 0.31, 20: 0.2875, 30: 0.2991}[step]
            rows.append({"step": step, "epoch": epoch, "val/loss": val, "val/loss_t0999": val * 2,
                         "val/loss_t0499": val, "val/loss_t0000": val / 100})
            rows.append({"step": step, "digits/accuracy": step / 40})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run dir with metrics, grids at three steps (one colour per step), a progress GIF and scores.json."""
    run = tmp_path_factory.mktemp("runs") / "2030-01-01T00-00-00_synthetic"
    for sub in ("images/val", "images/train", "progress", "checkpoints", "configs"):
        (run / sub).mkdir(parents=True)
    write_metrics(run / "metrics.csv", metric_rows())
    for step in STEPS:
        for key in ("inputs", "samples_cfg3"):
            name = f"{key}_gs-{step:06}_e-{step // 10:06}_b-000000.png"
            Image.new("RGB", (64, 32), COLORS[step]).save(run / "images" / "val" / name)
    Image.new("RGB", (2000, 1000), (9, 9, 9)).save(run / "images" / "train" / "samples_cfg3_gs-000010_e-000001_b-000003.png")
    frames = [Image.new("RGB", (32, 32), c) for c in COLORS.values()]
    frames[0].save(run / "progress" / "a-red-car.gif", save_all=True, append_images=frames[1:], duration=200)
    Image.new("RGB", (96, 32), (1, 2, 3)).save(run / "progress" / "a-red-car_strip.png")
    (run / "progress" / "prompts.json").write_text(json.dumps({"a-red-car": "a red car"}))
    for epoch in (1, 2, 3):
        (run / "checkpoints" / f"epoch={epoch:06}.ckpt").write_bytes(b"x" * 1024)
    (run / "checkpoints" / "scores.json").write_text(json.dumps({
        "checkpoints": [{"file": f"epoch={e:06}.ckpt", "step": s, "epoch": e, "val_loss": v}
                        for e, s, v in ((1, 10, 0.31), (2, 20, 0.2875), (3, 30, 0.2991))]
        + [{"file": "last.ckpt", "step": 30, "epoch": 3, "val_loss": None}],
        "best": "epoch=000002.ckpt", "overfitting": {"since_step": 30, "best": "epoch=000002.ckpt", "best_step": 20}}))
    (run / "command.txt").write_text("# 2030-01-01T00-00-00\npython main.py -t --base 'my config.yaml'\n")
    (run / "configs" / "2030-01-01T00-00-00-project.yaml").write_text("model:\n  base_learning_rate: 1.0e-04\n")
    (run / "configs" / "2030-01-01T00-00-00-lightning.yaml").write_text("lightning:\n  trainer: {max_steps: 30}\n")
    return run


def cell(html: str, metric: str, table: str = "latest") -> float:
    body = html.split(f"<table id={table}>", 1)[1].split("</table>", 1)[0]
    return float(re.search(rf'data-metric="{re.escape(metric)}">([^<]+)<', body).group(1))


def last_value(rows: list[dict], metric: str) -> float:
    return [row[metric] for row in rows if metric in row][-1]


# ---- the builder -------------------------------------------------------------------------------------------------
def test_latest_values_shown_are_those_of_metrics_csv(run):
    html = ReportBuilder(run).build()
    for metric in ("val/loss", "val/loss_t0999", "val/loss_t0000", "train/loss_step", "lr-AdamW"):
        assert math.isclose(cell(html, metric), last_value(metric_rows(), metric), rel_tol=1e-5), metric
    assert math.isclose(cell(html, "digits/accuracy", "demo-latest"), 0.75)


def test_page_has_every_section_and_no_network_reference(run):
    html = ReportBuilder(run).build(skipped={"train": ["broken.jpg"]})
    for ident in ("command", "curves", "checkpoints", "grids", "progress", "demos", "skipped"):
        assert f"<section id={ident}>" in html
    assert not re.search(r"https?://", html)
    assert "python main.py -t --base &#x27;my config.yaml&#x27;" in html and "max_steps: 30" in html
    assert html.count("<svg") == 4  # loss, per timestep, learning rate, digits
    assert "t = 999" in html and "t = 0<" in html  # one line per fixed timestep, from the val/loss_t<T> columns
    assert "validation loss not improving since step 30" in html and "broken.jpg" in html
    assert 'src="progress/a-red-car.gif"' in html and "a red car" in html and 'src="progress/a-red-car_strip.png"' in html


def test_checkpoint_table_marks_the_best_and_shows_its_scores(run):
    html = ReportBuilder(run).build()
    rows = re.findall(r'<tr( class=best)? data-file="([^"]+)">.*?class="num val-loss">([^<]*)<', html)
    assert [(file, loss) for _, file, loss in rows] == [
        ("epoch=000001.ckpt", "0.31"), ("epoch=000002.ckpt", "0.2875"), ("epoch=000003.ckpt", "0.2991"), ("last.ckpt", "")]
    assert [file for best, file, _ in rows if best] == ["epoch=000002.ckpt"]


def test_without_scores_json_checkpoints_get_their_epochs_val_loss(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "checkpoints" / "scores.json").unlink()
    html = ReportBuilder(copy).build()
    rows = re.findall(r'<tr( class=best)? data-file="([^"]+)">.*?class="num val-loss">([^<]*)<', html)
    # epoch 1 validated at step 10 (0.31), epoch 2 at step 20 (0.2875), epoch 3 at step 30 (0.2991)
    assert [(bool(best), file, loss) for best, file, loss in rows] == [
        (False, "epoch=000001.ckpt", "0.31"), (True, "epoch=000002.ckpt", "0.2875"), (False, "epoch=000003.ckpt", "0.2991")]


def test_grids_are_grouped_by_key_and_batch_with_every_step(run):
    html = ReportBuilder(run).build()
    data = json.loads(re.search(r"<script type=application/json id=grid-data>(.*?)</script>", html, re.S).group(1))
    assert data["val"]["steps"] == list(STEPS)
    assert sorted(data["val"]["groups"]) == ["inputs · batch 0", "samples_cfg3 · batch 0"]
    assert data["val"]["groups"]["inputs · batch 0"]["20"] == "images/val/inputs_gs-000020_e-000002_b-000000.png"
    assert "step 30 (epoch 3)" in html  # without JS the latest step is shown


def test_embedded_images_make_one_file_and_big_grids_are_downscaled(run):
    html = ReportBuilder(run, embed_images=True, max_px=256).build()
    assert 'src="images/' not in html and 'src="progress/' not in html and not re.search(r"https?://", html)
    data = json.loads(re.search(r"id=grid-data>(.*?)</script>", html, re.S).group(1))
    big = data["train"]["groups"]["samples_cfg3 · batch 3"]["10"]
    assert big.startswith("data:image/jpeg;base64,")
    import base64
    import io
    assert max(Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size) == 256


def test_an_empty_run_dir_still_gets_a_page(tmp_path):
    html = ReportBuilder(tmp_path).build()
    assert "no metrics.csv yet" in html and "no checkpoints yet" in html and "no images/ grids yet" in html


def test_a_rebuild_after_a_validation_takes_a_fraction_of_a_second(run, tmp_path):
    import time
    copy = shutil.copytree(run, tmp_path / "run")
    builder = ReportBuilder(copy)
    builder.build()  # the first build pays matplotlib's first-use cost
    rows = metric_rows() + [{"step": 31, "epoch": 3, "val/loss": 0.3, "val/loss_t0999": 0.6}]
    write_metrics(copy / "metrics.csv", rows)
    start = time.perf_counter()
    html = builder.build()
    assert time.perf_counter() - start < 1.0  # measured ~0.1 s on two busy cores
    assert cell(html, "val/loss") == 0.3


def test_python_m_ldm_report_rewrites_a_run_dirs_page(run, tmp_path):
    import subprocess
    import sys
    copy = shutil.copytree(run, tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "ldm.report", str(copy), "--embed"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    html = (copy / "report.html").read_text()
    assert result.stdout.strip() == str(copy / "report.html") and "data:image/gif;base64," in html


# ---- the callback ------------------------------------------------------------------------------------------------
def fake_trainer(**extra):
    return SimpleNamespace(**{"loggers": [], "datamodule": None, "sanity_checking": False, "global_step": 7, **extra})


def test_callback_writes_after_validation_but_not_in_the_sanity_check(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    report = RunReport(str(copy))
    report.on_validation_end(fake_trainer(sanity_checking=True), None)
    assert not (copy / "report.html").exists()
    report.on_validation_end(fake_trainer(datamodule=SimpleNamespace(skipped_files={})), None)
    html = (copy / "report.html").read_text()
    assert "after the validation at step 7" in html and "every image could be read" in html
    assert not list(copy.glob(".*.part"))  # written through atomic_path, nothing left behind


def test_a_failing_report_is_one_warning_not_a_crash(tmp_path, caplog, monkeypatch):
    report = RunReport(str(tmp_path))
    monkeypatch.setattr(report.builder, "build", lambda **kw: 1 / 0)
    with caplog.at_level(logging.WARNING):
        report.on_fit_end(fake_trainer(), None)
        report.on_exception(fake_trainer(), None, KeyboardInterrupt())
    assert [r.getMessage().count("\n") for r in caplog.records] == [0, 0]
    assert "ZeroDivisionError" in caplog.records[0].getMessage() and not (tmp_path / "report.html").exists()


def test_a_checkpoint_saved_after_the_write_is_shown_at_the_next_step(run, tmp_path):
    """Lightning saves checkpoints after the other callbacks' hooks: the page follows at the next training step."""
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "checkpoints" / "scores.json").unlink()
    report = RunReport(str(copy))
    report.on_train_batch_start(fake_trainer(), None, None, 0)
    report.on_validation_end(fake_trainer(), None)
    report.on_train_batch_start(fake_trainer(), None, None, 1)  # nothing new: no rewrite
    assert "after the validation at step 7" in (copy / "report.html").read_text()
    (copy / "checkpoints" / "epoch=000004.ckpt").write_bytes(b"x")
    report.on_train_batch_start(fake_trainer(global_step=8), None, None, 2)
    html = (copy / "report.html").read_text()
    assert "after the checkpoint before step 8" in html and 'data-file="epoch=000004.ckpt"' in html


def test_disabled_writes_nothing(tmp_path):
    RunReport(str(tmp_path), disabled=True).on_fit_end(fake_trainer(), None)
    assert not (tmp_path / "report.html").exists()


# ---- a real tiny run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_folder) -> Path:
    """6 steps of the tiny model (3 epochs of 2 batches), a validation and sample grids at the end of each epoch,
    progress frames of two prompts every 3 steps."""
    base = tmp_path_factory.mktemp("tiny")
    progress = {"params": {"every_n_steps": 3, "prompts": PROMPTS, "steps": 2}}
    config_path = write_train_yaml(base / "train.yaml", image_folder, repeats=1, image_every=2,
                                   trainer={"max_steps": 6}, callbacks={"progress": progress})
    config = yaml.safe_load(config_path.read_text())
    train = config["data"]["params"]["train"]
    config["data"]["params"]["validation"] = {"target": train["target"], "params": train["params"]}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = main_py("-t", "--base", TINY_MODEL, config_path, "-l", base / "logs")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run,) = run_dirs(base / "logs")
    return run


def test_a_tiny_run_writes_its_report(tiny_run):
    html = (tiny_run / "report.html").read_text()
    for ident in ("command", "curves", "checkpoints", "grids", "skipped"):
        assert f"<section id={ident}>" in html
    assert "training ended at step 6" in html and "every image could be read" in html
    command = f"main.py -t --base {TINY_MODEL} "
    assert command in (tiny_run / "command.txt").read_text() and command in html and "-project.yaml</summary>" in html
    with open(tiny_run / "metrics.csv") as f:
        vals = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]
    assert len(vals) == 3 and math.isclose(cell(html, "val/loss"), vals[-1], rel_tol=1e-5)
    assert all(f"<figcaption>{prompt}</figcaption>" in html for prompt in PROMPTS)
    assert not re.search(r'(src|href)="https?://', html)


# ---- in a browser ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system (Debian's chromium + chromium-driver; `.ci/run` installs them)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access-from-files"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as err:  # an installed browser that cannot start here (sandbox, missing libraries)
        pytest.skip(f"{binary} did not start: {str(err).splitlines()[0]}")
    yield driver
    driver.quit()


def open_report(browser, path: Path):
    browser.get(path.resolve().as_uri())
    return browser


def slide_to_first(browser, split: str) -> None:
    """Move a split's slider with the keyboard, as a user would: Home goes to the first step."""
    from selenium.webdriver.common.keys import Keys

    browser.find_element("css selector", f'.grids[data-split="{split}"] .slider').send_keys(Keys.HOME)


def image_state(browser, split: str) -> tuple[str, list[str], list[int]]:
    box = browser.find_element("css selector", f'.grids[data-split="{split}"]')
    images = box.find_elements("css selector", "figure img")
    return (box.find_element("css selector", ".stepshown").text, [i.get_attribute("src") for i in images],
            [browser.execute_script("return arguments[0].naturalWidth", i) for i in images])


def test_browser_slider_moves_through_the_synthetic_runs_steps(browser, run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    path = copy / "report.html"
    path.write_text(ReportBuilder(copy).build())
    open_report(browser, path)
    step, srcs, widths = image_state(browser, "val")
    assert step == "step 30 (epoch 3)" and all(s.endswith("gs-000030_e-000003_b-000000.png") for s in srcs)
    assert widths == [64, 64]  # the relative paths resolve from disk
    slide_to_first(browser, "val")
    step, srcs, widths = image_state(browser, "val")
    assert step == "step 10 (epoch 1)" and all(s.endswith("gs-000010_e-000001_b-000000.png") for s in srcs)
    assert widths == [64, 64]
    gif = browser.find_element("css selector", "#progress img")
    assert browser.execute_script("return arguments[0].naturalWidth", gif) == 32
    shown = float(browser.find_element("css selector", '#latest td[data-metric="val/loss"]').text)
    assert math.isclose(shown, last_value(metric_rows(), "val/loss"), rel_tol=1e-5)


def test_browser_opens_a_tiny_runs_report(browser, tiny_run):
    open_report(browser, tiny_run / "report.html")
    step, srcs, widths = image_state(browser, "val")
    assert step == "step 6 (epoch 2)" and all(w > 0 for w in widths)
    slide_to_first(browser, "val")
    first_step, first_srcs, widths = image_state(browser, "val")
    assert first_step == "step 2 (epoch 0)" and first_srcs != srcs and all(w > 0 for w in widths)
    assert all("gs-000002_" in s for s in first_srcs)
    with open(tiny_run / "metrics.csv") as f:
        vals = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]
    table = [c.text for c in browser.find_elements("css selector", "#checkpoint-table td.val-loss") if c.text]
    assert table and all(any(math.isclose(float(t), v, rel_tol=1e-5) for v in vals) for t in table)
    assert any(math.isclose(float(t), vals[-1], rel_tol=1e-5) for t in table)  # the last validation's checkpoint
    assert len(browser.find_elements("css selector", "#curves svg")) >= 2  # loss and learning rate
    gifs = browser.find_elements("css selector", "#progress img")
    assert len(gifs) == 4 and all(browser.execute_script("return arguments[0].naturalWidth", g) > 0 for g in gifs)
