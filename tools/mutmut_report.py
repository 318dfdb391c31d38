"""Summarise a mutmut 3.8.1 run: per-module counts and the diff of every mutant that was not killed.

Run from the repository root after `mutmut run` (it reads mutants/*.meta through mutmut's own loader):

    python tools/mutmut_report.py OUTDIR

Writes OUTDIR/mutmut_summary.json (counts per module and status), OUTDIR/mutmut_summary.md (the same as a
table, with the share killed among checked mutants) and OUTDIR/mutmut_survivors.txt (one `mutmut show`-style
diff per survivor, timeout, suspicious or no-tests mutant, grouped by module).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

# Statuses a follow-up has to read; "killed" needs nothing and "not checked" has no verdict yet.
TO_READ = ("survived", "timeout", "suspicious", "no tests", "segfault")


def module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts)


def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    diffs: list[str] = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            continue
        statuses = {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
        counts = Counter(statuses.values())
        checked = sum(counts.values()) - counts["not checked"]
        summary[module_name(Path(path))] = {
            "total": len(statuses),
            "checked": checked,
            # timeouts count as killed, as in mutmut's own badge score; "not checked" mutants have no verdict yet
            "killed_share": round((counts["killed"] + counts["timeout"]) / checked, 4) if checked else None,
            "counts": dict(sorted(counts.items())),
        }
        for name, status in sorted(statuses.items()):
            if status in TO_READ:
                try:
                    diff = get_diff_for_mutant(name, path=path)
                except Exception as err:  # a diff we cannot rebuild must not hide the others
                    diff = f"(diff unavailable: {err!r})\n"
                diffs.append(f"# {name}: {status}\n{diff}\n")
    (out / "mutmut_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = ["| module | mutants | checked | killed+timeout share | counts |", "| --- | ---: | ---: | ---: | --- |"]
    for module, s in summary.items():
        share = "n/a" if s["killed_share"] is None else f"{100 * s['killed_share']:.1f}%"
        counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
        rows.append(f"| {module} | {s['total']} | {s['checked']} | {share} | {counts} |")
    (out / "mutmut_summary.md").write_text("\n".join(rows) + "\n")
    (out / "mutmut_survivors.txt").write_text("".join(diffs) or "(no survivors)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/mutmut_report.py OUTDIR")
    main(sys.argv[1])
