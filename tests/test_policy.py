"""The collection's failure policy, case by case, without Ray (collectors/policy.py)."""

import pytest

from collectors.policy import Decision, Fault, FaultKind, WorkerAction, decide, pool_size


def test_a_sweep_that_fails_by_itself_fails_at_once_and_the_worker_goes_on():
    d = decide(Fault(FaultKind.SWEEP_FAILED, "SweepDiverged: loss is nan", "a", unpublished=("b",), attempts={"a": 0}))
    assert d == Decision(WorkerAction.KEEP, charged=("a",), failed=(("a", "SweepDiverged: loss is nan"),))


def test_a_dead_worker_is_replaced_its_sweep_retried_and_its_unpublished_sweeps_rerun_for_free():
    d = decide(Fault(FaultKind.WORKER_DIED, "worker died: ActorDiedError", "a", unpublished=("b", "c"), attempts={"a": 1}, max_retries=2))
    assert d == Decision(WorkerAction.REPLACE, charged=("a",), retry=("a", "b", "c"))


def test_a_dead_worker_fails_the_sweep_once_its_retries_are_spent():
    d = decide(Fault(FaultKind.WORKER_DIED, "worker died: ActorDiedError", "a", unpublished=("b",), attempts={"a": 2}, max_retries=2))
    assert d.worker is WorkerAction.REPLACE and d.charged == ("a",)
    assert d.failed == (("a", "worker died: ActorDiedError (on all 3 attempts)"),) and d.retry == ("b",)


def test_no_retries_at_all():
    d = decide(Fault(FaultKind.WORKER_DIED, "worker died: X", "a", max_retries=0))
    assert d.failed == (("a", "worker died: X (on all 1 attempts)"),) and d.retry == ()


def test_a_worker_dying_during_a_flush_charges_nothing():
    d = decide(Fault(FaultKind.WORKER_DIED, "worker died: X", None, unpublished=("b",), attempts={"b": 5}, max_retries=0))
    assert d == Decision(WorkerAction.REPLACE, retry=("b",))


def test_a_failed_write_charges_every_sweep_the_discarded_shard_held():
    d = decide(Fault(FaultKind.WRITE_FAILED, "shard write failed: OSError", "a", unpublished=("b", "c"),
                     attempts={"a": 0, "b": 1, "c": 0}, max_retries=1))
    assert d.worker is WorkerAction.REPLACE and d.charged == ("a", "b", "c")
    assert d.retry == ("a", "c") and d.failed == (("b", "shard write failed: OSError (on all 2 attempts)"),)


def test_a_failed_flush_charges_the_unpublished_sweeps():
    d = decide(Fault(FaultKind.WRITE_FAILED, "shard write failed: OSError", None, unpublished=("b",)))
    assert d == Decision(WorkerAction.REPLACE, charged=("b",), retry=("b",))


@pytest.mark.parametrize(("failed_starts", "action"), [(1, WorkerAction.REPLACE), (2, WorkerAction.REPLACE), (3, WorkerAction.RETIRE)])
def test_a_worker_that_cannot_start_is_replaced_then_retired(failed_starts, action):
    d = decide(Fault(FaultKind.START_FAILED, "worker could not start: ActorDiedError", max_retries=2, failed_starts=failed_starts))
    assert d == Decision(action)


def test_a_sweep_failure_without_a_sweep_is_a_bug_named_clearly():
    with pytest.raises(ValueError, match="needs the sweep"):
        decide(Fault(FaultKind.SWEEP_FAILED, "boom"))


def test_the_pool_is_sized_by_the_request_not_by_the_cluster():
    assert pool_size(8, cluster_cpus=0, cpus_per_worker=1, sweeps=100) == 8  # an empty autoscaling cluster
    assert pool_size(8, cluster_cpus=2, cpus_per_worker=1, sweeps=3) == 3  # never more workers than sweeps
    assert pool_size(None, cluster_cpus=5, cpus_per_worker=2, sweeps=100) == 2  # a fixed cluster: what fits now
    with pytest.raises(ValueError, match="--num-workers"):
        pool_size(None, cluster_cpus=0, cpus_per_worker=1, sweeps=4)
    with pytest.raises(ValueError, match="got 0"):
        pool_size(0, cluster_cpus=4, cpus_per_worker=1, sweeps=4)
