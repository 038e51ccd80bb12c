"""Default limits, timings and retry counts, each with the reason it has its value."""

from __future__ import annotations

#: OpenAI's own per-file limits for batch input; configurable because self-hosted
#: users often run larger files.
MAX_REQUESTS_PER_FILE = 50_000
MAX_INPUT_BYTES = 200 * 1024 * 1024
#: JSON request bodies (batch create ...) are small; this bounds what a request may buffer.
MAX_JSON_BODY_BYTES = 1024 * 1024

#: OpenAI's metadata limits.
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512

#: Concurrency: start where a single GPU engine is comfortably busy (well below
#: vLLM's and SGLang's default batch sizes of 256 and more), let the adaptive limit
#: find the rest: every doubling it saves is a round trip of a half-idle engine.
#: The global cap bounds sockets and memory of one replica.
INITIAL_CONCURRENCY = 64
MIN_CONCURRENCY = 1
MAX_CONCURRENCY_PER_BATCH = 1024
MAX_CONCURRENCY_GLOBAL = 4096

#: Retries: five attempts with exponential backoff covers an engine restart of
#: tens of seconds; overload (429) and unreachable engines are retried until the
#: batch deadline instead, since giving up on them would turn an outage into
#: lost requests.
MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
REQUEST_TIMEOUT_S = 600.0

#: The largest engine answer read: far above any real completion or embedding
#: (a 128k-token answer is well under 1 MiB of JSON), low enough that a runaway
#: engine cannot fill the service's memory with a few answers.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

#: A lease must outlive a few missed heartbeats (GC pauses, slow store) but be short
#: enough that a dead replica's batches move within seconds.
LEASE_S = 15.0
HEARTBEAT_S = 2.0

#: Checkpoint at most this often: the spool already holds every finished line, so
#: the checkpoint only bounds how much of the spool a restart has to re-scan.
CHECKPOINT_INTERVAL_S = 1.0

#: How often the scheduler looks for claimable batches when nothing wakes it.
SCHEDULER_POLL_S = 0.5

#: How many batches one replica executes at once.
MAX_RUNNING_BATCHES = 16

#: Engine outages: a batch whose engine has been unreachable for
#: ENGINE_YIELD_AFTER_S gives its running slot up (checkpointed) and is tried again
#: ENGINE_RECHECK_S later, so a dead engine does not hold slots other batches could
#: use; after ENGINE_UNREACHABLE_TIMEOUT_S without a break the batch fails, since a
#: wrong URL or a gone engine rarely comes back by itself and waiting out a 24 h
#: window would hide it.
ENGINE_YIELD_AFTER_S = 5.0
ENGINE_RECHECK_S = 10.0
ENGINE_UNREACHABLE_TIMEOUT_S = 600.0
#: How long ``serve`` waits for its default engine to answer at start.
ENGINE_CHECK_TIMEOUT_S = 5.0

#: Read chunk for streaming files from storage.
READ_CHUNK_BYTES = 1024 * 1024

#: Adaptive concurrency: the queue kept at an engine that publishes vLLM metrics is
#: max(METRICS_MIN_WAITING, METRICS_WAITING_FRACTION x running): enough that the
#: engine never idles between our requests, short enough not to add latency.
METRICS_MIN_WAITING = 4
METRICS_WAITING_FRACTION = 0.10
#: How often the engine's /metrics is read while batches use it.
METRICS_POLL_S = 0.25
#: Overload answers with no success for this long (or two round trips, if longer)
#: mean an outage: nothing new is sent until Retry-After / a backoff has passed.
OUTAGE_AFTER_S = 1.0
#: A batch is urgent (goes first on a shared engine) in the last fraction of its
#: completion window, or when finishing it at the engine's full rate would take
#: more than half of the time it has left.
DEADLINE_URGENT_FRACTION = 0.1
DEADLINE_URGENT_FACTOR = 2.0

#: A running batch that finishes no request for this long logs a warning with its
#: concurrency state and where its request tasks wait (a stall is visible in the log).
STALL_WARN_S = 60.0
