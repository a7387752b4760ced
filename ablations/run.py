"""Reproduce a paper table: `python ablations/run.py grid=table6` (or `python -m ablations.run ...`).

    grid=table3|table4|table5|table6|table7|figure5|continuous   which table (one file each in ablations/grids/)
    scale=demo|paper        demo: tiny models on the embedded demo set (default); paper: the paper's sizes
    executor=local|slurm|debug   profile=NAME (slurm/profiles/NAME.yaml, for executor=slurm)
    warm=true|false         local: fork each job from a process that imported torch once (default true)
    action=run|status|table|cancel    retry=true resubmits failed jobs
    rows=LABEL,LABEL        only these rows of the grid (default: all; a label may hold a comma)
    out=outputs             results: <out>/<scale>/{cells,data,stage1,calibration,jobs,logs,tables,figures}
    set.KEY=VALUE           override any cell key for every cell (e.g. set.train.steps=100)

Running the same grid again submits nothing that is done or running. On SLURM, every job is
submitted at once, chained by afterok dependencies; the launcher does not wait.
"""
from __future__ import annotations

from ablations import figures, ledger, outcomes, pipeline
from ablations.grid import load_grid
from ablations.plan import RunConfig, cells_of, check_assets, check_manifests, check_sources, parse, plan
from ablations.tables import Outcome, build_frame, write_tables
from siren import io


def main(argv: list[str] | None = None) -> int:
    from siren import cli

    run = parse(cli.start(argv))
    grid = load_grid(run.grid)
    cells = cells_of(grid, run)
    jobs = plan(cells, run)
    print(f"{grid.name}: {len(grid.rows)} rows -> {len(cells)} cells, {len(jobs)} jobs; scale={run.scale}, "
          f"executor={run.executor}; results under {run.root}")
    if run.action == "cancel":
        n = ledger.cancel_slurm(jobs, run.root)
        print(f"cancelled {n} job(s)" + ("" if n else " (no job recorded on SLURM is pending or running)"))
        return 0
    if run.action == "run":
        check_manifests(cells)
        check_sources(jobs)
        check_assets(cells)
        for cell in cells:  # what each cell directory is, for a reader browsing results
            io.write_json(cell.dir / "cell.json",
                          {"id": cell.id, "config": cell.cfg, "rows": [r.label for r in cell.rows]})
        for key in ledger.reopen_for_retry(jobs, run.root) if run.retry else ():
            print(f"retry: {key} runs again first, as a job reading its files failed (it remakes a damaged one)")
        if run.executor == "slurm":
            from ablations.executors import load_profile

            states = pipeline.submit_slurm(jobs, run.root, load_profile(run.profile), run.retry)
        else:
            states = pipeline.run_local(jobs, run.root, run.executor, run.retry, run.max_parallel, run.warm)
    else:
        states = ledger.current_states(jobs, run.root)
    print("\n".join(outcomes.status_lines(jobs, states)))
    if run.action == "run":
        print(f"submitted {sum(s.submitted for s in states.values())} job(s) in this call")
    if run.action == "status":
        return 0
    rows = {row.label: outcomes.outcome(cell, grid, run, states) for cell in cells for row in cell.rows}
    # a row that rows= left out was not asked for, so it is not pending either
    rows.update({r.label: Outcome({}, "not selected") for r in grid.rows if r.cell is not None and r.label not in rows})
    calibration = outcomes.calibration_outcomes(cells, grid, run, states)
    caption = outcomes.caption(run, cells, {**rows, **calibration})
    df = build_frame(grid, rows, outcomes.source(run, cells), calibration)
    paths = write_tables(df, grid, caption, run.root / "tables")
    print("\n" + paths["md"].read_text())  # the table itself, as written: what the run is for
    for ext, p in paths.items():
        print(f"{grid.name}.{ext}: {p}")
    for p in figures.draw(grid, cells, run, caption, run.root / "figures", {**rows, **calibration}):
        print(f"figure: {p}")
    failed = [s for s in states.values() if s.state in ledger.FINAL_BAD | {"FAILED"}]
    if failed:
        print(f"{len(failed)} job(s) failed; see the logs above; `retry=true` resubmits them")
    return 1 if failed else 0


if __name__ == "__main__":
    from siren.cli import run as run_cli

    run_cli(main, RunConfig, __doc__)
