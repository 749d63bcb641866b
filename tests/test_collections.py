"""Collections: Capsule's document surface, sync and async, shared across processes."""

import contextlib
import gc
import json
import logging
import re
import sqlite3
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

import capsule_nb as cpsl
from capsule_nb.cli import main as cli_main
from capsule_nb.doc_filters import field_value as _get, matches as _matches, sortable as _sortable
from capsule_nb.store import disk, folder


async def test_insert_find_update_delete_count_awaited(app):
    reports = app.session.db.reports
    doc = await reports.insert_one({"name": "daily", "rows": 3})
    assert doc["_id"] == doc["id"] and doc["name"] == "daily"
    await reports.insert_many([{"name": "weekly", "rows": 10}, {"name": "monthly", "rows": 40, "tags": []}])
    assert await reports.count() == 3
    assert (await reports.find_one({"name": "weekly"}))["rows"] == 10
    assert await reports.find_one({"name": "yearly"}) is None
    # a plain dict is a patch; what is told back is Capsule's: how many matched, how many changed
    assert await reports.update_one({"name": "daily"}, {"rows": 5}) == {"matched": 1, "modified": 1}
    assert (await reports.find_one({"name": "daily"}))["rows"] == 5
    assert await reports.update_one({"name": "daily"}, {"rows": 5}) == {"matched": 1, "modified": 0}
    assert await reports.update_one({"name": "yearly"}, {"rows": 5}) == {"matched": 0, "modified": 0}
    await reports.update_one({"name": "monthly"}, {"$inc": {"rows": 2}, "$push": {"tags": "big"}})
    await reports.update_one({"name": "weekly"}, {"$unset": {"rows": ""}, "$set": {"done": True}})
    assert await reports.find_one({"name": "monthly"}) == {
        "_id": reports.find_one({"name": "monthly"})["_id"], "id": reports.find_one({"name": "monthly"})["id"],
        "name": "monthly", "rows": 42, "tags": ["big"],
    }
    assert "rows" not in await reports.find_one({"name": "weekly"})
    assert await reports.delete_one({"name": "weekly"}) == {"deleted": 1}
    assert await reports.delete_one({"name": "weekly"}) == {"deleted": 0}
    assert await reports.count() == 2


async def test_an_upsert_inserts_the_filters_fields_with_the_update_once_and_changes_after(app):
    """``update_one(..., upsert=True)`` (Capsule's session collections take it): no match
    inserts the filter's plain fields with the update applied; the next call finds it."""
    counters = app.session.db.counters
    first = await counters.update_one({"name": "visits", "day": {"$gte": 1}}, {"$inc": {"n": 1}}, upsert=True)
    assert first["matched"] == first["modified"] == 0
    assert await counters.find_one({"_id": first["upserted_id"]}) == {
        "_id": first["upserted_id"], "id": first["upserted_id"], "name": "visits", "n": 1}
    assert await counters.update_one({"name": "visits"}, {"$inc": {"n": 1}}, upsert=True) == {"matched": 1, "modified": 1}
    assert [d["n"] for d in await counters.find()] == [2]
    for _ in range(2):  # a dotted field in the filter: the document it inserts matches it
        await counters.update_one({"user.id": "u1"}, {"$inc": {"hits": 1}}, upsert=True)
    assert [(d["user"], d["hits"]) for d in await counters.find({"user.id": "u1"})] == [({"id": "u1"}, 2)]
    with pytest.raises(TypeError, match="upsert is True or False, not 'yes'"):
        counters.update_one({"name": "visits"}, {"n": 0}, upsert="yes")
    assert [d["n"] for d in await counters.find({"name": "visits"})] == [2]


async def test_the_three_ways_to_name_a_collection_are_one(app):
    app.collection("reports").insert_one({"n": 1})
    assert app.session.db["reports"].count() == 1
    assert await app.session.db.reports.count() == 1


