"""Bad input fails early, names the bad value, and leaves the store as it was."""

import inspect
import os
import re
import stat
import threading

import pytest

import capsule_nb as cpsl
from capsule_nb.durations import parse_delay
from capsule_nb.errors import StoreError

from .conftest import until_sync


def test_lock_placeholder_that_is_no_parameter_fails_at_decoration(app):
    with pytest.raises(ValueError, match=r"\{report\}.*not a parameter"):

        @app.task(lock="report:{report}")
        def build(report_id):
            pass


def test_lock_template_filled_from_positional_keyword_and_defaults(app):
    @app.task(lock="report:{report_id}:{region}")
    def build(report_id, region="eu"):
        pass

    assert build.lock_key(build.bind(("r1",), {})) == "report:r1:eu"
    assert build.lock_key(build.bind((), {"report_id": "r2", "region": "us"})) == "report:r2:us"


def test_a_lock_template_fills_only_name_placeholders_as_capsules_runner_does(app):
    """Capsule fills ``{name}`` with ``str()`` of the argument and leaves other braces as
    written. ``{x.id}`` was formatted here, and failed at submit with an AttributeError."""
    with pytest.warns(UserWarning, match=r"keeps \{order\.id\}, \{n!r\} as written") as caught:
        @app.task(lock="ship:{order.id}:{n!r}:{n}")
        def ship(order, n=1):
            pass
    assert caught[0].filename == __file__  # said at the decorator's line
    assert ship.lock_key(ship.bind(({"id": 7},), {})) == "ship:{order.id}:{n!r}:1"
    assert ship.lock_key(ship.bind((None,), {"n": "x"})) == "ship:{order.id}:{n!r}:x"


def test_a_brace_left_open_in_a_lock_template_is_said_too(app):
    """w51: ``x:{a`` and ``x:{a}}`` were taken without the warning other braces get."""
    for template, said in (("x:{a", "'{'"), ("x:{a}}", "'}'")):
        with pytest.warns(UserWarning, match=f"keeps {said} as written"):
            @app.task(lock=template)
            def f(a=1):
                pass
    assert f.lock_key(f.bind((5,), {})) == "x:5}"


def test_schedule_options_of_the_wrong_type_are_refused_before_there_is_a_function(app):
    """w51: ``catchup="no"`` turned catch-up on, as "no" is truthy; ``tz=5`` was a ValueError."""
    with pytest.raises(TypeError, match="catchup must be True or False, got 'no'"):
        app.schedule("* * * * *", catchup="no")
    with pytest.raises(TypeError, match="tz is the name of a time zone, such as 'UTC' or 'Europe/Paris', not 5"):
        app.schedule("* * * * *", tz=5)
    with pytest.raises(TypeError, match="name must be a non-empty string, got ''"):  # as @task(name="")
        app.schedule("* * * * *", name="")
    with pytest.raises(ValueError, match=r"bad cron 'H 9 \* \* \*': H \(Jenkins' hashed value\) is not cron"):
        app.schedule("H 9 * * *")  # (croniter said "Hashed definitions must include hash_id")
    assert app.schedule("0 9 * * THU")(lambda: None).next_runs(1)[0].weekday() == 3  # an H in a day name is no hash


def test_next_runs_after_what_is_no_datetime_is_a_type_error_naming_it(app):
    """w52: an AttributeError ('str' object has no attribute 'astimezone')."""
    daily = app.schedule("0 9 * * *")(lambda: None)
    for after in ("2030-01-01", 5):
        with pytest.raises(TypeError, match=f"next_runs\\(after=...\\) takes a datetime, got {after!r}"):
            daily.next_runs(2, after=after)


