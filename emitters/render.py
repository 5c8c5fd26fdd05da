"""Rich rendering of `distplan emit`'s result (CLI layer only; the emitters themselves never print)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skip": "[yellow]skip[/]"}  # fixed width 4


def render_emit(console: Console, result) -> None:
    em = result.emission
    for c in result.checks:  # one line each: they are long, and grep-able this way
        detail = f" - {c.detail}" if c.detail else ""
        console.print(f"{STATUS_STYLE.get(c.status, c.status)}  {c.name}{detail}", highlight=False, soft_wrap=True)
    if not result.written:
        return
    console.print(f"[bold]{em.target}[/]: wrote {len(result.written)} files to {result.out_dir}/ "
                  f"(plan {result.plan.digest()})", highlight=False, soft_wrap=True)
    files = Table()
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for path in result.written:
        files.add_row(path.name, f"{path.stat().st_size:,}")
    console.print(files)
    for note in em.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"[bold]launch[/] (from {result.out_dir}/):", highlight=False)
    console.print(em.launch, highlight=False, soft_wrap=True, markup=False)
