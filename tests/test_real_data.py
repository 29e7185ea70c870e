"""Real data (slow; `pytest -m slow`): trained maps beat the identity baseline on held-out cells.

BCR-XL CyTOF, one map per donor (8 maps, arcsinh already applied), and Kang 2018 IFN-beta PBMCs,
one map per cell type in a 50-d PCA latent with metrics decoded on each map's top-50 marker genes.
"""
from __future__ import annotations

import pytest

from engine.api import fit
from tests.conftest import shared_file

pytestmark = pytest.mark.slow


def _model_vs_identity(result) -> tuple:
    final = result.metrics(metric="mmd")
    table = final[final["split"].isin(["test", "test_identity"])].pivot_table(
        index="perturbation", columns="split", values="value")
    return table["test"], table["test_identity"]


def test_bcrxl_every_donor_beats_identity(ray_session, tmp_path):
    path = shared_file("catalyst_bodenmiller_bcrxl/bcrxl_16samples.h5ad")
    result = fit(path, condition_key="condition", control="Ref", split_by="patient_id", steps=1000,
                 workers=2, out=tmp_path / "bcrxl")
    model, identity = _model_vs_identity(result)
    assert len(model) == 8
    assert (model < identity).all(), (model / identity).to_dict()


def test_kang_every_cell_type_beats_identity_in_pca_latent(ray_session, tmp_path):
    path = shared_file("scgen_kang_valid_2018/valid.h5ad")
    result = fit(path, condition_key="condition", control="control", split_by="cell_type", embed="pca:50",
                 steps=1000, workers=2, out=tmp_path / "kang")
    model, identity = _model_vs_identity(result)
    assert len(model) == 7
    assert (model < identity).all(), (model / identity).to_dict()
