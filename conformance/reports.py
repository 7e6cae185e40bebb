"""Conformance reports: JSON (everything), Markdown (a matrix readable on its own), JUnit XML."""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from specrun.errors import SpecrunError

from .suite import CHECKS, Run

SYMBOL = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "xfail": "xfail", "xpass": "**XPASS**",
          "not_applicable": "n/a"}
ORDER = ["error", "failed", "xpass", "xfail", "passed", "not_applicable"]


REPORT_FILES = {"json": "conformance.json", "markdown": "conformance.md", "junit": "conformance.xml"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(path: Path, text: str) -> None:
    """Atomically, readable like any file the user writes (mkstemp makes 0600 files; CI jobs that
    collect the reports as another user could not read them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_report_dir(out: Path) -> None:
    """Refuse, before a run starts, a --report that cannot take the reports: a file, a folder whose
    report names are folders, or a place that cannot be written (found only after a long run, else)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecrunError(f"--report {out} is a file; give a folder for {', '.join(REPORT_FILES.values())}")
    for name in REPORT_FILES.values():
        if (out / name).exists() and not (out / name).is_file():
            raise SpecrunError(f"{out / name} exists and is not a file; give another --report folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpecrunError(f"--report {out}: {parent} is a file, so the folder cannot be made; give another --report")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecrunError(f"cannot write the reports into {out}: {parent} is not writable; give another --report")


def column(run: Run) -> str:
    return f"{run.backend_name} {run.device} {run.precision}"


def worst(statuses: Sequence[str]) -> str:
    return min(statuses, key=ORDER.index) if statuses else "not_applicable"


def markdown(runs: Sequence[Run]) -> str:
    lines = ["# specrun conformance", ""]
    lines.append("Reference: torch_cuda on CPU in fp32. Each cell is the worst status over the models the check ran on "
                 "(pass, xfail = expected failure with a reason, n/a = the backend lacks a needed capability).")
    lines.append("")
    lines.append("| check | " + " | ".join(column(r) for r in runs) + " |")
    lines.append("| --- |" + " --- |" * len(runs))
    for check in CHECKS:
        cells = []
        for r in runs:
            rs = [x for x in r.results if x.check == check.id]
            if not rs:
                cells.append("not run")
                continue
            w = worst([x.status for x in rs])
            errs = [x.max_abs for x in rs if x.max_abs is not None and check.id != "C05"]
            extra = f" ({max(errs):.1e})" if errs and w in ("passed", "failed") else ""
            cells.append(SYMBOL[w] + extra)
        lines.append(f"| {check.id} {check.name} | " + " | ".join(cells) + " |")
    lines.append("| **verdict** | " + " | ".join("**PASS**" if r.ok else "**FAIL**" for r in runs) + " |")
    lines.append("")
    lines.append("Numbers in parentheses: the largest max-abs logit error over the models (see the JSON for every value; "
                 "C05 compares hidden states by their relative L2 error per position.)")
    for r in runs:
        lines += ["", f"## {column(r)}", ""]
        versions = ", ".join(f"{k} {v}" for k, v in r.as_dict()["runtime_versions"].items())
        lines.append(f"package {r.package} {r.package_version}; {versions}; tolerances: {r.tolerance.source}; "
                     f"{len(r.results)}/{r.expected_count} checks in {r.seconds:.0f} s")
        lines.append("")
        lines.append("| check | model | status | max abs | tolerance | worst position | note |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for x in r.results:
            note = x.message.replace("|", "/") if x.status != "passed" else _note(x.details)
            mx = f"{x.max_abs:.2e}" if x.max_abs is not None else ""
            tol = f"{x.tolerance:.1e}" if x.tolerance is not None else ""
            pos = str(x.worst_position) if x.worst_position is not None else ""
            lines.append(f"| {x.check} {x.name} | {x.model} | {SYMBOL[x.status]} | {mx} | {tol} | {pos} | {note} |")
        for p in r.problems:
            lines.append(f"\n**run problem:** {p}")
    return "\n".join(lines) + "\n"


def _note(details: dict) -> str:
    if "divergences" in details and details["divergences"]:
        d = details["divergences"][0]
        if "reference_gap" in d:
            return f"near-tie divergence at token {d['position']} (reference scores it {d['reference_gap']:.2e} below its best)"
        return f"near-tie divergence at token {d['position']} ({d.get('drafter', '')}, own top-2 margin {d['margin']:.2e})"
    if "p_value" in details:
        return f"chi-square p = {details['p_value']:.3f} (alpha {details['alpha']}, {details['runs']} runs)"
    if details.get("near_ties"):
        return f"{len(details['near_ties'])} near-tie proposal differences"
    return ""


def junit(runs: Sequence[Run]) -> str:
    suites = ET.Element("testsuites", name="specrun-conformance")
    for r in runs:
        s = ET.SubElement(suites, "testsuite", name=column(r), tests=str(len(r.results)),
                          failures=str(sum(x.status in ("failed", "xpass") for x in r.results)),
                          errors=str(sum(x.status == "error" for x in r.results)),
                          skipped=str(sum(x.status in ("not_applicable", "xfail") for x in r.results)),
                          time=f"{r.seconds:.2f}")
        for x in r.results:
            case = ET.SubElement(s, "testcase", classname=f"conformance.{r.backend_name}.{r.device}.{r.precision}",
                                 name=f"{x.check}-{x.name}[{x.model}]", time=f"{x.seconds:.3f}")
            if x.status in ("failed", "xpass"):
                ET.SubElement(case, "failure", message=x.message).text = x.message
            elif x.status == "error":
                ET.SubElement(case, "error", message=x.message).text = x.message
            elif x.status in ("not_applicable", "xfail"):
                ET.SubElement(case, "skipped", message=x.message)
        for p in r.problems:
            case = ET.SubElement(s, "testcase", classname=f"conformance.{r.backend_name}", name="run-integrity")
            ET.SubElement(case, "failure", message=p).text = p
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(runs: Sequence[Run], out: Path) -> dict[str, Path]:
    out = Path(out)
    paths = {k: out / name for k, name in REPORT_FILES.items()}
    _write(paths["json"], json.dumps({"ok": all(r.ok for r in runs), "runs": [r.as_dict() for r in runs]}, indent=2, default=str))
    _write(paths["markdown"], markdown(runs))
    _write(paths["junit"], junit(runs))
    return paths
