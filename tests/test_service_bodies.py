"""srcid.service.bodies: listed features read as arrays by the C parser (srcid/service/_bodyjson.c), every other
body exactly as parse_json reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
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


def test_brackets_and_keys_inside_strings_are_text():
    raw = b'{"note":"[[1]] features: [[2]]","inputs":[{"features":[[1,2]],"k":"{features: [[3]]}"}]}'
    got = parse_body(raw)
    assert got["note"] == "[[1]] features: [[2]]" and got["inputs"][0]["k"] == "{features: [[3]]}"
    np.testing.assert_array_equal(got["inputs"][0]["features"], [[1.0, 2.0]])


def test_a_retrieve_querys_features_and_integers_are_read_too():
    body = {"query": {"modality": "audio", "features": [[1, 2], [3, 4]]}, "target": "video", "top_k": 3}
    got = parse_body(json.dumps(body).encode())
    np.testing.assert_array_equal(got["query"]["features"], [[1.0, 2.0], [3.0, 4.0]])
    assert got["target"] == "video" and got["top_k"] == 3


@pytest.mark.parametrize("features", [
    "[[1,2],[3]]",  # ragged
    "[[1,2],[3],[4,5,6]]",  # ragged, with as many numbers as a rectangle
    "[[1,[2]],[3,4]]",  # a one-element list where a number belongs
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
    b'{"modality":"audio","inputs":[{"features":[[NaN,1.0]]}]}',  # Python's json writes NaN; orjson refuses it
    b'{"modality":"audio","inputs":[{"features":[[18446744073709551616]]}]}',
    b'{"modality":"audio","inputs":[{"features":[[1.0,2.0]]}],"note":"a \\"quoted\\" word"}',
    b'{"inputs":[{"features":[[1.0]]}],"modality":"audio"} trailing',
])
def test_bodies_the_parser_declines_go_to_parse_json(raw):
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


def _bits(value) -> np.ndarray:
    """float64 values as their bits, so -0.0 and 0.0 differ."""
    return np.asarray(value, dtype=np.float64).view(np.uint64)


@pytest.mark.parametrize("number", [
    "0", "-0", "7", "-7", "9007199254740992", "-9007199254740992", "0.0", "-0.0", "0.5", "-1.3032", "0.0284",
    "1234567.1234567", "12345678.5", "0.12345678", "1.0000001", "3.141592653589793", "0.1", "0.30000000000000004",
    "1e5", "1E5", "-2.5e-3", "1.5E+2", "1e22", "1e23", "4.35e-1", "1.7976931348623157e308", "5e-324",
    "2.2250738585072014e-308", "2.225073858507201e-308", "1e-400", "123456789012345678e-10", "0.000001",
    "9.999999999999999e22", "0.00000000000000000000001",
])
def test_every_number_is_the_double_orjson_reads(number):
    # padded rows, so that numbers are read both far from the body's end (eight digits at a time) and near it
    for raw in (b'{"features":[[%s,0.25]]}' % number.encode(), b'{"features":[[%s]]}' % number.encode(),
                b'{"features":[[0.5,%s],[%s,0.5]],"note":"%s"}' % (number.encode(), number.encode(), b"x" * 40)):
        got = parse_body(raw)["features"]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(_bits(got), _bits(parse_json(raw)["features"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda x: repr(float(x))),
    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str),
    st.integers(-(2**53), 2**53).map(str),
    st.builds(lambda m, f, e: f"{m}.{f}e{e}", st.integers(-999, 999), st.integers(0, 10**9), st.integers(-330, 310)),
), min_size=1, max_size=24), st.sampled_from([",", ", ", " ,\n "]))
def test_numbers_as_any_client_writes_them_are_the_doubles_orjson_reads(numbers, separator):
    raw = ('{"features": [[%s]], "pad": "%s"}' % (separator.join(numbers), "x" * 20)).encode()
    try:
        want = parse_json(raw)["features"]
    except json.JSONDecodeError:
        with pytest.raises(json.JSONDecodeError):
            parse_body(raw)
        return
    got = parse_body(raw)["features"]
    if isinstance(got, np.ndarray):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    else:  # declined (a number past float64's range, an integer past 2^53): parse_json's lists
        assert repr(got) == repr(want)


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, width=64),
              st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(["features", "a", "é", 'q"']),
                                                         st.text(max_size=3)), children, max_size=4)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(value=_json_values, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans())
@example(value={"features": [0, -0.0]}, indent=None, ascii_only=True)
def test_any_json_reads_as_parse_json_reads_it_types_included(value, indent, ascii_only):
    raw = json.dumps({"features": [[1.5, 2.0]], "v": value}, indent=indent, ensure_ascii=ascii_only).encode()
    # a "features" key inside `value` holding a rectangle of numbers is an array too, of numpy's doubles of its list
    _assert_reads_alike(parse_body(raw), parse_json(raw))


def _assert_reads_alike(got, want) -> None:
    """parse_body's value `got` is parse_json's `want`: its arrays hold the doubles numpy makes of want's lists,
    everything else is equal and of the same type (repr: 1 is not 1.0, NaN is NaN)."""
    if isinstance(got, np.ndarray):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    elif isinstance(got, dict):
        assert isinstance(want, dict) and list(got) == list(want)
        for key in got:
            _assert_reads_alike(got[key], want[key])
    elif isinstance(got, list):
        assert isinstance(want, list) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_reads_alike(g, w)
    else:
        assert repr(got) == repr(want)


def _assert_same_outcome(raw: bytes) -> None:
    try:
        want = parse_json(raw)
    except json.JSONDecodeError as exc:
        with pytest.raises(json.JSONDecodeError) as got:
            parse_body(raw)
        assert got.value.msg == exc.msg, raw
        return
    _assert_reads_alike(parse_body(raw), want)


def test_every_cut_and_every_changed_byte_of_a_body_reads_as_parse_json_reads_it():
    body = json.dumps({"modality": "audio", "inputs": [{"features": [[0.5, -1.25, 3], [1e-3, 0, -0.0]]}],
                       "x": [True, False, None, "é"], "top_k": 12}, ensure_ascii=False).encode()
    for end in range(len(body) + 1):
        _assert_same_outcome(body[:end])
    for i in range(len(body)):
        for byte in b'0-.e]["\\,: }{x\x00\xff':
            _assert_same_outcome(body[:i] + bytes([byte]) + body[i + 1:])


@pytest.mark.parametrize("number", ["01", "-01.5", "00", "-", "1.", ".5", "+1", "1e", "1e+", "--1", "0x1", "1.e5",
                                    "1.5.2", "-.5", "1e5.5", "Infinity", "-Infinity", "12345678901234567890"])
def test_what_is_not_a_json_number_is_the_error_parse_json_gives(number):
    for raw in (b'{"features":[[0.5,%s,0.25]],"note":"%s"}' % (number.encode(), b"x" * 40),
                b'{"features":[[0.5,%s]]}' % number.encode(), b'{"features":[[%s]]}' % number.encode()):
        _assert_same_outcome(raw)


@pytest.mark.parametrize("raw", [
    b'{"features":[[1]],"t":"a\\"b"}',  # a backslash escape
    b'{"features":[[1]],"t":"\xff"}',  # not UTF-8
    b'{"features":[[1]],"features":[[2]]}',  # a key twice
    b'{"features":[[NaN]]}',
    b'{"features":[[1e400]]}',  # past float64: orjson refuses it, Python's json reads infinity
    b'{"features":[[1]],"n":1234567890123456789}',  # an integer of 19 digits
    b'{"features":[[1]],"d":' + b"[" * 70 + b"]" * 70 + b"}",  # nested deeper than the parser goes
    b'{"features":[[1]]} x',
    b"",
])
def test_what_the_parser_declines_it_says_so(raw):
    from srcid.service import _bodyjson

    with pytest.raises(_bodyjson.Declined):
        _bodyjson.parse(raw, lambda buffer, shape: None)


def test_features_past_2_53_or_an_error_making_the_array_are_not_lost():
    from srcid.service import _bodyjson

    big = b'{"features":[[9007199254740993, 1]]}'  # orjson's int, then numpy's int64 array, is the exact value
    assert parse_body(big)["features"] == [[9007199254740993, 1]]

    def refuse(buffer: bytes, shape: tuple[int, ...]):
        raise MemoryError("no room")

    with pytest.raises(MemoryError, match="no room"):  # an error of its own, not a Declined that orjson would hide
        _bodyjson.parse(b'{"features":[[1.5]]}', refuse)
    seen = []
    _bodyjson.parse(b'{"features":[[1.5, 2], [3, 4.25], [5, 6]]}', lambda buffer, shape: seen.append((buffer, shape)))
    assert seen == [(np.array([1.5, 2, 3, 4.25, 5, 6]).tobytes(), (3, 2))]
