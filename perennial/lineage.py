"""A lineage's record: every task its versions learned, in order, and the accuracy matrix over them.

A retrain that continues a registered version (lineage.continue_from, tasks/lineage.py) adds rows
to the record of the version it continues; the registered version carries the record
(`lineage.json`, committed beside its checkpoint in S3, and its tags), so the next retrain reads
the rows of earlier retrains instead of recomputing them. Pure data: no torch, no services.

Columns are the tasks in the order they were first learned. Row 0 scores the lineage's model
before its first continual tuning; each later row scores the model after one training stage, and
names the task it trained, the dataset version it read and the retrain (run key) that added it.
A cell a row was never scored on (a task that arrived later) is None.
"""

from __future__ import annotations

from pydantic import BaseModel

from perennial.cl_metrics import AccuracyMatrix, trained_label

LINEAGE_FILE = "lineage.json"


class LineageTask(BaseModel):
    """A column: a task and where its test records are (the dataset version it was last trained on)."""

    name: str
    dataset: str  # the dataset holding it
    subset: bool  # its records are those of `dataset` whose `task` field is `name` (a dataset of several tasks)
    digest: str  # version digest
    uri: str  # s3:// URI of that version
    chance: float | None = None


class LineageRow(BaseModel):
    """One row of the lineage's accuracy matrix."""

    stage: str  # "before-cit", or the training stage (cit-NN-<task>)
    run_key: str  # the retrain that added the row
    mlflow_run_id: str
    scores: dict[str, float | None]  # task -> score (accuracy in [0, 1]); a missing task was not scored
    corrected: dict[str, float | None] = {}  # task -> the same answers with the output bias taken out (docs/metrics.md)
    task: str | None = None  # the task this stage trained (None for row 0 and a joint stage)
    dataset_digest: str | None = None  # the version of the task's dataset it trained on
    records: int | None = None  # train records of the stage (a continued task: its new records only)
    # A joint stage (cit.multitask) trained several tasks at once: task -> the version of its dataset it read.
    joint: dict[str, str] = {}

    @property
    def trained(self) -> str | list[str] | None:
        """What the row trained: its task, the tasks of a joint stage (a list), or None (row 0)."""
        return list(self.joint) if self.joint else self.task

    def trains(self, name: str) -> bool:
        return name == self.task or name in self.joint

    def digest_of(self, name: str) -> str | None:
        """The version of task ``name``'s dataset this row trained on."""
        return self.joint.get(name) if self.joint else self.dataset_digest


class LineageRecord(BaseModel):
    tasks: list[LineageTask] = []
    rows: list[LineageRow] = []

    @property
    def history(self) -> list[LineageRow]:
        """The training stages of the lineage, oldest first."""
        return self.rows[1:]

    def task(self, name: str) -> LineageTask | None:
        return next((task for task in self.tasks if task.name == name), None)

    def last_trained(self, name: str) -> LineageRow | None:
        """The latest row that trained task ``name``, or None when the lineage never learned it."""
        return next((row for row in reversed(self.history) if row.trains(name)), None)

    def matrix(self) -> AccuracyMatrix:
        """The accuracy matrix over every task of the lineage (cl_metrics), rows oldest first."""
        names = [task.name for task in self.tasks]
        return AccuracyMatrix(tasks=names, rows=[[row.scores.get(name) for name in names] for row in self.rows],
                              trained=[row.trained for row in self.history])

    def row_labels(self) -> list[str]:
        """Per row: what it scores and which retrain added it ("after feed-2 (nightly-20990102)")."""
        return [("before" if row.trained is None else trained_label(row.trained)) + f" ({row.run_key})" for row in self.rows]

    def history_text(self, limit: int = 5000) -> str:
        """The task history in one line, for a registry tag: `task@digest12 (run key)`, oldest first, cut to ``limit``."""
        text = ", ".join(("joint[" + ", ".join(f"{name}@{digest[:12]}" for name, digest in row.joint.items()) + "]" if row.joint
                          else f"{row.task}@{(row.dataset_digest or '')[:12]}") + f" ({row.run_key})" for row in self.history)
        return text if len(text) <= limit else "..." + text[-(limit - 3):]
