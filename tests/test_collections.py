"""Collections: Capsule's document surface, sync and async, shared across processes."""

import subprocess
import sys
import textwrap

import pytest


async def test_insert_find_update_delete_count_awaited(app):
    reports = app.session.db.reports
    doc = await reports.insert_one({"name": "daily", "rows": 3})
    assert doc["_id"] == doc["id"] and doc["name"] == "daily"
    await reports.insert_many([{"name": "weekly", "rows": 10}, {"name": "monthly", "rows": 40, "tags": []}])
    assert await reports.count() == 3
    assert (await reports.find_one({"name": "weekly"}))["rows"] == 10
    assert await reports.find_one({"name": "yearly"}) is None
    updated = await reports.update_one({"name": "daily"}, {"rows": 5})  # a plain dict is a patch
    assert updated["rows"] == 5 and updated["name"] == "daily"
    await reports.update_one({"name": "monthly"}, {"$inc": {"rows": 2}, "$push": {"tags": "big"}})
    await reports.update_one({"name": "weekly"}, {"$unset": {"rows": ""}, "$set": {"done": True}})
    assert await reports.find_one({"name": "monthly"}) == {
        "_id": reports.find_one({"name": "monthly"})["_id"], "id": reports.find_one({"name": "monthly"})["id"],
        "name": "monthly", "rows": 42, "tags": ["big"],
    }
    assert "rows" not in await reports.find_one({"name": "weekly"})
    assert await reports.delete_one({"name": "weekly"}) is True
    assert await reports.delete_one({"name": "weekly"}) is False
    assert await reports.count() == 2


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
    assert items.find_one({"n": 99}).value is None and not items.find_one({"n": 99})


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
    ],
)
def test_bad_queries_and_documents_are_refused_and_lose_nothing(app, call, error, message):
    items = app.collection("items")
    items.insert_one({"a": 1})
    with pytest.raises(error, match=message):
        call(items)
    assert items.find({}, ) [0]["a"] == 1 and items.count() == 1


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