def test_next_runs_of_more_than_a_list_can_hold_is_refused_at_once(app):
    """w52: ``next_runs(10**9)`` of a cron firing every minute hung the kernel, building a list."""
    minutely = app.schedule("* * * * *")(lambda: None)
    with pytest.raises(ValueError, match="next_runs\\(n\\) lists at most 10,000 fire times, got n=1000000000"):
        minutely.next_runs(10**9)
    assert len(minutely.next_runs(10_000)) == 10_000


@pytest.mark.parametrize(
    "options, message",
    [
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"retries": 1.5}, "got 1.5"),
        ({"timeout": -3}, "bad timeout -3"),
        ({"timeout": "soon"}, "bad timeout 'soon'"),
        ({"retry_delay": "-5s"}, "bad retry_delay '-5s'"),
        ({"backoff": 0.5}, "backoff must be a number >= 1, got 0.5"),
        ({"backoff": float("nan")}, "backoff must be a number >= 1, got nan"),  # (its next wait was an hour)
        ({"on_lock": "wait"}, "on_lock must be one of"),
        ({"callback_url": "ftp://x"}, "callback_url must be an http"),
    ],
)
def test_bad_task_options_name_the_value(app, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):

        @app.task(**options)
        def job():
            pass


@pytest.mark.parametrize("retry_for, named", [(ValueError(), "ValueError()"), ("ValueError", "'ValueError'"),
                                               ([ValueError, "3"], "'3'")])
def test_retry_for_must_be_exception_types(app, retry_for, named):
    with pytest.raises(TypeError, match=re.escape(f"retry_for must be exception types, got {named}")):

        @app.task(retry_for=retry_for)
        def job():
            pass


def test_retry_for_accepts_one_type_or_a_list(app):
    @app.task(retry_for=KeyError)
    def one():
        pass

    @app.task(retry_for=(KeyError, OSError))
    def two():
        pass

    assert one.retry_for == (KeyError,) and two.retry_for == (KeyError, OSError)


async def test_an_empty_retry_for_or_callback_url_is_not_set_as_in_capsule(app):
    """w54: Capsule's runner reads an empty ``retry_for`` as not set (every failure retries) and
    an empty ``callback_url`` as no callback; both were refused at decoration here."""
    attempts = []

    @app.task(retries=2, retry_for=[], retry_delay=0, callback_url="")
    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ValueError("not yet")
        return "third time"

    assert flaky.retry_for is None and flaky.callback_url is None
    assert await flaky.submit().result(timeout=10) == "third time" and len(attempts) == 3


@pytest.mark.parametrize("bad", ["1h30m", "soon", "-5s", "5", "5 fortnights", "", "every", "repeat 5m"])
def test_bad_delay_strings(app, bad):
    @app.task
    def job():
        pass

    with pytest.raises(ValueError, match="bad"):
        job.schedule(delay=bad) if bad != "every" else job.schedule(bad)
    assert app.tasks.count() == 0


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("0.5s", 0.5)])
def test_good_delay_strings(text, seconds):
    assert parse_delay(text) == seconds


@pytest.mark.parametrize("delay", [1e300, "99999999d", "every 99999999d"])
def test_a_delay_of_centuries_is_refused_not_stored(app, delay):
    """They were taken (w46): a run due when no datetime can say."""
    @app.task
    def job():
        pass

    said = re.escape(str(delay).split()[-1])
    with pytest.raises(ValueError, match=f"bad (delay|interval) .*{said}.*: at most 100 years"):
        job.schedule(delay) if isinstance(delay, str) and delay.startswith("every") else job.schedule(delay=delay)
    assert app.tasks.count() == 0
    assert parse_delay("36500d") == 36500 * 86400
    import datetime as dt

    with pytest.raises(ValueError, match="`at` is at most 100 years ahead"):  # (w48: shown as '?253402318799.0')
        job.schedule(at=dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc))
    assert app.tasks.count() == 0  # (a hundred years, give or take leap days, still is)