def test_filters_sort_limit_skip_sync(app):
    items = app.collection("items")
    items.insert_many([{"n": n, "kind": "odd" if n % 2 else "even"} for n in range(10)])
    assert [d["n"] for d in items.find({"n": {"$gt": 6}})] == [7, 8, 9]
    assert [d["n"] for d in items.find({"n": {"$gte": 2, "$lt": 5}})] == [2, 3, 4]
    assert [d["n"] for d in items.find({"n": {"$lte": 1}})] == [0, 1]
    assert items.count({"kind": {"$ne": "odd"}}) == 5
    assert [d["n"] for d in items.find({"n": {"$in": [3, 5, 11]}})] == [3, 5]
    assert [d["n"] for d in items.find({"kind": "even"}, sort="-n", limit=2)] == [8, 6]
    assert [d["n"] for d in items.find(sort=[("kind", 1), ("n", -1)], skip=1, limit=3)] == [6, 4, 2]
    assert items.find_one({"n": 4})["kind"] == "even"
    assert items.find_one({"n": 99}) == None and not items.find_one({"n": 99})  # noqa: E711 (a stand-in)


async def test_writes_and_lookups_without_await_give_real_dicts(app):
    """Sync code uses what a write gives as the dict it is: item assignment, ``json.dumps``,
    ``isinstance``. These were stand-ins that refused all three."""
    items = app.collection("items")
    doc = items.insert_one({"a": 1})
    doc["note"] = "mine"  # the caller's copy
    summaries = [items.update_one({"a": 1}, {"b": 2}), items.delete_one({"a": 5}), items.find_one({"a": 1})]
    assert all(isinstance(d, dict) for d in [doc, *summaries])
    assert json.loads(json.dumps(summaries[:2])) == [{"matched": 1, "modified": 1}, {"deleted": 0}]
    assert summaries[2] == {"a": 1, "b": 2, "_id": doc["_id"], "id": doc["id"]}
    awaited = await items.find_one({"a": 1})
    assert type(awaited) is dict and awaited == summaries[2]
    assert type(await items.delete_one({"a": 1})) is dict and await items.find_one({"a": 1}) is None
    # The stand-in for None (a lookup of nothing) given on is kept as null, in documents and session data
    nothing = items.find_one({"a": 99})
    kept = items.insert_one({"ref": nothing, "refs": [nothing]})
    items.update_one({"_id": kept["_id"]}, {"$set": {"also": nothing, "done": bool(nothing)}})
    assert {k: v for k, v in (await items.find_one({"_id": kept["_id"]})).items() if k not in ("_id", "id")} == {
        "ref": None, "refs": [None], "also": None, "done": False}
    app.session.data["last"] = nothing
    assert json.dumps(app.session.data) == '{"last": null}'


def test_documents_are_copies(app):
    items = app.collection("items")
    doc = {"list": [1]}
    stored = items.insert_one(doc)
    doc["list"].append(2)
    stored["list"].append(3)
    assert items.find_one({})["list"] == [1]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda c: c.update_one({}, {"a": 1, "$set": {"b": 2}}), ValueError, "mixes plain keys and operators"),
        (lambda c: c.update_one({}, {"$rename": {"a": "b"}}), ValueError, "unknown update operator '\\$rename'"),
        (lambda c: c.update_one({}, {"$inc": {"a": "x"}}), TypeError, "\\$inc needs numbers"),
        (lambda c: c.find({"a": {"$regex": "x"}}), ValueError, "unknown filter operator '\\$regex'"),
        (lambda c: c.find({"a": {"$in": 3}}), ValueError, "\\$in on 'a' needs a list"),
        (lambda c: c.insert_one({"when": object()}), TypeError, "stored as JSON"),
        (lambda c: c.insert_one(["not", "a", "dict"]), TypeError, "a document is a dict"),
        (lambda c: c.find(sort=[("a", 2)]), ValueError, "sort takes"),
        (lambda c: c.update_one({}, {"$set": {"a": 5}, "$inc": {"a": 1}}), ValueError,
         "update conflict: \\$inc 'a' and \\$set 'a' change the same field"),
        (lambda c: c.update_one({}, {"$set": {"b": {}, "b.c": 1}}), ValueError,
         "update conflict: \\$set 'b' and \\$set 'b.c'"),
        (lambda c: c.insert_one({"$set": {"a": 2}}), ValueError,  # (w46: it was stored as a field)
         "an insert takes a document, not an update: its field '\\$set' is an operator"),
    ],
)
def test_bad_queries_and_documents_are_refused_and_lose_nothing(app, call, error, message):
    items = app.collection("items")
    items.insert_one({"a": 1})
    with pytest.raises(error, match=message):
        call(items)
    assert items.find({}, ) [0]["a"] == 1 and items.count() == 1


