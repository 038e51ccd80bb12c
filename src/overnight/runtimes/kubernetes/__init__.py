"""Kubernetes runtimes: the objects they create (``manifests``), pure and typed.

See docs/kubernetes.md.
"""

from overnight.runtimes.kubernetes.manifests import (
    ANNOTATION_PREFIX,
    ANNOTATIONS,
    BATCH_LABEL,
    EXIT_UNRECOVERABLE,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PODINFO_DIR,
    ManifestError,
    PodInfo,
    object_name,
    parse_annotations,
    pod_info,
    render_deployment,
    render_job,
    render_service,
)

__all__ = [
    "ANNOTATIONS",
    "ANNOTATION_PREFIX",
    "BATCH_LABEL",
    "EXIT_UNRECOVERABLE",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "PODINFO_DIR",
    "ManifestError",
    "PodInfo",
    "object_name",
    "parse_annotations",
    "pod_info",
    "render_deployment",
    "render_job",
    "render_service",
]
