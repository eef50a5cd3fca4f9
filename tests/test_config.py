"""Configuration: one source of truth, documented, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensflow_core.settings import SETTINGS, Config, settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_generated_one():
    assert settings_table() in (ROOT / "README.md").read_text()


# The variables the public contract (CONTRACT.md, Configuration) names: fixed for users.
CONTRACT_VARIABLES = {
    f"LENSFLOW_{name}"
    for name in (
        "KAFKA_BOOTSTRAP S3_ENDPOINT S3_ACCESS_KEY S3_SECRET_KEY S3_REGION IMAGE_BUCKETS "
        "MODEL_BUCKET MODEL_NAME TRAIN_BUCKET TOPIC_IMAGES TOPIC_PREDICTIONS TOPIC_DLQ "
        "POINTER_TTL_S MAX_IMAGE_BYTES MAX_IMAGE_PIXELS"
    ).split()
}


def test_contract_variables_all_exist():
    names = {s.name for s in SETTINGS}
    assert CONTRACT_VARIABLES <= names, CONTRACT_VARIABLES - names
    secrets = {s.name for s in SETTINGS if s.secret}
    assert secrets == {
        "LENSFLOW_S3_ACCESS_KEY",
        "LENSFLOW_S3_SECRET_KEY",
        "LENSFLOW_DASHBOARD_TOKEN",
        "LENSFLOW_KAFKA_SASL_PASSWORD",
    }


def test_defaults_and_overrides():
    config = Config.from_env({})
    assert config.image_buckets == ("drone-images",)
    assert config.train_bucket == "lensflow-train"  # its own: lensflow's writes are no images
    assert config.buckets == ["drone-images", "lensflow-train", "lensflow-models"]
    assert config.topics == ("images", "predictions", "images-dlq")  # the contract's defaults
    assert (
        config.kafkasource_ce_source
        == "/apis/v1/namespaces/default/kafkasources/lensflow-images#images"
    )
    config = Config.from_env({"LENSFLOW_IMAGE_BUCKETS": " a, b ,", "LENSFLOW_S3_ENDPOINT": ""})
    assert config.image_buckets == ("a", "b") and config.s3_endpoint is None


@pytest.mark.parametrize(
    "env",
    [
        {"LENSFLOW_IMAGE_BUCKETS": " , "},
        {"LENSFLOW_TRAIN_METRIC": "loss"},
        {"LENSFLOW_POINTER_TTL_S": "soon"},
    ],
)
def test_bad_values_are_refused_with_a_reason(env):
    with pytest.raises(ValueError):
        Config.from_env(env)


def test_credentials_never_appear_in_the_configs_repr():
    config = Config.from_env(
        {"LENSFLOW_S3_ACCESS_KEY": "AKIAXX", "LENSFLOW_S3_SECRET_KEY": "s3cr3t"}
    )
    assert config.s3_secret_key == "s3cr3t"
    assert "s3cr3t" not in repr(config) and "AKIAXX" not in repr(config)
