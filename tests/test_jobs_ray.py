"""Corpus jobs on the Ray engine: a local Ray instance (2 CPUs) and the tiny GPT-2 of test_jobs.

Ray's start-up takes ~10 s on two cores and each job starts its actors (one model load each),
so the instance is shared by the module and the tests are few.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_jobs import CONFIG, by_id, make_tiny_model, random_rows, stable, write_jsonl

from heta_fast import attribute_dataset
from heta_fast.jobs.local import CRASH_ONCE_ENV
from heta_fast.jobs.ray_engine import one_batch_per_block

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The actors run one torch thread each; the local engine compared with them bitwise must too (two
    threads sum in another order: the last bits differ, as CI saw with OMP_NUM_THREADS unset)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    # The hook is read in the actors, so it goes into their environment when Ray starts.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {CRASH_ONCE_ENV: f"crash-me:{marker}", "OMP_NUM_THREADS": "1"}})
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2-ray"))


def test_ray_engine_writes_the_local_engines_rows(tmp_path, tiny_model, ray_instance, fresh_seed):
    rows = random_rows(fresh_seed, 8) + [{"id": "bad", "text": "the cat", "target_pos": 5}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    local = attribute_dataset(source, tmp_path / "local.jsonl", model=tiny_model, config=CONFIG, quiet=True)
    remote = attribute_dataset(source, tmp_path / "ray.jsonl", model=tiny_model, config=CONFIG, quiet=True,
                               engine="ray", actors=2, threads=1, batch_size=2)
    assert (remote.done, remote.skipped, remote.failed) == (local.done, local.skipped, local.failed) == (8, 0, 1)
    want = {k: stable(v) for k, v in by_id(tmp_path / "local.jsonl").items()}
    assert {k: stable(v) for k, v in by_id(tmp_path / "ray.jsonl").items()} == want
    # resume on Ray: nothing left to do
    again = attribute_dataset(source, tmp_path / "ray.jsonl", model=tiny_model, config=CONFIG, quiet=True,
                              engine="ray")
    assert (again.done, again.skipped, again.failed) == (0, 9, 0)


def test_actor_killed_mid_job_is_restarted_and_nothing_is_lost(tmp_path, tiny_model, ray_instance, fresh_seed):
    rows = random_rows(fresh_seed, 12)
    rows.insert(5, {"id": "crash-me", "text": "the cat sat on the mat"})
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    report = attribute_dataset(source, tmp_path / "out.parquet", model=tiny_model, config=CONFIG, quiet=True,
                               engine="ray", actors=2, threads=1, batch_size=2)
    assert os.path.exists(ray_instance), "the actor running 'crash-me' did not exit"
    assert (report.done, report.skipped, report.failed) == (13, 0, 0)
    got = by_id(tmp_path / "out.parquet")  # by_id asserts each id once
    assert sorted(got) == sorted(r["id"] for r in rows)
    attribute_dataset(source, tmp_path / "local.jsonl", model=tiny_model, config=CONFIG, quiet=True)
    assert {k: stable(v) for k, v in got.items()} == {k: stable(v) for k, v in by_id(tmp_path / "local.jsonl").items()}


def test_each_batch_is_its_own_block(ray_instance):
    """The driver gets rows a block at a time; with one batch per block no finished batch waits
    for another (a 50-row read block held 50 finished rows back in the 200-prompt run)."""
    ds = ray.data.from_items([{"id": str(i)} for i in range(11)], override_num_blocks=2)
    blocks = [len(b["id"]) for b in one_batch_per_block(ds, 3).iter_batches(batch_size=None)]
    # Ray Data does not keep block order (preserve_order is off); the sizes are what matters
    assert sorted(blocks, reverse=True) == [3, 3, 3, 2]
