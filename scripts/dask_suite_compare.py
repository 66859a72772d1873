#!/usr/bin/env python3
"""Compare per-test outcomes of two runs of distributed's test suite (helper of dask-suite.sh).

Each side is one or more pytest ``--junitxml`` files (or folders of them). A test's outcome is
one of passed, failed, error, skipped, xfailed, xpassed; a test absent from a side is
``missing``. Tests whose outcome differs between the baseline (no preload) and the plugin run
(``dask_gpuresources`` preloaded into every scheduler) are printed; when rechecks are given
(the differing tests run again, both ways), each difference is classified:

* ``consistent``: every baseline attempt agrees, every plugin attempt agrees, and the two
  disagree -- the plugin most likely changes this test's behaviour;
* ``flaky in the baseline``: the baseline itself changed outcome between attempts -- noise;
* ``flaky with the plugin``: only the plugin side changed between attempts -- probably noise,
  worth a look if it recurs.

Usage::

    dask_suite_compare.py --baseline B.xml [B2.xml|DIR ...] --plugin P.xml [...]
        [--recheck-baseline XML ...] [--recheck-plugin XML ...]
        [--write-differing FILE] [--markdown FILE]

Exit status: 0 when no consistent difference, 1 when there is one, 2 on bad input.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter

GOOD = {"passed", "skipped", "xfailed", "xpassed"}


def _files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths or []:
        if os.path.isdir(p):
            out.extend(sorted(glob.glob(os.path.join(p, "*.xml"))))
        elif os.path.exists(p):
            out.append(p)
    return out


def _nodeid(case: ET.Element) -> str:
    """pytest node id from a junit testcase (xunit1 carries ``file``; else rebuild it)."""
    name = case.get("name", "?")
    classname = case.get("classname", "")
    path = case.get("file")
    if path:
        module = os.path.splitext(path)[0].replace("/", ".").replace(os.sep, ".")
        rest = classname[len(module) :].lstrip(".") if classname.startswith(module) else ""
        return "::".join([path, *([rest] if rest else []), name])
    parts = classname.split(".")
    # distributed's test folders are flat: tests.test_x[.TestClass]
    for i in range(len(parts), 0, -1):
        if parts[i - 1].startswith("test_"):
            return "::".join(["/".join(parts[:i]) + ".py", *parts[i:], name])
    return "::".join([classname, name])


def _outcome(case: ET.Element) -> str:
    failure = case.find("failure")
    error = case.find("error")
    skipped = case.find("skipped")
    if failure is not None:
        return "failed"
    if error is not None:
        # an error in setup/teardown of a test that otherwise ran
        return "error"
    if skipped is not None:
        if skipped.get("type") == "pytest.xfail":
            return "xfailed"
        return "skipped"
    return "passed"


def _message(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        el = case.find(tag)
        if el is not None:
            msg = (el.get("message") or "").strip().splitlines()
            return msg[0][:240] if msg else tag
    return ""


def load(paths: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    times: dict[str, float] = {}
    for f in _files(paths):
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as err:
            print(f"warning: cannot parse {f}: {err}", file=sys.stderr)
            continue
        for case in root.iter("testcase"):
            nid = _nodeid(case)
            out = _outcome(case)
            # a test can appear twice (call failure + teardown error): keep the worst
            prev = outcomes.get(nid)
            if prev is None or (prev in GOOD and out not in GOOD):
                outcomes[nid] = out
                messages[nid] = _message(case)
            times[nid] = times.get(nid, 0.0) + float(case.get("time") or 0)
    return outcomes, messages, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", nargs="+", required=True)
    ap.add_argument("--plugin", nargs="+", required=True)
    ap.add_argument("--recheck-baseline", nargs="*", default=[])
    ap.add_argument("--recheck-plugin", nargs="*", default=[])
    ap.add_argument("--write-differing", help="write the differing node ids here, one a line")
    ap.add_argument("--markdown", help="also write the result as a markdown fragment here")
    args = ap.parse_args(argv)

    base, base_msg, base_t = load(args.baseline)
    plug, plug_msg, plug_t = load(args.plugin)
    if not base and not plug:
        print("no test results found", file=sys.stderr)
        return 2
    rb = [load([f])[0] for f in _files(args.recheck_baseline)]
    rp = [load([f])[0] for f in _files(args.recheck_plugin)]

    lines: list[str] = []
    md: list[str] = []

    def emit(s: str = "") -> None:
        lines.append(s)

    for label, res, t in (
        ("baseline (no preload)", base, base_t),
        ("plugin (preloaded)", plug, plug_t),
    ):
        c = Counter(res.values())
        summary = ", ".join(f"{c[k]} {k}" for k in sorted(c))
        emit(f"{label}: {len(res)} tests: {summary}; test time {sum(t.values()):.0f}s")
        md.append(
            f"- {label}: {len(res)} tests: {summary}; summed test time {sum(t.values()):.0f} s"
        )

    ids = sorted(set(base) | set(plug))
    differing = [n for n in ids if base.get(n, "missing") != plug.get(n, "missing")]
    both_bad = [
        n for n in ids if base.get(n) not in GOOD | {None} and plug.get(n) not in GOOD | {None}
    ]
    missing = [
        n for n in differing if "missing" in (base.get(n, "missing"), plug.get(n, "missing"))
    ]
    real = [n for n in differing if n not in missing]

    consistent: list[str] = []
    flaky: list[str] = []
    flaky_base: list[str] = []
    unchecked: list[str] = []
    for n in real:
        b_all = [base[n]] + [r[n] for r in rb if n in r]
        p_all = [plug[n]] + [r[n] for r in rp if n in r]
        if len(b_all) == 1 and len(p_all) == 1:
            unchecked.append(n)
        elif len(set(b_all)) == 1 and len(set(p_all)) == 1:
            consistent.append(n)
        elif len(set(b_all)) > 1:
            flaky_base.append(n)
        else:
            flaky.append(n)

    def row(n: str) -> str:
        b_all = [base.get(n, "missing")] + [r[n] for r in rb if n in r]
        p_all = [plug.get(n, "missing")] + [r[n] for r in rp if n in r]
        msg = plug_msg.get(n) if plug.get(n) not in GOOD else base_msg.get(n, "")
        s = f"{n}: baseline {'/'.join(b_all)} -> plugin {'/'.join(p_all)}"
        return s + (f"\n      {msg}" if msg else "")

    emit()
    emit(
        f"differing tests: {len(real)}"
        + (f" (+{len(missing)} run on one side only)" if missing else "")
    )
    groups = [
        ("consistent difference (confirmed by a rerun: likely caused by the plugin)", consistent),
        ("difference not rechecked", unchecked),
        ("flaky in the baseline (no preload) itself: not evidence against the plugin", flaky_base),
        (
            "flaky with the plugin (its outcome changed between plugin attempts; baseline"
            " stable): look again if it recurs",
            flaky,
        ),
        ("run on one side only (crash, timeout or collection difference)", missing),
    ]
    for title, group in groups:
        if not group:
            continue
        emit(f"== {title}: {len(group)}")
        md.append(f"\n**{title}: {len(group)}**\n")
        for n in group:
            emit("  " + row(n))
            first, *rest = row(n).split("\n")
            md.append(
                f"- `{first.split(': baseline')[0]}`: baseline{first.split(': baseline', 1)[1]}"
                + (f"<br>`{rest[0].strip()}`" if rest else "")
            )
    emit(f"== failing or erroring in both runs (environment, not the plugin): {len(both_bad)}")
    md.append(
        f"\n**failing or erroring in both runs (environment, not the plugin): {len(both_bad)}**\n"
    )
    for n in both_bad:
        emit(f"  {n}: {base[n]} / {plug[n]}  {base_msg.get(n, '')[:160]}")
        md.append(f"- `{n}`: {base[n]} / {plug[n]}")

    print("\n".join(lines))
    if args.write_differing:
        with open(args.write_differing, "w") as f:
            f.write("".join(n + "\n" for n in real))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    return 1 if consistent or unchecked else 0


if __name__ == "__main__":
    sys.exit(main())
