"""``hf-ggda view``: the viewer's tables on every kind of run folder, and the app in Chromium."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from hf_ggda.cli import main
from hf_ggda.errors import RunFolderError
from hf_ggda.pipeline import read_run
from hf_ggda.scores import GroupScores
from hf_ggda.testing import tiny_lora, tiny_model, tiny_tokenizer, toy_dataset
from hf_ggda.viewer import open_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Folders written by group, attribute, self-influence, sources, prune and card."""
    d = tmp_path_factory.mktemp("runs")
    tok = tiny_tokenizer("bert")
    tiny_model("bert", len(tok)).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    tiny_lora("bert", len(tok), modules_to_save=("classifier",)).save_pretrained(d / "adapter")
    toy_dataset(30).add_column("source", [f"s{i % 3}" for i in range(30)]) \
        .save_to_disk(str(d / "train"))
    toy_dataset(6, seed=5).to_json(str(d / "queries.jsonl"))
    model = ["--model", str(d / "base"), "--adapter", str(d / "adapter"), "--max-length", "16"]
    assert main(["group", "random", "--data", str(d / "train"), "--output", str(d / "grouped"),
                 "--num-groups", "5", "--seed", "1"]) == 0
    assert main(["attribute", "influence", *model, "--train", str(d / "grouped"), "--queries",
                 str(d / "queries.jsonl"), "--output", str(d / "attr"), "--drill-down", "2"]) == 0
    assert main(["self-influence", "tracin", *model, "--train", str(d / "grouped"),
                 "--output", str(d / "self"), "--drill-down", "1"]) == 0
    assert main(["sources", "influence", *model, "--train", str(d / "train"), "--eval",
                 f"dev={d / 'queries.jsonl'}", "--source-column", "source", "--output",
                 str(d / "src"), "--bootstrap", "20"]) == 0
    assert main(["prune", "--run", str(d / "attr"), "--fraction", "0.2", "--output",
                 str(d / "pruned")]) == 0
    assert main(["card", "--run", str(d / "attr"), "--output", str(d / "card")]) == 0
    return d


def test_every_cli_run_opens(runs: Path) -> None:
    modes = {name: open_run(runs / name).mode for name in
             ("grouped", "attr", "self", "src", "pruned")}
    assert modes == {"grouped": "columns", "attr": "query", "self": "self", "src": "query",
                     "pruned": "columns"}
    for name in modes:
        assert len(open_run(runs / name).group_table()) >= 2
    with pytest.raises(RunFolderError, match="No training rows"):
        open_run(runs / "card")
    with pytest.raises(RunFolderError, match="does not exist"):
        open_run(runs / "nope")
    assert main(["view", str(runs / "card")]) == 2  # one error line, no server started


def test_every_cli_run_is_written_through_the_pipeline(runs: Path) -> None:
    kinds = {name: read_run(runs / name).kind for name in ("attr", "self", "src", "pruned",
                                                           "card")}
    assert kinds == {"attr": "attribute", "self": "self-influence", "src": "sources",
                     "pruned": "prune", "card": "card"}
    assert set(read_run(runs / "attr").datasets) == {"train", "queries"}


def test_group_table_is_the_result_ranked(runs: Path) -> None:
    view = open_run(runs / "attr")
    scores = GroupScores.from_pretrained(runs / "attr" / "scores")
    table = view.group_table("score")
    want = dict(zip(map(str, scores.group_ids), scores.aggregated().tolist()))
    assert dict(zip(table["group"], table["score"])) == pytest.approx(want)
    assert table["score"].is_monotonic_decreasing and table["rows"].sum() == 30
    by_self = open_run(runs / "self").group_table("self_influence")
    assert by_self["self_influence"].is_monotonic_decreasing


def test_filters_rows_and_queries(runs: Path) -> None:
    view = open_run(runs / "attr")
    label = view.choices("label")[1]
    table = view.group_table("score", label=label)
    assert table["rows"].sum() == sum(str(v) == label for v in view.rows["label"])
    rows = view.group_rows(table["group"][0], label=label)
    assert len(rows) == table["rows"][0] and set(rows["label"].astype(str)) == {label}
    queries = view.query_choices()
    assert len(queries) == 6 and queries[2].startswith("2: ")
    top = view.query_groups(queries[2], k=2)
    best = view.result.top_k(2, k=2)
    assert list(top["group"][:2]) == [str(g) for g, _ in best]
    assert torch.allclose(torch.tensor(list(top["score"][:2])), torch.tensor([s for _, s in best]))
    drilled = view.query_rows(2)
    assert len(drilled) > 0 and drilled["score"].is_monotonic_decreasing
    with pytest.raises(RunFolderError, match="no query axis"):
        open_run(runs / "self").query_groups(0)
    with pytest.raises(IndexError):
        view.query_groups(6)


def test_export_writes_the_chosen_rows(runs: Path, tmp_path: Path) -> None:
    view = open_run(runs / "attr")
    groups = list(view.group_table()["group"][:2])
    path, n = view.export(groups, tmp_path / "picked")
    picked = load_from_disk(str(path))
    assert len(picked) == n == sum(str(g) in groups for g in view.rows["group_id"])
    assert {str(g) for g in picked["group_id"]} == set(groups)
    with pytest.raises(RunFolderError, match="outside the run"):
        view.export(groups, runs / "attr" / "picked")
    with pytest.raises(RunFolderError, match="at least one group"):
        view.export([], tmp_path / "none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _browser():
    """A headless Chromium driven by Selenium, or a skip saying what is missing."""
    pytest.importorskip("gradio", reason="the viewer needs gradio (pip install '.[viewer]')")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium ('.[viewer]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no Chromium / ChromeDriver installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,2000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


def _pick(driver, elem_id: str, text: str) -> None:
    """Choose ``text`` in the Gradio dropdown ``elem_id`` by typing it and pressing Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_viewer_in_chromium(runs: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    from hf_ggda.viewer import serve

    port = _free_port()
    app = serve(runs / "attr", port=port, block=False)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        view = open_run(runs / "attr")
        best = view.group_table()["group"][0]
        wait.until(lambda d: "Groups" in d.find_element(By.ID, "groups").text)
        first = view.query_groups(0)["group"].tolist()
        later = view.query_groups(3)["group"].tolist()
        cells = lambda d: d.find_element(By.ID, "query_groups").text  # noqa: E731
        wait.until(lambda d: "helpful" in cells(d))
        before = cells(driver)
        _pick(driver, "query", view.query_choices()[3])
        if first != later:
            wait.until(lambda d: cells(d) != before)
        _pick(driver, "chosen", str(best))
        target = driver.find_element(By.CSS_SELECTOR, "#target textarea, #target input")
        target.send_keys(str(tmp_path / "exported"))
        driver.find_element(By.ID, "export").click()
        wait.until(lambda d: "Exported" in d.find_element(By.ID, "status").text)
        exported = load_from_disk(str(tmp_path / "exported"))
        assert {str(g) for g in exported["group_id"]} == {str(best)}
        shot = os.environ.get("HF_GGDA_VIEWER_SCREENSHOT")
        if shot:  # README screenshot: HF_GGDA_VIEWER_SCREENSHOT=docs/viewer.png pytest -k chromium
            driver.save_screenshot(shot)
    finally:
        driver.quit()
        app.close()
