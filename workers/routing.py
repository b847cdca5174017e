"""Which queued jobs a woken worker process claims: model-aware routing and batching.

A generation message does not bind its job to the process that receives it; it wakes one
process, which claims the work that suits it best from the head of the queue (one read,
storage/claims.py). Every job has one message, and every message claims at most one batch, so
the jobs claimed never outrun the messages; a message whose job went elsewhere claims another.

The policy, for the jobs of the most urgent priority level among the first `CLAIM_WINDOW`:

1. The message's own job, when it was claimed before and lost its holder (a dead process, an
   expired lease), runs first: the message re-drives it.
2. Otherwise the first job in queue order, except that a job whose model this process does not
   hold is skipped when it is better left: another worker node holds its model warm and is
   expected free (its claimed work predicted done) sooner than this process could load the model
   (the model's last measured load time). The first job skipped is handed to that node with a
   message of its own (Celery's worker-direct queue), so that it never waits for a message that
   went elsewhere; a message handed over is never handed over again. Nothing else is skipped: a
   job nobody holds warm is loaded by the first process free, in its turn, so no model starves.
3. With batching on, the jobs after the chosen one, of the same level and batch key (same model,
   kind, size, steps, scheduler, guidance, LoRA set...), join it while their images fit the
   batch size.

Nothing is ever skipped for a process of the same node: a node's pool processes share its
messages, so routing is between nodes (one GPU each, as the deployment guide runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.claims import QueuedJob, WorkView


@dataclass(frozen=True, slots=True)
class Plan:
    take: tuple[int, ...] = ()
    """The jobs to claim, the batch's leader first."""
    recover: bool = False
    """`take` is the message's own job, claimed before and lost by its holder."""
    hand_off: tuple[int, str] | None = None
    """(job id, node): a job skipped for a node that holds its model warm, to be sent there."""


def plan(
    view: WorkView,
    *,
    own_job: int,
    node: str,
    warm: frozenset[str],
    batch_images: int,
    routed: bool = False,
) -> Plan:
    """What the process of Celery node `node`, holding the models `warm`, claims on a message
    for `own_job` (`routed`: a message another node handed over)."""
    if view.own_recoverable():
        return Plan(take=(own_job,), recover=True)
    if not view.head:
        return Plan()
    level = view.head[0].level
    candidates = [job for job in view.head if job.level == level]
    hand_off: tuple[int, str] | None = None
    for index, job in enumerate(candidates):
        if job.model_id not in warm and not routed:
            target = better_node(job, view, node)
            if target is not None:
                if hand_off is None:
                    hand_off = (job.id, target)
                continue
        batch = batch_after(job, candidates[index + 1 :], batch_images)
        return Plan(take=(job.id, *batch), hand_off=hand_off)
    return Plan(hand_off=hand_off)


def better_node(job: QueuedJob, view: WorkView, node: str) -> str | None:
    """The node of another worker that holds `job`'s model warm and is expected free before a
    load here would end; None when loading here is as fast (or nothing is known)."""
    load = view.load_seconds.get(job.model_id)
    if load is None:
        return None
    best: tuple[float, str] | None = None
    for process in view.processes:
        if process.node is None or process.node == node or job.model_id not in process.models:
            continue
        wait = max(0.0, process.busy_until - view.now)
        if best is None or wait < best[0]:
            best = (wait, process.node)
    if best is None or best[0] >= load:
        return None
    return best[1]


def batch_after(leader: QueuedJob, rest: list[QueuedJob], batch_images: int) -> list[int]:
    """The jobs of `rest`, in order, that share `leader`'s pipeline call: the same batch key,
    while the images of the call stay within `batch_images`."""
    if not leader.batch_key or batch_images <= leader.samples:
        return []
    members: list[int] = []
    images = leader.samples
    for job in rest:
        if job.batch_key != leader.batch_key or images + job.samples > batch_images:
            continue
        members.append(job.id)
        images += job.samples
        if images == batch_images:
            break
    return members
