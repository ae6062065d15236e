"""Every bundle's ``configs/metadata.json`` passes MONAI's ``verify_metadata`` against the shared schema, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAME = "meta_schema_20240725.json"
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


def test_every_bundle_is_checked():
    assert {"fewshot_classification_3d", "fewshot_segmentation_3d"} <= set(BUNDLES)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_is_valid_against_the_shared_schema(bundle, data_dir):
    from monai.bundle import verify_metadata

    schema = Path(data_dir).resolve().parent / "monai" / SCHEMA_NAME
    if not schema.is_file():
        pytest.fail(f"schema {schema} missing (expected beside the data folder, in <data>/../monai/)")
    meta_file = ROOT / "bundles" / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # raises if invalid
    import jsonschema

    meta = json.loads(meta_file.read_text())
    broken = {k: v for k, v in meta.items() if k != "network_data_format"}
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate(broken, json.loads(schema.read_text()))
    assert all(isinstance(v, (int, float)) and 0 < v <= 1 for v in meta["eval_metrics"].values()), meta["eval_metrics"]