def test_documents_whose_inner_field_names_hold_dots_are_kept_and_stay_updatable(app):
    """Domain names, file names and versions are common keys inside a value. A check of
    every name froze such documents: no update of them went through (w48)."""
    people = app.collection("people")
    people.insert_one({"_id": "p1", "name": "Ann", "urls": {"example.com": 3}, "files": {"report.csv": 1},
                       "prices": {"$usd": 5}})
    assert people.update_one({"_id": "p1"}, {"$set": {"name": "Bob"}, "$inc": {"urls.visits": 1}}) \
        == {"matched": 1, "modified": 1}
    assert people.update_one({"_id": "p1"}, {"$unset": {"prices": ""}}) == {"matched": 1, "modified": 1}
    assert {k: v for k, v in people.find_one({"name": "Bob"}).items() if k not in ("_id", "id")} == {
        "name": "Bob", "urls": {"example.com": 3, "visits": 1}, "files": {"report.csv": 1}}


async def test_an_insert_never_overwrites_a_document_with_its_id(app):
    """As MongoDB's duplicate key error: the stored document is kept, and a batch is all or nothing."""
    threads = app.collection("threads")
    first = await threads.insert_one({"_id": "renewal", "subject": "Renewal review"})
    with pytest.raises(ValueError, match="already holds a document with _id 'renewal'"):
        await threads.insert_one({"_id": "renewal", "subject": "Other"})
    with pytest.raises(ValueError, match="_id 'renewal'"):
        await threads.insert_many([{"_id": "new", "subject": "New"}, {"_id": "renewal", "subject": "Other"}])
    with pytest.raises(ValueError, match="_id 'twice' is given twice"):
        await threads.insert_many([{"_id": "twice", "n": 1}, {"_id": "twice", "n": 2}])
    assert await threads.find() == [first]


async def test_push_each_appends_every_value(app):
    threads = app.collection("threads")
    created = await threads.insert_one({"subject": "Renewal review", "tags": ["renewal"]})
    await threads.update_one({"_id": created["_id"]}, {"$push": {"tags": {"$each": ["urgent", "q3"]}}})
    assert (await threads.find_one({"_id": created["_id"]}))["tags"] == ["renewal", "urgent", "q3"]
    with pytest.raises(ValueError, match=r"\$push 'tags': the one modifier here is"):
        await threads.update_one({"_id": created["_id"]}, {"$push": {"tags": {"$each": ["x"], "$slice": -2}}})
    assert (await threads.find_one({"_id": created["_id"]}))["tags"] == ["renewal", "urgent", "q3"]


def test_bad_collection_names(app):
    for bad in ("", "a/b", "_private"):
        with pytest.raises(ValueError, match="bad collection name"):
            app.collection(bad)


def test_collections_display_as_a_table(app):
    items = app.collection("items")
    items.insert_many([{"name": "<b>x</b>", "n": 1}, {"name": "y", "extra": True}])
    html = items._repr_html_()
    assert "<th>id</th><th>name</th><th>n</th><th>extra</th>" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "2 documents" in html


def test_written_by_one_process_read_by_another(app):
    app.collection("shared").insert_one({"from": "parent", "n": 0})
    code = textwrap.dedent(
        f"""
        import capsule_nb as cpsl
        app = cpsl.App(home={str(app.home)!r})
        shared = app.collection("shared")
        assert shared.find_one({{"from": "parent"}})["n"] >= 0
        for _ in range(50):
            shared.update_one({{"from": "parent"}}, {{"$inc": {{"n": 1}}}})
        shared.insert_one({{"from": "child"}})
        """
    )
    children = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    for _ in range(50):
        app.collection("shared").update_one({"from": "parent"}, {"$inc": {"n": 1}})
    assert [c.wait(60) for c in children] == [0, 0]
    shared = app.collection("shared")
    assert shared.find_one({"from": "parent"})["n"] == 150  # no increment lost between processes
    assert shared.count({"from": "child"}) == 2


async def test_a_task_writes_results_to_a_collection(app):
    @app.task
    def build(session, report_id):
        session.db.reports.insert_one({"report_id": report_id, "status": "done"})

    await build.submit(report_id="r1").wait(5)
    assert app.collection("reports").find_one({"report_id": "r1"})["status"] == "done"


