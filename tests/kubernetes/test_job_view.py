"""What the service reads from a Job's pods and status: problems in words, completion, failure."""

from __future__ import annotations

from overnight.runtimes.kubernetes.job import JobWatch, pod_problems


def _pod(name: str, *, phase: str = "Pending", conditions=(), init=(), containers=()) -> dict:
    return {"metadata": {"name": name}, "status": {"phase": phase, "conditions": list(conditions),
                                                   "initContainerStatuses": list(init),
                                                   "containerStatuses": list(containers)}}


def test_unschedulable_and_image_pull_problems_are_named() -> None:
    pod = _pod("p0", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}])
    problems, unsched = pod_problems(pod)
    assert unsched and problems == ["pod p0 cannot be scheduled: 0/4 nodes are available: 4 Insufficient "
                                    "nvidia.com/gpu."]
    pod = _pod("p1", init=[{"name": "engine", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "vllm/vllm-openai:nope"'}}}])
    problems, unsched = pod_problems(pod)
    assert not unsched and problems == ['pod p1 container engine: ImagePullBackOff: Back-off pulling image '
                                        '"vllm/vllm-openai:nope"']
    # starting normally is not a problem
    ok = _pod("p2", init=[{"name": "engine", "state": {"waiting": {"reason": "ContainerCreating"}}}])
    assert pod_problems(ok) == ([], False)


def test_the_view_reads_the_job_conditions_and_failed_workers() -> None:
    w = JobWatch(kube=None, handle={"namespace": "ns", "name": "ovn-x", "batch_id": "batch_x", "uid": "u1"})
    w._apply("Job", "ADDED", {"metadata": {"uid": "u1"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "Job has failed indexes"}]}})
    w._apply("Pod", "ADDED", _pod("ovn-x-1-abc", phase="Failed", containers=[
        {"name": "worker", "state": {"terminated": {"exitCode": 42, "reason": "Error"}}}]))
    w._apply("Pod", "ADDED", _pod("ovn-x-0-def", phase="Running"))
    # another incarnation of the same name is ignored
    w._apply("Job", "MODIFIED", {"metadata": {"uid": "u2"}, "status": {"conditions": [
        {"type": "Complete", "status": "True"}]}})
    v = w.view()
    assert v.exists and v.failed and not v.complete
    assert v.reason == "FailedIndexes: Job has failed indexes"
    assert v.exits == ["pod ovn-x-1-abc: exit code 42 (Error)"]
    assert v.pods == {"Failed": 1, "Running": 1}
    assert not v.synced
    w._apply("Job", "SYNCED", {})
    w._apply("Pod", "SYNCED", {})
    assert w.view().synced
    w._apply("Job", "DELETED", {"metadata": {"uid": "u1"}})
    assert not w.view().exists
