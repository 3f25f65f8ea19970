"""Dotted overrides are typed by the dataclass fields and fail with the field's name."""

from __future__ import annotations

import pytest

from kiln import overrides
from kiln.config import PretrainConfig, RopeScaling
from kiln.errors import ConfigError
from kiln.recipes.pretrain import tiny


def test_values_are_typed_by_field():
    cfg = overrides.apply(tiny(), [
        "parallel.tp=4", "optimizer.lr=1e-4", "parallel.sequence_parallel=true",
        "data.blend=[0.3, a_text_document, 0.7, b_text_document]", "model.num_query_groups=null",
        "schedule.style=wsd", "train.precision=bf16",
    ])
    assert cfg.parallel.tp == 4 and cfg.optimizer.lr == 1e-4 and cfg.parallel.sequence_parallel is True
    assert cfg.data.blend == [0.3, "a_text_document", 0.7, "b_text_document"]
    assert cfg.model.num_query_groups is None and cfg.schedule.style == "wsd"


def test_optional_section_is_created_on_first_use():
    cfg = overrides.apply(tiny(), ["model.rope_scaling.factor=32"])
    assert cfg.model.rope_scaling == RopeScaling(factor=32.0)


@pytest.mark.parametrize("text, message", [
    ("parallel.tp=two", "parallel.tp='two' is not an integer"),
    ("parallel.tpp=2", "unknown config field 'parallel.tpp'; did you mean parallel.tp?"),
    ("schedule.style=exponential",
     "schedule.style='exponential' is not one of 'cosine', 'wsd', 'linear', 'constant'"),
    ("parallel.sequence_parallel=maybe",
     "parallel.sequence_parallel='maybe' is not a boolean: use true or false"),
    ("train.steps", "override 'train.steps' has no '=': write it as field.path=value, e.g. parallel.tp=2"),
])
def test_bad_override_names_the_field(text, message):
    with pytest.raises(ConfigError) as err:
        overrides.apply(tiny(), [text])
    assert str(err.value).startswith(message)


def test_dict_round_trip_is_lossless():
    cfg = overrides.apply(tiny(), ["model.rope_scaling.factor=8", "parallel.vpp=2"])
    again = overrides.from_dict(PretrainConfig, overrides.to_dict(cfg))
    assert again == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config field 'model.hiden_size'"):
        overrides.from_dict(PretrainConfig, {"model": {"hiden_size": 3}})