# ------------------------------------------------------------ the documents table


def _sql(home, statement, args=()):
    """A statement on the store's database over a connection of our own (no capsule_nb code)."""
    with contextlib.closing(sqlite3.connect(home / "db" / "cache.db", timeout=30)) as db, db:
        return db.execute(statement, args).fetchall()


def _warnings_naming(caplog, key):
    return [r for r in caplog.records if r.levelno == logging.WARNING and repr(key) in r.getMessage()]


OLD_DOCS = 4500  # more than two of the migration's batches


def test_an_old_store_s_documents_move_into_the_table_once(tmp_path, caplog, capsys):
    """A store whose documents are diskcache rows, as the version before the table wrote
    them, opened by two processes at once: every document moves once, in key order."""
    home = tmp_path / "store"
    folder.prepare_folder(home)
    old = disk.open_cache(home)
    for n in range(OLD_DOCS):
        old.set(f"doc/items/{n:06d}", {"_id": f"{n:06d}", "id": f"{n:06d}", "n": n})
    old.set("doc/notes/x", {"_id": "x", "text": "kept"})
    old.set("doc/items/bad", {"_id": "not-bad"})  # a row whose _id is not its key's
    old.close()
    opener = textwrap.dedent(
        f"""
        import os, pathlib, time
        import capsule_nb as cpsl
        meet = pathlib.Path({str(tmp_path / "meet")!r})
        meet.mkdir(exist_ok=True)
        (meet / str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(meet)) < 2 and time.monotonic() < deadline:  # open together
            time.sleep(0.001)
        print(cpsl.App(home={str(home)!r}).collection("items").count())
        """
    )
    children = [subprocess.Popen([sys.executable, "-c", opener], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    counts = [child.communicate(timeout=120)[0].strip() for child in children]
    assert [c.returncode for c in children] == [0, 0] and counts == [str(OLD_DOCS)] * 2
    app = cpsl.App(home=home)
    assert [d["n"] for d in app.collection("items").find()] == list(range(OLD_DOCS))
    assert app.collection("notes").find_one({"_id": "x"})["text"] == "kept"
    assert _sql(home, "SELECT count(*) FROM capsule_docs") == [(OLD_DOCS + 1,)]
    assert _sql(home, "SELECT key FROM Cache WHERE key GLOB 'doc/*'") == [("doc/items/bad",)]  # left for doctor
    assert len(_warnings_naming(caplog, "doc/items/bad")) == 1
    capsys.readouterr()
    assert cli_main(["--home", str(home), "doctor"]) == 1 and "doc/items/bad" in capsys.readouterr().out


TRICKY = [{}, {"v": None}, {"v": True}, {"v": False}, {"v": 1}, {"v": 1.0}, {"v": 0}, {"v": -0.0}, {"v": "1"},
          {"v": ""}, {"v": "a"}, {"v": "a\x00b"}, {"v": "\ud800"}, {"v": "größe"}, {"v": [1]}, {"v": "[1]"},
          {"v": [1, 2]}, {"v": {}}, {"v": {"w": 1}}, {"v": {"w": None}}, {"v": {"w": True}}, {"v": "{}"},
          {"v": 2**53 + 1}, {"v": 10**30}, {"v": 2.5}, {"v": 1.0000000000000002}, {"größe": 1}, {'v"q': 1}]
FILTERS = [{"v": None}, {"v": 1}, {"v": 1.0}, {"v": True}, {"v": False}, {"v": 0}, {"v": "1"}, {"v": "a"},
           {"v": ""}, {"v": "[1]"}, {"v": "{}"}, {"v": "a\x00b"}, {"v": "\ud800"}, {"v": "größe"}, {"v": [1]},
           {"v": {}}, {"v": {"w": 1}}, {"v.w": 1}, {"v.w": None}, {"v.w": True}, {"v": 2.5}, {"v": 2**53 + 1},
           {"v": 10**30}, {"v": {"$gt": 0}}, {"v": {"$gte": 1, "$lt": 2}}, {"v": {"$lte": 1}}, {"v": {"$gt": 2**60}},
           {"v": {"$gt": 2.4, "$lte": 2.5}}, {"v": {"$lt": 1.0000000000000002}}, {"v": {"$gte": 10**30}},
           {"v": {"$in": [1, "a", None]}}, {"v": {"$in": []}}, {"v": {"$in": [[1], "1"]}}, {"v": {"$ne": 1}},
           {"größe": 1}, {"größe": None}, {'v"q': 1}, {"v": 1, "v.w": None}, {"v": {"$in": [True]}},
           {"v": {"$in": [1.0, False]}}, {"v": {"$gt": False}}, {"v": {"$ne": True}}, {"v.w": {"$in": [1]}}]


@pytest.mark.parametrize("flt", FILTERS, ids=repr)
def test_sql_finds_and_counts_what_matches_says(app, flt):
    """SQL picks documents before Python checks them, and counts alone when it can: on
    missing against null, true against 1, nested paths, lists, NULs, big and odd numbers."""
    items = app.collection("items")
    stored = items.insert_many(TRICKY)
    wanted = [d["_id"] for d in stored if _matches(d, flt)]
    assert [d["_id"] for d in items.find(flt)] == wanted
    assert items.count(flt) == len(wanted)
    if wanted:
        assert items.update_one(flt, {"$set": {"seen": 1}}) == {"matched": 1, "modified": 1}
        assert [d["_id"] for d in items.find({"seen": 1})] == wanted[:1]


async def test_a_boolean_matches_only_a_boolean_as_in_mongodb(app):
    """w54: ``True == 1`` in Python (and ``json_extract`` reads true as 1), so ``{"archived": False}``
    found ``archived: 0``, ``$gt: 0`` found true, and ``find(x=True)`` found runs of ``x=1``."""
    items = app.collection("items")
    for v in [1, True, 1.0, "1", 0, False, [True], [0]]:
        items.insert_one({"v": v})

    def found(flt: dict) -> list:
        return [d["v"] for d in items.find(flt)]

    assert found({"v": True}) == [True, [True]] and items.count({"v": True}) == 2
    assert found({"v": False}) == [False] and found({"v": 0}) == [0, [0]] and items.count({"v": 0}) == 2
    assert found({"v": 1}) == [1, 1.0] and found({"v": {"$gt": 0}}) == [1, 1.0]
    assert found({"v": {"$in": [False]}}) == [False] and items.count({"v": {"$in": [1]}}) == 2

    @app.task
    def job(x=None):
        return x

    for x in (1, 1.0, True, "1"):
        await job.submit(x=x)
    assert [h.kwargs["x"] for h in await job.find(x=True)] == [True] and await job.count(x=1) == 2


def test_sort_order_across_types_is_one_in_sql_and_in_python(app):
    """None and missing, then numbers (booleans as 0 and 1), then text (objects and arrays
    by their JSON text); ties in insertion order, either way up. A field name SQL cannot
    name (one with a quote) is sorted in Python, the same way."""
    values = ["b", {"x": 1}, 2.5, None, True, [1], "", -1, False, "a", 10, "missing", 0]
    docs = []
    for n, value in enumerate(values):
        doc = {"n": n} if value == "missing" else {"n": n, "v": value, 'v"q': value, "o": {"v": value}}
        docs.append(doc)
    items = app.collection("items")
    items.insert_many(docs)
    up = [3, 11, 7, 8, 12, 4, 2, 10, 6, 5, 9, 0, 1]
    down = [1, 0, 9, 5, 6, 10, 2, 4, 8, 12, 7, 3, 11]
    for field in ("v", "o.v", 'v"q'):
        assert [d["n"] for d in items.find(sort=field)] == up, field
        assert [d["n"] for d in items.find(sort=[(field, -1)])] == down, field
        assert [d["n"] for d in items.find(sort=[(field, -1)], skip=2, limit=3)] == down[2:5], field
    assert [d["n"] for d in sorted(items.find(), key=lambda d: _sortable(_get(d, "v")))] == up


def test_an_equality_and_sort_find_walks_an_index(app):
    """The query's expressions are the index's, to the character: SQLite uses an expression
    index only then. The page is an index walk: no scan, no sort."""
    tickets = app.collection("tickets")
    tickets.insert_many([{"n": n, "status": ("open", "closed")[n % 2], "at": n % 7} for n in range(200)])
    statements = []
    connection = app.store._cache._con  # this thread's connection: the one the query runs on
    connection.set_trace_callback(statements.append)
    try:
        found = tickets.find({"status": "open"}, sort={"at": -1}, limit=5)
    finally:
        connection.set_trace_callback(None)
    assert [d["n"] for d in found] == [6, 20, 34, 48, 62]
    (query,) = [s for s in statements if s.startswith("SELECT doc_id, doc FROM capsule_docs")]
    (plan,) = [row[3] for row in _sql(app.home, "EXPLAIN QUERY PLAN " + query)]
    index = re.fullmatch(r"SEARCH capsule_docs USING INDEX (capsule_docs_by_\w+) \(<expr>=\?\)", plan)
    assert index, plan
    ((definition,),) = _sql(app.home, "SELECT sql FROM sqlite_master WHERE name = ?", (index[1],))
    expressions = re.findall(r"json_extract\(doc, '[^']*'\)", definition)
    assert len(expressions) == 2 and all(e in query for e in expressions)


def test_declared_sortable_columns_are_indexed(app):
    app.collection("threads", columns=["subject", {"key": "status", "label": "Status"}], sortable=True)
    made = " ".join(sql for (sql,) in _sql(app.home, "SELECT sql FROM sqlite_master WHERE name GLOB 'capsule_docs_by_*'"))
    assert """json_extract(doc, '$."subject"')""" in made and """json_extract(doc, '$."status"')""" in made


def test_a_process_keeps_no_copy_of_a_collection(app):
    """Documents are read from disk for each query and let go: after inserting and querying
    10 MB of documents, this process holds a small fraction of that."""
    items = app.collection("items")
    tracemalloc.start()
    try:
        for start in range(0, 5000, 1000):
            items.insert_many([{"n": n, "pad": "x" * 2000} for n in range(start, start + 1000)])
        assert items.count() == 5000 and items.count({"n": {"$gte": 10}}) == 4990
        assert [d["n"] for d in items.find({"pad": {"$ne": ""}}, sort="-n", limit=2)] == [4999, 4998]
        assert items.find_one({"n": 4321})["n"] == 4321
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1_000_000


def test_a_bad_row_in_the_documents_table_is_skipped_with_one_warning(app, caplog):
    items = app.collection("items")
    items.insert_one({"_id": "good", "n": 1})
    _sql(app.home, "INSERT INTO capsule_docs (collection, doc_id, doc) VALUES ('items', 'a', ?), ('items', 'l', ?)",
         ('{"_id": "b", "n": 1}', "[1, 2]"))
    with pytest.raises(sqlite3.IntegrityError):  # what is not JSON never gets in
        _sql(app.home, "INSERT INTO capsule_docs (collection, doc_id, doc) VALUES ('items', 'x', '{')")
    for _ in range(3):
        assert [d["_id"] for d in items.find()] == ["good"]
        assert [d["_id"] for d in items.find({"n": 1}, sort="-n")] == ["good"]
    assert len(_warnings_naming(caplog, "doc/items/a")) == 1 and len(_warnings_naming(caplog, "doc/items/l")) == 1
    assert items.insert_one({"_id": "a", "n": 2})["n"] == 2  # the bad row is replaced
    assert items.find_one({"_id": "a"})["n"] == 2


async def test_an_array_field_matches_by_its_elements_as_in_mongodb(app):
    """A ``tags`` column holds lists: ``{"tags": "urgent"}`` finds the documents tagged so,
    in SQL's answer and in ``count``, sorted and paged, and after arrays first appear."""
    tickets = app.collection("tickets")
    await tickets.insert_many([{"_id": "c", "tags": "urgent", "scores": 7}, {"_id": "d", "title": "[no array]"}])

    def ids(docs):
        return [doc["_id"] for doc in docs]

    assert ids(await tickets.find({"tags": "urgent"})) == ["c"]  # the index is made before any array is stored
    await tickets.insert_many([{"_id": "a", "tags": ["urgent", "billing"], "scores": [1, 9]},
                               {"_id": "b", "tags": ["billing"], "scores": [4]}])
    assert ids(await tickets.find({"tags": "urgent"}, sort={"_id": 1})) == ["a", "c"]
    assert await tickets.count({"tags": "urgent"}) == 2
    assert ids(await tickets.find({"tags": "billing"}, sort={"_id": -1}, limit=1)) == ["b"]
    assert ids(await tickets.find({"tags": ["billing"]})) == ["b"]  # a whole array equals itself
    assert ids(await tickets.find({"tags": {"$in": ["urgent", "nope"]}}, sort={"_id": 1})) == ["a", "c"]
    assert ids(await tickets.find({"tags": {"$ne": "urgent"}}, sort={"_id": 1})) == ["b", "d"]
    assert await tickets.count({"tags": {"$ne": "urgent"}}) == 2
    assert ids(await tickets.find({"scores": {"$gt": 8}})) == ["a"]
    assert ids(await tickets.find({"scores": {"$lt": 2}})) == ["a"]
    # each condition may be met by a different element, as in MongoDB (its $elemMatch is for one)
    assert ids(await tickets.find({"scores": {"$gte": 5, "$lte": 6}}, sort={"_id": 1})) == ["a"]
    assert ids(await tickets.find({"title": "[no array]"})) == ["d"]
    assert await tickets.update_one({"tags": "billing", "scores": 4}, {"$push": {"tags": "done"}}) == {
        "matched": 1, "modified": 1}
    assert (await tickets.find_one({"_id": "b"}))["tags"] == ["billing", "done"]
    assert await tickets.count({"tags": "done"}) == 1


# ------------------------------------------------------------ indexes as a collection grows


def _statements(app, call):
    """What ``call`` runs on this thread's connection (the one queries run on), and its answer."""
    statements = []
    connection = app.store._cache._con
    connection.set_trace_callback(statements.append)
    try:
        return statements, call()
    finally:
        connection.set_trace_callback(None)


def _index_fields(home, collection):
    """The fields of the indexes that serve only ``collection``, each index as one string."""
    literal = "'" + collection.replace("'", "''") + "'"
    return sorted(", ".join(re.findall(r"""\$\."([^"]+)"'\)""", sql)) for (sql,) in _sql(
        home, "SELECT sql FROM sqlite_master WHERE name GLOB 'capsule_docs_by_*' AND sql LIKE ?",
        (f"%) WHERE collection = {literal}",)))


def test_a_collection_indexes_its_fields_while_young_so_its_first_query_when_grown_makes_none(app):
    """An index made on a big collection reads every document; one made while the first
    documents go in costs nothing. So when the collection has grown, an equality filter with
    a sort and a page walks the sort field's index: no index is made, and the page is what
    sorting every match would give (ties in insertion order)."""
    tickets = app.collection("tickets")

    def doc(n):
        return {"n": n, "status": ("open", "closed", "waiting", "done", "review")[n % 5], "at": n % 40,
                "owner": f"user{n % 300}", "note": "x" * 200, "tags": ["a"], "flag": n % 2 == 0}

    tickets.insert_many([doc(n) for n in range(600)])
    tickets.insert_many([doc(n) for n in range(600, 3000)])  # young when it began: still indexed as it goes
    tickets.insert_many([{**doc(n), "late": n} for n in range(3000, 3500)])  # a field first seen once grown
    # Short scalars get an index each, long text, arrays and fields first seen later do not.
    assert _index_fields(app.home, "tickets") == ["at", "flag", "id", "n", "owner", "status"]

    everything = [doc(n) for n in range(3500)]
    for flt, sort, limit, walks in [({"status": "open"}, {"at": -1}, 5, True),  # 700 matches: a walk of ~25
                                    ({"status": "open", "flag": True}, {"at": 1, "n": -1}, 3, True),
                                    ({"owner": "user7"}, {"at": -1}, 5, False),  # 12 matches: sorting them is less
                                    ({"n": 1234}, {"at": -1}, 5, False)]:
        statements, found = _statements(app, lambda: tickets.find(flt, sort=sort, limit=limit))
        matches = [d for d in everything if all(d[k] == v for k, v in flt.items())]
        for field, direction in reversed(list(sort.items())):
            matches.sort(key=lambda d: d[field], reverse=direction < 0)
        assert [d["n"] for d in found] == [d["n"] for d in matches[:limit]], flt
        assert not [s for s in statements if s.startswith("CREATE INDEX")], flt
        (query,) = [s for s in statements if s.startswith("SELECT doc_id, doc FROM capsule_docs")]
        assert (" INDEXED BY capsule_docs_by_" in query) is walks, query
    # The late field has no index: its first query makes one, since none of its fields has one.
    statements, found = _statements(app, lambda: tickets.find({"late": 3100}))
    assert [d["n"] for d in found] == [3100] and [s for s in statements if s.startswith("CREATE INDEX")]


def test_a_young_collection_indexes_its_first_eight_fields_in_the_documents_order(app):
    """Eight indexes at most for fields (writing a document updates each one); the rest of
    a collection's 16 are left for the shapes of its queries."""
    wide = app.collection("wide")
    wide.insert_one({f"f{i}": i for i in range(12, 0, -1)})
    assert _index_fields(app.home, "wide") == sorted(f"f{i}" for i in range(12, 4, -1))
    assert wide.find_one({"f1": 1})["f12"] == 12


def test_indexes_serve_their_own_collection_whatever_its_name(app):
    """Each collection's indexes are its own (writing to one never updates another's),
    named in SQL as a literal: a quote in the name is escaped, and a name SQL text cannot
    hold (a NUL character) still gets right answers."""
    names = ["tickets", "it's \"odd\"", "nul\x00name"]
    for i, name in enumerate(names):
        app.collection(name).insert_many([{"n": n, f"only{i}": n % 3} for n in range(50)])
    assert _index_fields(app.home, "tickets") == ["id", "n", "only0"]
    assert _index_fields(app.home, "it's \"odd\"") == ["id", "n", "only1"]
    for i, name in enumerate(names):
        items = app.collection(name)
        assert [d["n"] for d in items.find({f"only{i}": 1}, sort={"n": -1}, limit=3)] == [49, 46, 43]
        assert items.count({f"only{i}": 2}) == 16


def test_an_index_made_for_every_collection_by_the_last_version_still_serves(app):
    """The version before made query indexes on ``(collection, field...)`` for all collections
    alike; a store it wrote keeps using them and makes no copy of its own."""
    rows = [("tickets", f"d{n:04}", json.dumps({"_id": f"d{n:04}", "n": n, "status": ("open", "closed")[n % 2]}))
            for n in range(1500)]
    with contextlib.closing(sqlite3.connect(app.home / "db" / "cache.db")) as db, db:
        db.executemany("INSERT INTO capsule_docs (collection, doc_id, doc) VALUES (?, ?, ?)", rows)
        db.execute("""CREATE INDEX capsule_docs_by_0123456789ab ON capsule_docs """
                   """(collection, json_extract(doc, '$."status"'), json_extract(doc, '$."n"') DESC)""")
    statements, found = _statements(app, lambda: app.collection("tickets").find(
        {"status": "open"}, sort={"n": -1}, limit=3))
    assert [d["n"] for d in found] == [1498, 1496, 1494]
    assert not [s for s in statements if s.startswith("CREATE INDEX")]
    (query,) = [s for s in statements if s.startswith("SELECT doc_id, doc FROM capsule_docs")]
    (plan,) = [row[3] for row in _sql(app.home, "EXPLAIN QUERY PLAN " + query)]
    assert plan.startswith("SEARCH capsule_docs USING INDEX capsule_docs_by_0123456789ab"), plan


def test_a_query_never_waits_for_another_process_writing_to_take_index_statistics(app):
    """A process's first query takes sampled statistics of the collection's indexes, which
    is a write; while another process holds the write lock (a long insert), the query
    answers without them instead of waiting."""
    tickets = app.collection("tickets")
    tickets.insert_many([{"n": n, "status": ("open", "closed")[n % 2]} for n in range(40)])
    assert [d["n"] for d in tickets.find({"status": "open"}, sort={"n": -1}, limit=3)] == [38, 36, 34]  # indexed
    code = textwrap.dedent(
        f"""
        import sys
        import capsule_nb as cpsl
        tickets = cpsl.App(home={str(app.home)!r}).collection("tickets")
        print("ready", flush=True)
        sys.stdin.readline()
        print([d["n"] for d in tickets.find({{"status": "open"}}, sort={{"n": -1}}, limit=3)], flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        with contextlib.closing(sqlite3.connect(app.home / "db" / "cache.db", isolation_level=None)) as writer:
            writer.execute("BEGIN IMMEDIATE")  # held until the child has answered
            child.stdin.write("go\n")
            child.stdin.flush()
            answer, _ = child.communicate(timeout=30)
            writer.execute("ROLLBACK")
    finally:
        child.kill()
    assert answer == "[38, 36, 34]\n" and child.returncode == 0
