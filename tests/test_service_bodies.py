"""srcid.service.bodies: listed features read as arrays by simdjson, every other body exactly as parse_json reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srcid.service.bodies import LOOK_BYTES, parse_body, parse_json
from srcid.service.models import EncodeRequest, Query


def _features(shape: tuple[int, ...], seed: int = 0) -> list:
    return np.round(np.random.default_rng(seed).standard_normal(shape), 4).tolist()


def _same_as_parse_json(raw: bytes) -> None:
    """parse_body read this body as parse_json does: no arrays anywhere, equal values."""
    got = parse_body(raw)
    assert got == parse_json(raw)
    assert "ndarray" not in repr(type(got)) and "array(" not in repr(got)


@pytest.mark.parametrize("shape", [(10, 128), (10, 3, 4), (1, 1)])
def test_listed_features_become_float64_arrays_of_their_shape(shape):
    listed = _features(shape)
    body = {"modality": "audio", "inputs": [{"features": listed}, {"features": listed, "mask": [True] * shape[0]}],
            "return_embedding": True}
    got = parse_body(json.dumps(body).encode())
    for item in got["inputs"]:
        assert isinstance(item["features"], np.ndarray) and item["features"].dtype == np.float64
        np.testing.assert_array_equal(item["features"], np.asarray(listed))  # the same doubles as orjson's
    assert got["inputs"][1]["mask"] == [True] * shape[0] and got["return_embedding"] is True
    assert got["modality"] == "audio"


def test_a_retrieve_querys_features_and_integers_are_read_too():
    body = {"query": {"modality": "audio", "features": [[1, 2], [3, 4]]}, "target": "video", "top_k": 3}
    got = parse_body(json.dumps(body).encode())
    np.testing.assert_array_equal(got["query"]["features"], [[1.0, 2.0], [3.0, 4.0]])
    assert got["target"] == "video" and got["top_k"] == 3


@pytest.mark.parametrize("features", [
    "[[1,2],[3]]",  # ragged
    "[[1,2],[3],[4,5,6]]",  # ragged, with as many numbers as a rectangle
    "[[1,[2]],[3,4]]",  # a one-element list where a number belongs: simdjson's buffer would flatten it away
    "[[1,2],[[3],4]]",
    "[[true,2],[3,4]]",
    "[[null,2],[3,4]]",
    '[["1",2],[3,4]]',
    '[[{"a":1},2],[3,4]]',
    "[[],[]]",
    "[]",
    "[1,[2,3]]",
    '"not a list"',
    "7",
])
def test_features_that_are_not_a_rectangle_of_numbers_are_read_as_lists(features):
    _same_as_parse_json(b'{"modality":"audio","inputs":[{"features":%s}]}' % features.encode())


@pytest.mark.parametrize("raw", [
    b'{"modality":"audio","inputs":[{"features":[[NaN,1.0]]}]}',  # Python's json writes NaN; simdjson refuses it
    b'{"modality":"audio","inputs":[{"features":[[18446744073709551616]]}]}',
    b'{"modality":"audio","inputs":[{"features":[[1.0,2.0]]}],"note":"a [ in a string"}',
    b'{"inputs":[{"features":[[1.0]]}],"modality":"audio"} trailing',
])
def test_bodies_simdjson_cannot_read_exactly_go_to_parse_json(raw):
    try:
        want = parse_json(raw)
    except json.JSONDecodeError as exc:
        with pytest.raises(json.JSONDecodeError) as got:
            parse_body(raw)
        assert got.value.msg == exc.msg
        return
    got = parse_body(raw)
    assert repr(got) == repr(want)  # NaN != NaN, so compare as written


def test_not_utf8_is_the_same_error_either_way():
    raw = b'{"modality":"audio","inputs":[{"features":[[1.0]]}],"x":"\xff"}'
    with pytest.raises(json.JSONDecodeError, match="not UTF-8"):
        parse_json(raw)
    with pytest.raises(json.JSONDecodeError, match="not UTF-8"):
        parse_body(raw)


def test_a_body_without_features_early_on_is_parse_jsons():
    late = json.dumps({"text": "x" * LOOK_BYTES, "features": [[1.0, 2.0]]}).encode()
    _same_as_parse_json(late)
    _same_as_parse_json(b'{"modality":"audio","inputs":[{"features_b64":"AACAPw=="}]}')


def test_duplicate_keys_keep_the_last_as_orjson_does():
    raw = b'{"modality":"video","modality":"audio","inputs":[{"features":[[1.0]]}]}'
    assert parse_body(raw)["modality"] == parse_json(raw)["modality"] == "audio"


def test_the_request_models_keep_an_array_and_still_check_the_rest():
    x = np.zeros((10, 128))
    request = EncodeRequest.model_validate({"modality": "audio", "inputs": [{"features": x}]})
    assert request.inputs[0].features is x and request.inputs[0].kind == "features"
    assert Query.model_validate({"modality": "audio", "features": x}).features is x
    with pytest.raises(ValueError, match="exactly one"):
        EncodeRequest.model_validate({"modality": "audio", "inputs": [{"features": x, "text": "a"}]})
    with pytest.raises(ValueError, match="list"):
        EncodeRequest.model_validate({"modality": "audio", "inputs": [{"features": "no"}]})


def _listed(value):
    """parse_body's value with its arrays as lists, to compare with parse_json's."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_listed(v) for v in value]
    return value


_numbers = st.one_of(st.floats(allow_nan=False, width=64), st.integers(-(2**53), 2**53))
_leaves = st.one_of(_numbers, st.booleans(), st.none(), st.text(max_size=3), st.just([1.5]), st.just([]))
_rows = st.lists(st.one_of(_numbers, _leaves), min_size=0, max_size=4)
_features_values = st.one_of(
    st.lists(st.lists(_numbers, min_size=1, max_size=4), min_size=1, max_size=4),  # often rectangular
    st.lists(_rows, max_size=4),
    st.lists(st.lists(st.lists(_numbers, min_size=2, max_size=2), min_size=2, max_size=2), min_size=1, max_size=3),
    _leaves,
)


@settings(max_examples=300, deadline=None)
@given(features=_features_values, extra=st.dictionaries(st.sampled_from(["mask", "note", "features"]),
                                                         st.one_of(_leaves, _rows), max_size=2))
def test_any_body_reads_as_parse_json_reads_it(features, extra):
    raw = json.dumps({"modality": "audio", "inputs": [{"features": features, **extra}], "top_k": 3}).encode()
    try:
        want = parse_json(raw)
    except json.JSONDecodeError:
        with pytest.raises(json.JSONDecodeError):
            parse_body(raw)
        return
    got = parse_body(raw)
    assert _listed(got) == want
    item = got["inputs"][0]
    if isinstance(item.get("features"), np.ndarray):  # only a rectangle of numbers becomes an array
        assert np.asarray(want["inputs"][0]["features"]).shape == item["features"].shape
