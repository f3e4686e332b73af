"""Dissection: class selectivity (Morcos et al. 2018) and network-dissection IoU (Bau et al.
2017), checked against their definitions on hand-made activations, and ticketlab dissect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from ticketlab.dissect import (
    class_selectivity,
    derived_concepts,
    dissect,
    folder_concepts,
    layer_summary,
    unit_iou,
    unit_layers,
    unit_thresholds,
)
from ticketlab.runs import read_csv

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_class_selectivity_index():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    act = torch.tensor(
        [
            # only class 0 | flat | class means 3, 1, 1 | silent
            [1.0, 2.0, 2.0, 0.0],
            [1.0, 2.0, 4.0, 0.0],
            [0.0, 2.0, 1.0, 0.0],
            [0.0, 2.0, 1.0, 0.0],
            [0.0, 2.0, 0.5, 0.0],
            [0.0, 2.0, 1.5, 0.0],
        ]
    )
    si = class_selectivity(act, labels, 3)
    # (mu_max - mean of the other classes' means) / (mu_max + that mean)
    assert si.tolist() == pytest.approx([1.0, 0.0, (3 - 1) / (3 + 1), 0.0])


def test_threshold_is_the_top_quantile_over_images_and_positions():
    maps = torch.arange(200, dtype=torch.float32).view(2, 1, 10, 10)  # values 0..199
    t = unit_thresholds(maps, quantile=0.05)
    assert float(t[0]) == 190.0  # the smallest of the top 10 of the 200 values (5%)
    assert int((maps >= t).sum()) == 10


def test_iou_of_an_upsampled_map():
    # a 2x2 map firing at its top-left cell, upsampled bilinearly to 4x4: the pixel values
    # are the products of the 1-D weights [1, .75, .25, 0], so 4 pixels (the top-left
    # quadrant) exceed 0.5 and 9 exceed 0
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    quadrant = torch.zeros(1, 4, 4, dtype=torch.bool)
    quadrant[0, :2, :2] = True
    upper = torch.zeros(1, 4, 4, dtype=torch.bool)
    upper[0, :2] = True
    masks = {"quadrant": quadrant, "upper": upper}
    iou = unit_iou(maps, masks, torch.tensor([0.5]))
    assert iou[0].tolist() == pytest.approx([1.0, 4 / 8])
    iou0 = unit_iou(maps, masks, torch.tensor([0.0]))  # the 9 pixels where it fires
    assert iou0[0].tolist() == pytest.approx([4 / 9, 6 / 11])
    # summed over the data set, not averaged per image: a second image with the unit off
    # and the concept present adds to the union only
    maps2 = torch.cat([maps, torch.zeros(1, 1, 2, 2)])
    two = {k: torch.cat([v, v]) for k, v in masks.items()}
    assert unit_iou(maps2, two, torch.tensor([0.5]))[0].tolist() == pytest.approx([4 / 8, 4 / 16])


def test_derived_concepts():
    x = torch.zeros(1, 1, 4, 6)
    x[0, 0, 1:3, 1:4] = 0.9  # a bright object of 6 pixels
    mean, std = torch.tensor([0.1]), torch.tensor([0.5])
    c = derived_concepts((x - 0.1) / 0.5, mean, std, object_threshold=0.2)
    assert int(c["object"].sum()) == 6 and int(c["background"].sum()) == 18
    assert c["upper"][0, :2].all() and not c["upper"][0, 2:].any()
    assert c["left"][0, :, :3].all() and not c["left"][0, :, 3:].any()
    assert int(c["lower"].sum()) == 12 and int(c["right"].sum()) == 12


class Tiny(nn.Module):
    """A conv unit that copies the image (and one that inverts it), then a linear unit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.hidden = nn.Linear(2 * 16, 3)
        self.fc = nn.Linear(3, 2)
        self.output_layer_name = "fc"
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.fc(self.hidden(self.conv(x).relu().flatten(1)).relu())


