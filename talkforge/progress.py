"""Live progress for long runs: one bar per stage, failures printed as they happen."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from talkforge.engine import StagePlan, StageSummary
from tasks.runner import Outcome


class RichReporter:
    """Engine reporter drawing rich progress bars (use as a context manager)."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage_planned(self, plan: StagePlan) -> None:
        cached = plan.count("cached") + plan.count("skip_failed")
        note = f"{cached} cached/skipped" if cached else ""
        if plan.blocked_reason:
            note = f"[yellow]blocked: {plan.blocked_reason}"
        self._tasks[plan.stage] = self.progress.add_task(
            plan.stage, total=max(len(plan.to_run), 1) if plan.to_run else 0, note=note
        )

    def item_finished(self, stage: str, outcome: Outcome) -> None:
        task = self._tasks.get(stage)
        if task is not None:
            self.progress.advance(task)
        if outcome.status == "failed":
            self.progress.console.print(
                f"  [red]✗[/] {stage} {outcome.item_id}: {outcome.error_kind}: "
                f"{outcome.error_message[:160]}"
            )
        elif outcome.status == "filtered":
            self.progress.console.print(
                f"  [yellow]–[/] {stage} {outcome.item_id} filtered: {outcome.error_message[:160]}"
            )

    def stage_finished(self, summary: StageSummary) -> None:
        task = self._tasks.get(summary.stage)
        if task is None:
            return
        parts = [f"{summary.done} done"]
        if summary.filtered:
            parts.append(f"{summary.filtered} filtered")
        if summary.failed:
            parts.append(f"[red]{summary.failed} failed[/]")
        if summary.cached or summary.skipped_failed:
            parts.append(f"{summary.cached + summary.skipped_failed} skipped")
        if summary.blocked_reason:
            parts.append(f"[yellow]blocked: {summary.blocked_reason}[/]")
        self.progress.update(task, note=", ".join(parts))
