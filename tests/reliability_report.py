"""Write the reliability report (`make reliability`) from what the suite recorded.

    python tests/reliability_report.py <scenarios.jsonl> <junit.xml> <out.md> [<re-run junit.xml> ...]

Every scenario test appends a row (testutils.record_scenario) once its assertions passed; the
JUnit file says which tests ran, passed, failed or were skipped, so a failed scenario shows up
as failed even though it recorded nothing. Further JUnit files are re-runs: a test's last
result counts, and the report says which tests were re-run. The Markdown has one table row per scenario: the load
held, the faults injected, the bad inputs tried, what was lost, and the outcome with figures.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import machine  # noqa: E402


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def tests_from_junit(paths: list[Path]) -> dict[str, list[str]]:
    """passed / failed / skipped / rerun test names; a later file's result for a test replaces an earlier one."""
    last: dict[str, str] = {}
    rerun = []
    for i, path in enumerate(paths):
        for case in ET.parse(path).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if i and name in last:
                rerun.append(f"{name} ({last[name]} in the suite's run)")
            if case.find("failure") is not None or case.find("error") is not None:
                last[name] = "failed"
            elif case.find("skipped") is not None:
                last[name] = "skipped"
            else:
                last[name] = "passed"
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": [], "rerun": rerun}
    for name, result in last.items():
        outcome[result].append(name)
    return outcome


def render(rows: list[dict], tests: dict[str, list[str]], facts: dict) -> str:
    lines = ["# Reliability report", "",
             "Written by `make reliability` (tests/reliability_report.py) from the scenarios the suite recorded. "
             "A row appears only when its test's assertions passed; failed tests are listed below the table.", "",
             f"Tests: {len(tests['passed'])} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped.", "",
             "| area | scenario | load held | faults injected | bad inputs tried | lost | outcome |",
             "|---|---|---|---|---|---|---|"]
    order = {"training": 0, "serving": 1, "bad input": 2, "security": 3}
    for r in sorted(rows, key=lambda r: order.get(r["area"], 9)):
        lines.append("| " + " | ".join(_cell(r[k]) for k in ("area", "scenario", "load", "faults", "bad_inputs", "lost", "outcome")) + " |")
    if tests["failed"]:
        lines += ["", "## Failed", ""] + [f"- `{t}`" for t in tests["failed"]]
    if tests["rerun"]:
        lines += ["", "## Re-run on their own after the suite", ""] + [f"- `{t}`" for t in tests["rerun"]]
    lines += ["", "## Figures", "", "```json"] + [json.dumps({"scenario": r["scenario"], **r["figures"]}) for r in rows] + ["```"]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items() if v not in ("-", None, "")), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    scenarios, junit, out, *reruns = (Path(a) for a in argv)
    rows = [json.loads(line) for line in scenarios.read_text().splitlines() if line.strip()] if scenarios.is_file() else []
    if junit.is_file():
        tests = tests_from_junit([junit, *reruns])
    else:
        tests = {"passed": [], "failed": ["(no JUnit file: the suite did not run)"], "skipped": [], "rerun": []}
    out.write_text(render(rows, tests, machine()))
    print(f"{len(rows)} scenarios, {len(tests['failed'])} failed tests -> {out}")
    return 1 if tests["failed"] or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
