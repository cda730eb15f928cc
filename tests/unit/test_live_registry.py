"""A replica's registry as it changes: what each change adds, changes and removes, the version of a content,
and a bad registry refused whole with the messages of start-up (or, with nothing to keep, raised)."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from serve_app.core.live_registry import (
    LiveRegistry,
    content_version,
    diff,
    parse_user_config,
    registry_user_config,
)
from serve_app.core.registry import Registry, RegistryError, read_registry_file


def entry(model_id, path=None, task="text-classification", **extra):
    return {"id": model_id, "task": task, "source": {"path": f"models/{model_id}" if path is None else path}, **extra}


def config(*entries, origin="config/models.json"):
    return registry_user_config({"models": list(entries)}, origin=origin)


def test_the_version_is_the_content_not_its_layout():
    a = {"models": [entry("a", description="x"), entry("b")]}
    relaid = json.loads(json.dumps(a, indent=4, sort_keys=True))
    assert content_version(a) == content_version(relaid) and len(content_version(a)) == 12
    assert content_version(a) != content_version({"models": [entry("a", description="y"), entry("b")]})


def test_the_first_registry_adds_every_model():
    live = LiveRegistry()
    assert not live.ready and live.status().version is None
    change = live.apply(config(entry("a"), entry("b")))
    assert change.added == ["a", "b"] and change.stale == [] and change.previous is None
    assert live.ready and live.registry.ids == ["a", "b"]
    status = live.status()
    assert status.version == change.version and status.models == 2 and status.applied_at and status.refused is None


def test_a_change_says_what_was_added_changed_and_removed():
    live = LiveRegistry()
    first = live.apply(config(entry("keep"), entry("moved"), entry("retask"), entry("gone"), entry("relabel")))
    change = live.apply(
        config(
            entry("keep"),
            entry("moved", path="models/elsewhere"),
            entry("retask", task="image-classification"),
            entry("relabel", labels=["x", "y"], description="new words", preload=True),
            entry("new"),
        )
    )
    assert change.previous == first.version and change.version != first.version
    assert change.added == ["new"]
    assert change.changed == ["moved", "retask"]  # the files or the task: a loaded copy no longer serves
    assert change.removed == ["gone"]
    assert change.stale == ["moved", "retask", "gone"]
    assert live.registry.get("relabel").labels == ["x", "y"]  # in force, though its copy stays loaded
    assert "added new; changed moved, retask; removed gone" in change.describe()


def test_the_same_registry_again_changes_nothing():
    live = LiveRegistry()
    first = live.apply(config(entry("a")))
    applied_at = live.applied_at
    again = live.apply(config(entry("a")))
    assert again.version == first.version and again.added == again.changed == again.removed == []
    assert live.applied_at == applied_at


@pytest.mark.parametrize(
    "bad, field",
    [
        ([entry("a"), entry("b", task="translation")], "models.1.task: unknown task 'translation'"),
        ([entry("a"), entry("a", path="models/other")], "models.1.id: duplicate model id 'a'"),
        ([entry("a"), {**entry("b"), "source": {"hub_id": "not a hub id", "revision": "main"}}], "models.1.source"),
        ([entry("a"), entry("b", path="")], "models.1.source"),
    ],
)
def test_a_bad_registry_is_refused_whole_and_the_one_in_force_stays(bad, field, tmp_path):
    live = LiveRegistry()
    good = live.apply(config(entry("a"), entry("c")))
    assert live.apply(config(*bad)) is None
    assert live.version == good.version and live.registry.ids == ["a", "c"]
    refused = live.status().refused
    assert refused.version == content_version({"models": bad}) and refused.at >= live.applied_at
    assert refused.message.startswith("config/models.json: ") and field in refused.message
    # the message is the one start-up gives for the same file
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": bad}))
    with pytest.raises(RegistryError) as at_start:
        read_registry_file(path)
    assert refused.message == str(at_start.value).replace(str(path), "config/models.json")
    # the next good registry is taken, and the refusal is gone
    assert live.apply(config(entry("a"))) is not None and live.status().refused is None


def test_with_no_registry_to_keep_a_bad_one_raises():
    with pytest.raises(RegistryError, match=r"models\.0\.task"):
        LiveRegistry().apply(config(entry("a", task="nope")))
    with pytest.raises(RegistryError, match="no 'registry' key"):
        LiveRegistry().apply(None)  # a deployment deployed without the registry's user_config
    with pytest.raises(RegistryError, match="no registry applied yet"):
        _ = LiveRegistry().registry


def test_parse_names_its_origin_and_versions_the_content():
    registry, version = parse_user_config(config(entry("a"), origin="serveConfigV2"))
    assert isinstance(registry, Registry) and version == content_version({"models": [entry("a")]})
    with pytest.raises(RegistryError, match=r"^serveConfigV2: models\.0\.id"):
        parse_user_config(config(entry(""), origin="serveConfigV2"))


def test_versions_run_before_are_remembered():
    live = LiveRegistry()
    v1 = live.apply(config(entry("a"))).version
    v2 = live.apply(config(entry("b"))).version
    assert live.has_run(v1) and live.has_run(v2) and not live.has_run("0123456789ab")


def test_a_request_sent_under_a_reverted_registry_is_behind_until_the_revert_is_applied_here(monkeypatch):
    """A to B and back to A: the revert's version is A's content hash again, which this replica has run. A
    request its sender sent under A after applying the revert (later than this replica applied B) is behind;
    one sent under A before the change to B is not (the change reached this replica since)."""
    from serve_app.core import live_registry as module

    clock = iter([100.0, 200.0, 300.0])
    monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: next(clock)))
    live = LiveRegistry()
    a = live.apply(config(entry("a"))).version  # applied at 100
    b = live.apply(config(entry("b"))).version  # at 200
    assert not live.behind(b) and live.behind("0123456789ab")
    assert not live.behind(a, applied_at=150.0)  # sent under A before B reached this replica
    assert live.behind(a, applied_at=250.0)  # sent under the revert to A, which this replica has not applied
    assert not live.behind(a)  # a sender that says nothing of when: as before, a version run here is not waited for
    live.apply(config(entry("a")))  # the revert, at 300
    assert not live.behind(a, applied_at=250.0)


def test_a_waiter_wakes_at_the_next_change_or_gives_up():
    live = LiveRegistry()
    live.apply(config(entry("a")))

    async def scenario():
        waiter = asyncio.ensure_future(live.wait_for_change(30))
        await asyncio.sleep(0)  # one step of the loop: the waiter waits for the next change now
        assert not waiter.done()
        live.apply(config(entry("b")))
        woke = await waiter
        return woke, await live.wait_for_change(0.01)

    assert asyncio.run(scenario()) == (True, False)


def test_diff_of_nothing_adds_everything():
    new = Registry.from_dict({"models": [entry("a")]})
    assert diff(None, new, "v").added == ["a"]


def test_a_replica_checks_a_registry_on_a_thread_and_its_event_loop_answers_meanwhile(monkeypatch):
    """A registry of thousands of entries takes seconds to check (a review: 20,000 held /healthz 4.3 s):
    the check runs off the loop; here it waits for the loop to run something first, which a check on the
    loop would never see."""
    import threading

    from serve_app.core import live_registry

    real = live_registry.parse_user_config
    loop_ran = threading.Event()
    threads = []

    def slow_check(*args, **kwargs):
        threads.append(threading.current_thread())
        assert loop_ran.wait(5), "the event loop did not run while the registry was checked"
        return real(*args, **kwargs)

    monkeypatch.setattr(live_registry, "parse_user_config", slow_check)

    async def scenario():
        live = LiveRegistry()
        applying = asyncio.ensure_future(live.apply_checked_off_loop(config(entry("a"))))
        await asyncio.sleep(0.01)
        loop_ran.set()
        change = await applying
        refused = await live.apply_checked_off_loop(config(entry("a", task="nope")))
        return live, change, refused

    live, change, refused = asyncio.run(scenario())
    assert change.added == ["a"] and refused is None and "unknown task" in live.refused.message
    assert threading.main_thread() not in threads and len(threads) == 2


def test_a_registry_of_many_errors_is_refused_with_the_first_twenty_and_a_count():
    entries = [entry(f"m{i}", task="nope") for i in range(100)]
    with pytest.raises(RegistryError) as e:
        parse_user_config(config(*entries))
    lines = str(e.value).splitlines()
    assert len(lines) == 21 and "models.0.task" in lines[0] and lines[-1].endswith("and 80 more errors")