@pytest.mark.parametrize("limit", ["0MB", 0, -1, "99999999999999999999GB", 2**63])
def test_a_memory_limit_of_nothing_or_past_any_machine_is_refused(app, limit):
    """"0MB" was taken as 0 where 0 was refused, and 10**29 bytes was taken (w46)."""
    with pytest.raises(ValueError, match=f"memory_limit must be from 1 byte to 8 EiB, got {re.escape(repr(limit))}"):
        @app.task(process=True, memory_limit=limit)
        def job():
            pass


def test_schedule_takes_only_one_time(app):
    import datetime as dt

    @app.task
    def job():
        pass

    with pytest.raises(ValueError, match="provide either when or delay, not both"):  # the SDK's words
        job.schedule("5m", delay="5m")
    with pytest.raises(ValueError, match="not both"):
        job.schedule(delay="5m", at=dt.datetime.now())
    with pytest.raises(TypeError, match="must be a datetime"):
        job.schedule(at="tomorrow")


def test_unknown_keyword_at_submit_is_a_type_error(app):
    @app.task
    def job(a):
        pass

    with pytest.raises(TypeError, match=r"job.submit\(\): got an unexpected keyword argument 'b'"):
        job.submit(a=1, b=2)


def test_store_path_that_is_a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(StoreError, match=str(path)):
        cpsl.App(home=path)
    assert path.read_text() == "x"


def test_store_path_that_cannot_be_written(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere on disk; sysfs refuses even root
        target = "/sys/capsule_nb_store"
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        target = str(locked / "store")
    with pytest.raises(StoreError, match=target):
        cpsl.App(home=target)


def test_store_path_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "store")):
        cpsl.App(home=tmp_path / "file" / "store")


def test_store_folder_and_key_modes(app):
    assert stat.S_IMODE(os.stat(app.home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(app.home / "secret.key").st_mode) == 0o600


@pytest.mark.parametrize("home", [5, ""])
def test_a_home_that_is_no_path_is_refused_naming_it(home):
    with pytest.raises(TypeError, match=f"home is the path of a store folder, not {home!r}"):
        cpsl.configure(home=home)


@pytest.mark.parametrize("url", ["http://", "https:///hook", "ftp://host/hook", 5, "http://exa mple.com",
                                 "http://host:99999/", "http://[::1"])
def test_a_callback_url_without_a_host_is_refused_at_decoration(app, url):
    with pytest.raises(ValueError, match=f"callback_url must be an http\\(s\\) URL with a host, got {re.escape(repr(url))}"):
        @app.task(callback_url=url)
        def job():
            pass


def test_app_name_must_be_text(tmp_path):
    for name in ("", " "):
        with pytest.raises(ValueError, match="App name"):
            cpsl.App(name=name, home=tmp_path)


def test_an_app_name_with_a_slash_is_refused_its_schedules_would_be_anothers(tmp_path):
    """App "a" with schedule "b/c" and app "a/b" with schedule "c" shared one key: pausing
    one paused the other, and ``capsule-nb schedules`` listed one of them."""
    with pytest.raises(ValueError, match="App name cannot contain '/', got 'a/b'"):
        cpsl.App(name="a/b", home=tmp_path)
    app = cpsl.App(name="a", home=tmp_path)
    try:
        @app.schedule("0 0 1 1 *", name="b/c")  # (a schedule's own name may: it comes last)
        def yearly():
            pass

        yearly.pause()
        assert yearly.paused
    finally:
        app.close()


def test_a_rerun_app_cell_with_one_bad_option_changes_nothing(tmp_path):
    app = cpsl.App(name="rerun", home=tmp_path, max_threads=8, keep_finished=100)
    try:
        with pytest.raises(ValueError, match="keep_finished must be .* got -1"):
            cpsl.App(name="rerun", home=tmp_path, max_threads=4, keep_finished=-1, image="new")
        assert (app.runtime.max_threads, app.keep_finished, app.image) == (8, 100, None)
        with pytest.raises(ValueError, match="max_threads must be .* got 0"):
            cpsl.App(name="rerun", home=tmp_path, max_threads=0, keep_finished=5)
        assert (app.runtime.max_threads, app.keep_finished) == (8, 100)
        assert cpsl.App(name="rerun", home=tmp_path, max_threads=4, keep_finished=5) is app  # good values apply
        assert (app.runtime.max_threads, app.keep_finished) == (4, 5)
    finally:
        app.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": 5}, "@task: name must be a non-empty string, got 5"),  # (its runs were stored, then unreadable)
        ({"display_name": 5}, "display_name must be a string, got 5"),
        ({"lock": 5}, "lock must be a template string, got 5"),
    ],
)
def test_task_options_of_the_wrong_type_are_refused_at_decoration(app, options, message):
    with pytest.raises(TypeError, match=message):

        @app.task(**options)
        def job():
            pass

    assert app.tasks.count() == 0