def test_dissect_finds_the_unit_that_sees_the_object():
    torch.manual_seed(0)
    x = torch.zeros(40, 1, 4, 4)
    y = torch.arange(40) % 2
    x[:, 0, 1, 1] = 1.0 + y  # one bright object pixel, brighter for class 1
    concepts = derived_concepts(x, torch.zeros(1), torch.ones(1), object_threshold=0.5)
    from ticketlab.dissect import ConceptSet

    model = Tiny()
    assert [name for name, _ in unit_layers(model)] == ["conv", "hidden"]
    rows = dissect(model, x, y, 2, ConceptSet(x, concepts), quantile=0.03, iou_threshold=0.5)
    conv = [r for r in rows if r["layer"] == "conv"]
    # unit 0 is the image: its top 3% (of 640 values) lie on the class-1 object pixels,
    # half of the object's pixels over the data set
    assert conv[0]["top_concept"] == "object" and conv[0]["iou"] == pytest.approx(0.5)
    assert conv[0]["concept_detector"] and conv[0]["interpretable"]
    # its class means 1/16 and 2/16: selectivity (2 - 1) / (2 + 1)
    assert conv[0]["selectivity"] == pytest.approx(1 / 3) and conv[0]["top_class"] == 1
    assert not conv[0]["class_detector"]  # below the default threshold 0.5
    assert conv[1]["top_concept"] != "object"
    assert all(r["iou"] == "" for r in rows if r["layer"] == "hidden")
    summary = {s["layer"]: s for s in layer_summary(rows)}
    assert summary["conv"]["units"] == 2 and summary["hidden"]["units"] == 3
    assert summary["conv"]["interpretable"] == sum(r["interpretable"] for r in conv)
    assert "object" in summary["conv"]["labels"].split()


def test_concept_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks" / "dot").mkdir(parents=True)
    for i in range(3):
        np.save(tmp_path / "images" / f"im{i}.npy", np.full((4, 4), 0.5, dtype=np.float32))
    m = np.zeros((4, 4), dtype=np.uint8)
    m[0, 0] = 1
    np.save(tmp_path / "masks" / "dot" / "im1.npy", m)
    cs = folder_concepts(tmp_path, (1, 4, 4), torch.tensor([0.5]), torch.tensor([0.25]))
    assert cs.images.shape == (3, 1, 4, 4) and float(cs.images.abs().max()) == 0.0
    assert cs.masks["dot"].sum(dim=(1, 2)).tolist() == [0, 1, 0]
    np.save(tmp_path / "images" / "bad.npy", np.zeros((5, 5), dtype=np.float32))
    from ticketlab.errors import UsageError

    with pytest.raises(UsageError, match="shape"):
        folder_concepts(tmp_path, (1, 4, 4), torch.tensor([0.5]), torch.tensor([0.25]))


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed")
def test_dissect_command_and_report(tmp_path, capsys):
    flags = ["--model", "conv2", "--width", "0.125", "--steps", "30it", "--eval-every", "30it"]
    rc, _, err = run_cli(capsys, "lottery", *flags, "--levels", "1", "--quiet",
                         "--runs-dir", tmp_path)  # fmt: skip
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    rc, out, err = run_cli(capsys, "dissect", run, "--examples", "200", "--quantile", "0.05")
    assert rc == 0, err
    layers = read_csv(run / "dissect.csv")
    units = read_csv(run / "dissect_units.csv")
    assert {(r["level"], r["layer"]) for r in layers} == {
        (lv, name) for lv in ("0", "1") for name in ("features.0", "features.2", "hidden.0",
                                                      "hidden.1")
    }  # fmt: skip
    for r in layers:
        mine = [u for u in units if (u["level"], u["layer"]) == (r["level"], r["layer"])]
        assert int(r["units"]) == len(mine)
        assert int(r["class_detectors"]) == sum(float(u["selectivity"]) >= 0.5 for u in mine)
        conv = r["layer"].startswith("features")
        assert int(r["concept_detectors"]) == (
            sum(float(u["iou"]) >= 0.04 for u in mine) if conv else 0
        )
    rc, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "rep", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "rep" / f"dissect-{run.name}.png").exists()
    assert "Interpretable units" in (tmp_path / "rep" / "report.html").read_text()


def test_dissect_bad_input(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "dissect", tmp_path)
    assert rc == 2 and "run directory" in err
