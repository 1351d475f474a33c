"""Defaults derived from other keys follow the explicit values; only two explicit values can conflict."""
from __future__ import annotations

import pytest

from lora_trainer.data.buckets import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, bucket_range, make_buckets
from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import ConfigError
from lora_trainer.preflight.run import run_preflight
from lora_trainer.testing.tiny import make_dataset
from tests.test_preflight import standin_model


@pytest.mark.parametrize("lo,hi,res,want", [
    (None, None, 1024, (DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)),
    (None, None, 64, (64, DEFAULT_MAX_SIZE)),      # below the default minimum: the minimum follows
    (None, None, 4096, (DEFAULT_MIN_SIZE, 4096)),  # above the default maximum: the maximum follows
    (512, None, 1024, (512, DEFAULT_MAX_SIZE)),
    (4096, None, 1024, (4096, 4096)),              # an explicit minimum above the default maximum lifts it
    (None, 128, 1024, (128, 128)),                 # and an explicit maximum below the default minimum lowers it
    (320, 640, 1024, (320, 640)),                  # explicit values are never changed
])
def test_bucket_range_defaults_follow_explicit_values(lo, hi, res, want):
    assert bucket_range(lo, hi, res) == want


def _raw(tmp_path, **kw):
    return {"dataset_path": str(tmp_path / "data"), "base_model": str(tmp_path / "model"),
            "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], **kw}


def test_sdxl_at_64_px_with_default_buckets_validates(tmp_path):
    make_dataset(tmp_path / "data", n=4, sizes=[(96, 64), (64, 96)])
    model = standin_model(tmp_path / "model", family="sdxl")
    cfg, _ = parse_config(_raw(tmp_path, base_model=str(model), resolution=64, model_type="sdxl"), base_dir=tmp_path)
    result = run_preflight(cfg)
    assert result.ok, result.errors
    d = result.summary["dataset"]
    assert d["bucketing"] is True and d["resolution"] == 64
    assert d["bucket_plan"]["num_buckets"] == len(make_buckets(64, 64, DEFAULT_MAX_SIZE))


def test_explicit_values_that_conflict_are_still_an_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse_config(_raw(tmp_path, resolution=64, enable_bucketing=True, min_bucket_resolution=256), base_dir=tmp_path)
    assert [p["path"] for p in exc.value.problems] == ["resolution"]
    with pytest.raises(ConfigError) as exc:
        parse_config(_raw(tmp_path, min_bucket_resolution=1024, max_bucket_resolution=512), base_dir=tmp_path)
    assert [p["path"] for p in exc.value.problems] == ["min_bucket_resolution"]