def test_a_method_is_refused_at_decoration_not_at_every_submit(app):
    """Capsule's class-based apps (``@app.cls``) are not here: ``@task`` on a method was taken,
    and each submit then failed with "missing a required argument: 'self'"."""
    with pytest.raises(TypeError, match=r"@task\(work\): a method of a class is no task here"):
        class Worker:
            @app.task
            def work(self, n: int):
                return n


def test_a_generator_function_is_no_task_its_body_would_never_run(app):
    with pytest.raises(TypeError, match=r"@task\(rows\): a task is a function or an async function, not a generator"):

        @app.task
        def rows():
            yield 1

    with pytest.raises(TypeError, match="not a generator"):

        @app.task
        async def stream():
            yield 1


def test_arguments_the_store_cannot_keep_are_said_at_the_submit_once_per_task(app):
    """A lock (or a socket) is neither JSON nor picklable: the run goes ahead in this kernel,
    but no other kernel could resume it. That was found out only once the kernel had died."""
    import warnings

    @app.task
    def guarded(guard, n=0):
        return n

    lock = threading.Lock()
    with pytest.warns(RuntimeWarning, match=r"guarded: the arguments of run \w+ are neither JSON nor picklable") as told:
        first = guarded.submit(lock, n=1)
    assert [w.filename for w in told] == [__file__]  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = guarded.submit(lock, n=2)  # once per task
        third = guarded.submit({"a", "b"}, n=3)  # not JSON, but kept pickled: nothing to say
    assert [first.snapshot()["args_payload"], third.snapshot()["args_payload"]] == [False, True]
    until_sync(lambda: [h.snapshot()["status"] for h in (first, second, third)] == ["completed"] * 3)


def test_an_empty_lock_template_is_no_lock_as_in_capsule(app):
    gate = threading.Event()

    @app.task(lock="")
    def job(who):
        gate.wait(10)
        return who

    alice, bob = job.submit("alice"), job.submit("bob")
    assert alice.task_id != bob.task_id and job.lock is None
    gate.set()
    until_sync(lambda: alice.snapshot()["status"] == bob.snapshot()["status"] == "completed")


def test_bad_find_arguments(app):
    with pytest.raises(ValueError, match="limit must be a whole number >= 0, got -1"):
        app.tasks.find(limit=-1)
    with pytest.raises(ValueError, match=r"limit must be a whole number <= 2\*\*63 - 1, got 10{20}"):
        app.tasks.find(limit=10**20)
    with pytest.raises(ValueError, match=r"limit must be a whole number <= 2\*\*63 - 1"):
        app.collection("items").find(limit=10**20)
    with pytest.raises(ValueError, match="offset must be a whole number >= 0, got 1.5"):
        app.tasks.find(offset=1.5)


