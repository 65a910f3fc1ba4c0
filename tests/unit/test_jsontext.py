"""The fast JSON writer of stored versions and responses: whatever ``json.loads`` accepted, it
writes back as JSON that parses to the same value (orjson, or the standard library where orjson
cannot, e.g. integers beyond 64 bits)."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_shared.jsontext import compact

LEAVES = (st.none() | st.booleans() | st.integers() | st.text()
          | st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=25)


@settings(max_examples=400)
@given(JSON)
def test_what_is_written_parses_back_to_the_same_value(value):
    assert json.loads(compact(value)) == value


def test_integers_beyond_64_bits_fall_back_to_the_standard_library():
    value = json.loads('{"valueInteger": 123456789012345678901234567890, "name": "Zoë"}')
    assert compact(value) == '{"valueInteger":123456789012345678901234567890,"name":"Zoë"}'


def test_output_is_compact_and_keeps_non_ascii_characters():
    assert compact({"a": [1, 2.5], "b": "Müller"}) == '{"a":[1,2.5],"b":"Müller"}'
