"""Property tests: parsers and the collection language never fail in an undocumented way."""

import itertools
import json
import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsule_nb.collections import Collection, _updated
from capsule_nb.doc_filters import field_value as _get, matches as _matches, sortable as _sortable
from capsule_nb.durations import MAX_DELAY, parse_delay, parse_when
from capsule_nb.cron import parse_cron

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.one_of(st.text(), st.floats(allow_nan=True), st.integers(), st.none(), st.lists(st.integers())))
def test_delay_parser_returns_seconds_or_a_documented_error(value):
    try:
        seconds = parse_delay(value)
    except (ValueError, TypeError) as exc:
        assert repr(value)[:20] in str(exc) or str(value)[:20] in str(exc)  # names the bad value
    else:
        assert math.isfinite(seconds) and seconds >= 0


@FAST
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhd"))
def test_delay_parser_reads_every_unit(number, unit):
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    for text, read, amount in ((f"{number}{unit}", parse_delay, number),
                               (f"every {number + 1}{unit}", lambda t: parse_when(t)[1], number + 1)):
        if amount * seconds > MAX_DELAY:
            with pytest.raises(ValueError, match=f"'{amount}{unit}': at most 100 years"):
                read(text)
        else:
            assert read(text) == amount * seconds


@FAST
@given(st.text(alphabet=string.printable, max_size=40))
def test_cron_parser_raises_only_value_error(text):
    try:
        assert parse_cron(text) == " ".join(text.split())
    except ValueError as exc:
        assert "bad cron" in str(exc)


@FAST
@given(st.lists(st.sampled_from(["*", "*/5", "1-5", "0", "59", "1,2", "mon", "jan", "L", "?", "61", "-1"]),
                min_size=4, max_size=7))
def test_cron_parser_on_cron_like_fields(fields):
    try:
        parse_cron(" ".join(fields))
    except ValueError as exc:
        assert "bad cron" in str(exc)


# ------------------------------------------------------------- collections

values = st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b", "c"]), st.none(), st.booleans())
docs = st.lists(st.fixed_dictionaries({}, optional={"x": values, "y": values, "tags": st.lists(values, max_size=2)}),
                max_size=12)
ops = st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$ne", "$in"])


@st.composite
def filters(draw, fields=("x", "y"), of=values):
    out = {}
    for field in draw(st.lists(st.sampled_from(fields), unique=True, max_size=2)):
        if draw(st.booleans()):
            out[field] = draw(of)
        else:
            op = draw(ops)
            out[field] = {op: draw(st.lists(of, max_size=3)) if op == "$in" else draw(of)}
    return out


def reference_match(doc, flt):
    """A deliberately plain model of the filter language (Mongo's: missing reads as None, and
    a boolean is no number)."""
    def same(a, b):
        return a == b and isinstance(a, bool) == isinstance(b, bool)

    for field, cond in flt.items():
        value = doc.get(field)
        if isinstance(cond, dict):
            (op, arg), = cond.items()
            if op == "$ne":
                ok = not same(value, arg)
            elif op == "$in":
                ok = any(same(value, item) for item in arg)
            elif value is None or isinstance(value, bool) != isinstance(arg, bool):
                ok = False
            else:
                try:
                    ok = {"$gt": value > arg, "$gte": value >= arg, "$lt": value < arg, "$lte": value <= arg}[op]
                except TypeError:
                    ok = False
        else:
            ok = same(value, cond)
        if not ok:
            return False
    return True


@FAST
@given(docs, filters())
def test_filters_agree_with_a_reference_model(documents, flt):
    assert [d for d in documents if _matches(d, flt)] == [d for d in documents if reference_match(d, flt)]


@FAST
@given(st.fixed_dictionaries({"n": st.integers(-100, 100), "tags": st.lists(values, max_size=3)}),
       st.integers(-10, 10), values)
def test_update_operators_agree_with_a_reference_model(doc, inc, pushed):
    new = _updated(doc, {"$inc": {"n": inc}, "$push": {"tags": pushed}, "$set": {"seen": True}, "$unset": {"gone": ""}})
    assert new == {**doc, "n": doc["n"] + inc, "tags": doc["tags"] + [pushed], "seen": True}
    assert doc["tags"] is not new["tags"]  # the stored doc is never changed in place


@FAST
@given(st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers(), st.lists(st.integers())), max_size=4))
def test_collection_round_trips_arbitrary_json_documents(app, document):
    coll = Collection(app.store, "fuzz")
    given_id = document.get("_id", "ours")
    if not (isinstance(given_id, str) and given_id and "/" not in given_id):
        with pytest.raises(ValueError, match="_id must be a non-empty string without"):
            coll.insert_one(document)
        return
    if any(key.startswith("$") for key in document):
        with pytest.raises(ValueError, match="an insert takes a document, not an update"):
            coll.insert_one(document)
        return
    stored = coll.insert_one(document).value
    assert coll.find_one({"_id": stored["_id"]}).value == stored
    assert coll.delete_one({"_id": stored["_id"]}).value == {"deleted": 1}


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from([0.5, 1.0, -0.0, 2**53 + 1, 1e300]),
                    st.sampled_from(["", "a", "b", "1", "[1]", "{}", "é", "a\x00", "a\x00b"]),
                    st.sampled_from([[1], {}]))  # what "[1]" and "{}" are the JSON text of
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=2)
                           | st.dictionaries(st.sampled_from(["w", "x"]), inner, max_size=2), max_leaves=4)
stored_docs = st.lists(st.fixed_dictionaries({}, optional={"x": json_values, "y": json_values}), max_size=10)
_fresh = itertools.count()


@FAST
@given(stored_docs, filters(fields=("x", "y", "x.w"), of=json_values))
def test_the_store_finds_and_counts_what_matches_says(app, documents, flt):
    """SQL picks and counts documents in the store; the answer is ``_matches``'s, whatever the values."""
    coll = Collection(app.store, f"fuzz{next(_fresh)}")
    stored = list(coll.insert_many(documents))
    wanted = [d for d in stored if _matches(d, flt)]
    assert coll.find(flt) == wanted
    assert coll.count(flt) == len(wanted)


@FAST
@given(stored_docs, st.sampled_from(["x", "y", "x.w"]), st.sampled_from([1, -1]))
def test_the_store_sorts_as_sortable_says(app, documents, field, direction):
    """SQL sorts what ``json_extract`` gives in the order ``_sortable`` gives (ties in insertion
    order), except among strings equal up to a NUL character, where SQLite stops reading."""
    coll = Collection(app.store, f"fuzz{next(_fresh)}")
    stored = list(coll.insert_many(d for d in documents if "\\u0000" not in json.dumps(d)))
    wanted = sorted(stored, key=lambda d: _sortable(_get(d, field)), reverse=direction < 0)
    assert coll.find(sort=[(field, direction)]) == wanted


# ------------------------------------------------------------- submit


weird = st.one_of(
    st.integers(), st.floats(allow_nan=True), st.text(), st.binary(max_size=8), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.integers(), st.text(max_size=3), max_size=2),
    st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2), st.complex_numbers(allow_nan=False),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weird, weird)
def test_any_argument_is_stored_or_refused_clearly(app, a, b):
    @app.task(name="fuzzed", lock="k:{a}")
    def fuzzed(a, b=None):
        return None

    handle = fuzzed.submit(a, b=b)
    record = handle.snapshot()
    assert record["task_name"] == "fuzzed" and len(record["args"]) == 1
    assert isinstance(record["lock_key"], str)
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        fuzzed.submit(a, c=b)