def test_configure_tunes_the_default_app_and_checks_values(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSULE_NB_HOME", str(tmp_path / "default"))
    app = cpsl.configure(home=tmp_path / "configured", max_threads=4, keep_finished=50, max_result_bytes=1024)
    assert app.home == (tmp_path / "configured").resolve()
    assert (app.runtime.max_threads, app.keep_finished, app.max_result_bytes) == (4, 50, 1024)
    assert cpsl.configure() is app
    for bad in ({"max_threads": 0}, {"keep_finished": -1}, {"max_result_bytes": "1MB"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a whole number"):
            cpsl.configure(**bad)
    with pytest.raises(TypeError, match="portable must be True or False, got 'no'"):
        cpsl.configure(portable="no")  # (it turned portable mode on)


def test_a_configure_with_one_bad_value_changes_nothing(tmp_path, monkeypatch):
    """Each value used to apply in turn: the store moved (and the old one closed), then a bad
    max_threads raised; or max_threads changed, then a bad keep_finished raised."""
    import threading

    import capsule_nb.app

    monkeypatch.setattr(capsule_nb.app, "_default", None)
    app = cpsl.configure(home=tmp_path / "first", max_threads=4, keep_finished=50)
    threads = threading.active_count()
    for bad, error in (({"home": tmp_path / "second", "max_threads": 0}, "max_threads must be a whole number"),
                       ({"max_threads": 3, "keep_finished": -1}, "keep_finished must be a whole number"),
                       ({"max_threads": 3, "cluster": "tcp://127.0.0.1:8786"},
                        "cluster must be a distributed.Client .*, got 'tcp://127.0.0.1:8786'")):
        with pytest.raises((ValueError, TypeError), match=error):
            cpsl.configure(**bad)
    with pytest.raises(TypeError, match="home is the path of a store folder, not 123"):
        cpsl.configure(portable=True, home=123)  # (w48: portable mode went on all the same)
    assert not capsule_nb.portable.is_portable()
    assert cpsl.configure() is app and not app._closed
    assert (app.runtime.max_threads, app.keep_finished) == (4, 50)
    assert not (tmp_path / "second").exists() and threading.active_count() == threads  # (the cluster's thread)
    with pytest.raises(ValueError, match="max_threads must be a whole number"):
        cpsl.App("other", home=tmp_path / "third", max_threads=0)
    assert not (tmp_path / "third").exists()  # checked before the store opens
    app.close()


@pytest.mark.parametrize("args, kwargs", [
    ((), {}), (("eu",), {}), (("eu", 2023), {}), (("eu", 2023, "csv"), {}), (("eu", 2023, "csv", "x"), {}),
    ((), {"region": "eu"}), (("eu",), {"region": "us"}), (("eu",), {"fmt": "csv", "year": 1}),
    ((), {"colour": "red"}),
])
async def test_a_submit_binds_its_arguments_as_python_does(logic_app, args, kwargs):
    """Every call a person may make: the run gets the arguments Python would bind, in the
    signature's order, or the submit fails with Python's reason and records nothing."""
    def report(region, year=2024, fmt="pdf", session=None):
        return [region, year, fmt]

    task = logic_app.task(report)
    try:
        bound = inspect.signature(report).bind(*args, **kwargs, session=None)
    except TypeError as exc:
        with pytest.raises(TypeError, match=re.escape(f"report.submit(): {exc}")):
            task.submit(*args, **kwargs)
        assert task.count() == 0
        return
    bound.apply_defaults()
    expected = {name: value for name, value in bound.arguments.items() if name != "session"}
    handle = task.submit(*args, **kwargs)
    assert list(handle.snapshot()["params"].items()) == list(expected.items())
    assert await handle.result() == list(expected.values())


@pytest.mark.parametrize("timeout, error", [(-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                            (True, TypeError), ("soon", ValueError)])
async def test_a_wait_timeout_that_is_no_duration_names_the_value(app, timeout, error):
    @app.task
    async def quick():
        return 1

    handle = quick.submit()
    with pytest.raises(error, match=re.escape(f"bad timeout {timeout!r}")):
        await handle.wait(timeout=timeout)
    with pytest.raises(error, match=re.escape(f"bad timeout {timeout!r}")):
        await handle.result(timeout=timeout)
    assert await handle.result(timeout="30s") == 1  # the words a task's timeout takes


def test_a_session_that_is_no_session_is_refused_at_submit(app):
    @app.task
    def job(session=None):
        pass

    with pytest.raises(TypeError, match=r"job.submit\(\): session must be a Session .*got 'ops'"):
        job.submit(session="ops")
    assert job.count() == 0


@pytest.mark.parametrize(
    "column, message",
    [
        (lambda: cpsl.Column("due", type="datetime"),
         r"column 'due': type must be one of .*'boolean'\), got 'datetime'"),
        (lambda: cpsl.Column("due", type=None), r"got None"),
        (lambda: cpsl.Column(""), r"a column's key is a non-empty field name, got ''"),
        (lambda: cpsl.Column(3), r"a column's key is a non-empty field name, got 3"),
        (lambda: cpsl.Column("due", label=["Due"]), r"column 'due': label must be text or None, got \['Due'\]"),
        (lambda: {"key": "due", "type": "when"}, r"got 'when'"),
        (lambda: {"label": "Due"}, r"has a 'key'; got \{'label': 'Due'\}"),
        (lambda: 42, r"has a 'key'; got 42"),
    ],
)
def test_a_bad_column_names_the_bad_value_and_declares_nothing(app, column, message):
    app.collection("threads", columns=["subject"]).insert_one({"subject": "kept"})
    with pytest.raises(ValueError, match=message):
        app.collection("threads", columns=[column()])
    assert '<th>subject</th>' in app.collection("threads")._repr_html_()  # the table declared before stays
    assert app.collection("threads").find_one({})["subject"] == "kept"


def test_a_run_id_that_is_no_string_is_a_type_error_naming_it(logic_app):
    @logic_app.task()
    def job():
        return 1

    handle = job.submit()
    for lookup in (logic_app.get_task, logic_app.tasks.get, logic_app.resubmit, logic_app.session.show_task):
        for bad in (None, 123):
            with pytest.raises(TypeError, match=f"a run id is a string, not {bad!r}"):
                lookup(bad)
    with pytest.raises(TypeError, match=rf"not <TaskHandle job {handle.task_id} .*pass its .task_id"):
        logic_app.get_task(handle)
    logic_app.session.show_task(handle)  # a handle, as in Capsule, still shows its card
    assert job.count() == 1  # and no bad lookup ran anything


@pytest.mark.parametrize("options, message", [
    ({"priority": 5}, "@task: unknown option 'priority'; Capsule's are retries, timeout, lock, retry_for, "
                      "callback_url, process, and capsule_nb adds backoff, display_name"),
    ({"process": "yes"}, "@task(job): process must be True or False, got 'yes'"),
    ({"process": 1}, "@task(job): process must be True or False, got 1"),
])
def test_an_unknown_or_malformed_task_option_is_named(app, options, message):
    with pytest.raises(TypeError, match=re.escape(message)):

        @app.task(**options)
        def job():
            pass


def test_configure_home_moves_the_default_app_and_closes_the_one_it_replaces(tmp_path, monkeypatch, caplog):
    """The default app made before ``configure(home=...)`` (by ``current_session()``, say) goes,
    with its maintenance of the old store; one that has tasks stays, and the move says so."""
    import capsule_nb.app

    monkeypatch.setattr(capsule_nb.app, "_default", None)
    monkeypatch.setenv("CAPSULE_NB_HOME", str(tmp_path / "first"))
    first = cpsl.configure()
    moved = cpsl.configure(home=tmp_path / "second")
    assert moved is not first and moved.home == (tmp_path / "second").resolve()
    assert first._closed
    assert cpsl.configure(home=tmp_path / "second") is moved  # the same store: the same app

    @moved.task
    def job():
        pass

    with caplog.at_level("WARNING", logger="capsule_nb"):
        third = cpsl.configure(home=tmp_path / "third")
    assert not moved._closed and "the 1 task(s) defined before it stay on" in caplog.text
    third.close()
    moved.close()


def test_a_card_or_board_given_the_wrong_kind_of_value_says_what_it_takes(app):
    from capsule_nb import ui

    for bad in (5, None):
        with pytest.raises(TypeError, match=f"give its TaskHandle or its id, not {bad!r}"):
            ui.TaskCard(bad)
    with pytest.raises(TypeError, match=r"filter is a dict such as \{'task_name': 'build_report'\}, not 'f'"):
        ui.TaskBoard(app=app, filter="f")
    with pytest.raises(TypeError, match="TaskBoard filter 'task_name' is a string or a list of strings, not 5"):
        ui.TaskBoard(app=app, filter={"task_name": 5})
    # (w46: these were taken, or failed with "'dict' object has no attribute 'label'")
    for label, statuses, error in ((123, ["running"], "label is a non-empty string, not 123"),
                                   ("a", None, r"'a': statuses is a list such as \['running'\], not None")):
        with pytest.raises(TypeError, match=error):
            ui.TaskBoardColumn(label, statuses)
    for columns, error in (([{"label": "x", "statuses": ["running"]}], r"not \{'label': 'x'"),
                           (["running"], "not 'running'"), ("running", "not 'running'")):
        with pytest.raises(TypeError, match=f"TaskBoard columns .*{error}"):
            ui.TaskBoard(app=app, columns=columns)
    with pytest.raises(ValueError, match="TaskBoardColumn 'A' needs at least one status"):
        ui.TaskBoardColumn("A", [])
    twice = [ui.TaskBoardColumn("Done", ["completed"]), ui.TaskBoardColumn("Done", ["failed"])]
    for columns in (twice, []):
        with pytest.raises(ValueError, match="at least one column, each with its own label"):
            ui.TaskBoard(app=app, columns=columns)


@pytest.mark.parametrize("call, message", [
    (lambda app, h: app.collection("notes", columns=5),
     "collection columns is a list of names, cpsl.Column or dicts, got 5"),
    (lambda app, h: cpsl.ui.TaskBoard(title=5, app=app), "TaskBoard title must be a string, got 5"),
    (lambda app, h: cpsl.ui.TaskCard(h, message=5), "TaskCard message must be a string, got 5"),
    (lambda app, h: cpsl.current_session().show_task(h, message=5), "show_task message must be a string, got 5"),
    (lambda app, h: cpsl.current_session().stream(5),
     "session.stream() takes an iterable or async iterable of text chunks, got 5"),
])
def test_a_widget_option_or_a_stream_of_the_wrong_type_is_named(app, call, message):
    """w54: the widget library's "The 'title' trait of a TaskCard instance expected a unicode
    string" named a trait the user never set; the others said only "'int' object is not iterable"."""
    @app.task
    def job():
        return 1

    handle = job.submit()
    with pytest.raises(TypeError, match=re.escape(message)):
        call(app, handle)


def test_a_task_and_a_schedule_of_one_app_never_share_a_name(app):
    """w54: their runs are kept by name, so each one's ``find``, ``count`` and ``runs`` gave the other's."""
    @app.task
    def sync_inbox():
        return "task"

    with pytest.raises(ValueError, match="app 'default' has a task named 'sync_inbox': a schedule of that name"):
        app.schedule("* * * * *", name="sync_inbox")(lambda: "schedule")

    @app.schedule("0 0 1 1 *")
    def report():
        pass

    with pytest.raises(ValueError, match="has a schedule named 'report': a task of that name would share its runs"):
        app.task(name="report")(lambda: None)
    assert app.registered("report") is None and app.registered_schedule("sync_inbox") is None
