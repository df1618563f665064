"""Summarise a `make mutate` run: mutants per module (killed / survived / no test / timeout) and
the surviving ones, read from mutmut's result files under mutants/ (run from the project root).

    python benchmarks/mutation_report.py [--survivors]
"""
import argparse
import collections
import fnmatch
import json
import re
import shlex
from pathlib import Path

# mutmut's exit codes: 1 killed by a failing test, 0 survived, 33 no test reaches it,
# 24/36/152/255 timeouts or crashes (counted as killed by mutmut, listed apart here).
NAMES = {1: "killed", 0: "survived", 33: "no tests", None: "not run"}


def scope() -> list:
    text = Path("Makefile").read_text()
    block = re.search(r"^MUTATE \?= (.*?)\n(?!\s)", text, re.S | re.M).group(1)
    return shlex.split(block.replace("\\\n", " "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survivors", action="store_true", help="list every surviving mutant")
    a = ap.parse_args()
    patterns = scope()
    table = collections.defaultdict(collections.Counter)
    survivors = []
    for meta in sorted(Path("mutants/src").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for key, code in data["exit_code_by_key"].items():
            if not any(fnmatch.fnmatch(key, p) for p in patterns):
                continue
            module = key[:key.index(".x")]          # cifarkit.training.state.xǁEpochSumsǁadd__mutmut_3
            kind = NAMES.get(code, "timeout")
            table[module][kind] += 1
            if code == 0:
                survivors.append(key)
    print(f"{'module':<28} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}")
    total = collections.Counter()
    for module, c in sorted(table.items()):
        total.update(c)
        n = sum(c.values())
        tested = n - c["no tests"] - c["not run"]
        score = (c["killed"] + c["timeout"]) / tested if tested else float("nan")
        print(f"{module:<28} {n:>7} {c['killed']:>7} {c['timeout']:>7} {c['survived']:>8} {c['no tests']:>8} {score:>6.1%}")
    n = sum(total.values())
    tested = n - total["no tests"] - total["not run"]
    print(f"{'all':<28} {n:>7} {total['killed']:>7} {total['timeout']:>7} {total['survived']:>8} "
          f"{total['no tests']:>8} {(total['killed'] + total['timeout']) / max(tested, 1):>6.1%}")
    if a.survivors:
        print("\nsurvived:")
        for key in survivors:
            print("  " + key)


if __name__ == "__main__":
    main()
