"""Security: nothing in the store is ever unpickled unless we signed it; no query runs code."""

import os
import pickle
import stat

import pytest

import capsule_nb as cpsl

from ..conftest import until_sync
from ..test_durability import lines_until, spawn


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/capsule-nb-pwned",))


def test_a_forged_argument_payload_fails_the_run_clearly(tmp_path):
    victim = spawn(
        """
        from fractions import Fraction

        @app.task
        def later(x):
            return x

        h = later.schedule(delay="2s", x=Fraction(1, 3))  # non-JSON: kept as a signed payload
        app.store.flush()
        print(h.task_id, flush=True)
        print("ready", flush=True)
        threading.Event().wait()
        """,
        tmp_path,
    )
    (task_id,) = lines_until(victim, "ready")
    victim.kill()
    victim.wait(10)
    app = cpsl.App(home=tmp_path)
    key = f"payload/{task_id}/args"
    forged = b"\0" * 32 + pickle.dumps(((Boom(),), {}))  # a valid pickle with a wrong signature
    app.store._cache.set(key, forged)

    @app.task
    def later(x):
        return x

    until_sync(lambda: app.get_task(task_id).snapshot()["status"] == "failed")
    error = app.get_task(task_id).snapshot()["error"]
    assert "cannot resume" in error and "bad signature" in error
    assert not os.path.exists("/tmp/capsule-nb-pwned")


def test_modes_hold_across_reopen(tmp_path):
    home = tmp_path / "store"
    cpsl.App(home=home)
    os.chmod(home, 0o700)
    again = cpsl.App(home=home)
    assert stat.S_IMODE(os.stat(again.home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(again.home / "secret.key").st_mode) == 0o600
    assert not [p for p in home.iterdir() if p.name.startswith(".key-")]  # no key copies left behind


def test_collections_never_execute_code(app):
    coll = app.collection("docs")
    coll.insert_one({"__class__": "x", "code": "__import__('os').system('true')", "blob": pickle.dumps(1).hex()})
    for query in ({"$where": "1"}, {"code": {"$function": "x"}}, {"code": {"$expr": 1}}):
        with pytest.raises(ValueError):
            coll.find(query)
    doc = coll.find_one({"__class__": "x"})
    assert doc["code"].startswith("__import__") and isinstance(doc["blob"], str)
    with pytest.raises(TypeError, match="JSON"):
        coll.insert_one({"obj": Boom()})
