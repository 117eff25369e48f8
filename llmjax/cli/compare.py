"""`llmjax compare --grid FILE --workdir DIR`: train every cell of a grid (a model family x an objective) for the
same FLOP budget and compare them on the same held-out yardsticks (llmjax.compare)."""

from __future__ import annotations

import argparse
from llmjax import storage
from llmjax.cli.flags import setup_logging
from llmjax.config import check_workdir
from llmjax.compare import CELLS, __doc__ as compare_doc, compare, load_grid, results_table
from llmjax.models.config import ConfigError

EXAMPLE = "llmjax compare --grid configs/compare/objectives.py --workdir runs/compare"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmjax compare", description=compare_doc.split("\n\n")[0],
                                     epilog=f"example: {EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="grid file with get_grid(), e.g. configs/compare/objectives.py")
    parser.add_argument("--workdir", required=True, help="cells, RESULTS.md, results.json and plots go here")
    parser.add_argument("--max-cells", type=int, default=None,
                        help="train at most this many unfinished seed runs (cells x seeds)")
    parser.add_argument("--budget-flops", type=float, default=None, help="override the grid's budget_flops")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per cell (train seeds grid.seed .. grid.seed + N - 1); overrides grid.seeds")
    ns = parser.parse_args(args)
    setup_logging()
    grid = load_grid(ns.grid)  # a ConfigError becomes one line in llmjax.cli.main
    check_workdir(ns.workdir)  # a file, an unwritable directory or an unreachable gs:// URL: one line, now
    if ns.budget_flops is not None:
        grid.budget_flops = ns.budget_flops
    if ns.seeds is not None:
        if ns.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {ns.seeds}")
        grid.seeds = ns.seeds
    results = compare(grid, ns.workdir, max_cells=ns.max_cells)
    print(results_table(results))
    print(f"wrote {storage.path(ns.workdir) / 'RESULTS.md'}, results.json, loss_vs_flops.png, yardsticks.png")
    failed = [r["name"] for r in results["cells"] if r["status"] == "failed"]
    if failed:
        print(f"failed cells: {', '.join(failed)} (see {storage.path(ns.workdir) / CELLS}/<name>/[seed<k>/]error.txt); "
              "run again to retry them", flush=True)
        return 1
    return 0
