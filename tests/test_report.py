"""engine.report and `perturbot report`: every section and image of the HTML, the plot helpers'
math (k-means, transport costs, weighted densities), and a headless-Chromium screenshot that is
not blank."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="reports need the 'report' extra (matplotlib), in the test extras")

from engine.cli import main  # noqa: E402
from engine.data import MapKey  # noqa: E402
from engine.data import DataError  # noqa: E402
from engine.report import MapCells, _density, chosen_features, effect_table, kmeans, transport_costs  # noqa: E402

SECTIONS = ["Metrics (test cells", "Transport cost per map and cell cluster", "Training curves", "Per-map detail"]


@pytest.fixture(scope="module")
def report(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", "--run", str(demo_run), "--out", str(out), "--detail", "2"]) == 0
    return out


def test_report_has_every_section_and_its_images(report: Path, demo_run: Path) -> None:
    page = report.read_text()
    for heading in SECTIONS:
        assert heading in page, heading
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)
    alts = [alt for alt, _ in images]
    # costs + curves, then marginals and embedding for the 2 largest and 2 smallest of the 8 maps
    assert alts[:2] == ["transport costs", "training curves"] and len(alts) == 2 + 2 * 4
    for _, data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert len(list((demo_run / "plots").glob("*.png"))) == len(images)
    assert "4 other maps" in page and "solver <b>cellot</b>" in page


def test_effect_table_orders_by_identity_distance(demo_run: Path) -> None:
    from engine.api import FitResult

    table = effect_table(FitResult.load(demo_run))
    assert len(table) == 8 and list(table["identity"]) == sorted(table["identity"], reverse=True)
    np.testing.assert_allclose(table["model/identity"], table["model"] / table["identity"])
    assert set(table["status"]) == {"trained"}


def test_bad_report_options_are_one_line_errors(demo_run: Path, tmp_path: Path) -> None:
    assert main(["report", "--run", str(demo_run), "--detail", "0", "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", "--run", str(demo_run), "--cluster-key", "nope", "--out", str(tmp_path / "r.html")]) == 2


def test_features_by_count_name_or_unique_prefix() -> None:
    names = ["pS6(Yb172)Dd", "pErk(Er168)Dd", "CD3", "CD33"]
    assert chosen_features(names, 2, np.array([3, 1, 0, 2])) == [3, 1]
    assert chosen_features(names, ["pS6", "pErk(Er168)Dd", "CD3"], np.arange(4)) == [0, 1, 2]  # exact wins
    with pytest.raises(DataError, match="'CD' names 2 features"):
        chosen_features(names, ["CD"], np.arange(4))
    with pytest.raises(DataError, match="'pp38' names 0 features"):
        chosen_features(names, ["pp38"], np.arange(4))


def test_kmeans_finds_separated_blobs_and_costs_average_per_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
    labels = kmeans(x, 3)
    truth = np.repeat([0, 1, 2], 50)
    assert all(len(set(labels[truth == t])) == 1 for t in range(3)) and len(set(labels)) == 3
    control = np.zeros((4, 2))
    predicted = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    cells = MapCells(MapKey(None, "drug"), control, control, predicted, None, np.arange(2))
    costs = transport_costs([cells], [np.array(["a", "a", "b", "c"])])
    np.testing.assert_allclose(costs.loc["drug"].to_numpy(), [(1 + 4) / 2, 9, 0])


def test_weighted_density_integrates_to_one_and_follows_the_weights() -> None:
    values = np.array([0.0, 0.0, 5.0, 5.0])
    grid = np.linspace(-15, 20, 7001)
    for weights in (None, np.array([1.0, 1.0, 8.0, 8.0])):
        density = _density(values, grid, weights)
        assert abs(np.trapezoid(density, grid) - 1.0) < 1e-3
    heavy = _density(values, grid, np.array([1.0, 1.0, 8.0, 8.0]))
    assert heavy[np.searchsorted(grid, 5.0)] > 4 * heavy[np.searchsorted(grid, 0.0)]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it where apt-get works)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    import matplotlib.image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
         report.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels.std() > 0.05  # text, tables and plots, not a blank page
    assert (pixels.mean(axis=2) < 0.5).mean() > 0.005  # some dark ink
