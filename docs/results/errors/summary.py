"""errors.py's errors.json as a table (summary.md): wrong queries per batch-norm policy, how many fall within one
alphabet, the pairs confused most often and, for within-alphabet tasks, the accuracy per alphabet.
`python docs/results/errors/summary.py DIR` reads DIR/errors.json and DIR/results.json, writes DIR/summary.md."""

import collections
import json
import sys
from pathlib import Path

if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "errors.json").is_file():
    print("usage: summary.py DIR (a folder holding errors.json and results.json)", file=sys.stderr)
    sys.exit(2)
folder = Path(sys.argv[1])
errors, results = (json.loads((folder / f).read_text()) for f in ("errors.json", "results.json"))
tasks, per_task = errors["tasks"], results["ways"] * results["queries"]
alphabet = lambda name: name.split("/")[0]  # noqa: E731
lines = [f"# Wrong queries of `{errors['checkpoint']}`", "",
         f"`{errors['command']}`: {tasks} {results['task_kind']} {results['ways']}-way {results['shots']}-shot tasks, "
         f"{per_task} queries each, after {results['steps']} steps.", "",
         "| policy | accuracy % | wrong queries | tasks with one or more | wrong within one alphabet |",
         "|---|---|---|---|---|"]
for policy in ("transductive", "support"):
    mine = [w for w in errors["wrong"] if w["policy"] == policy]
    same = sum(alphabet(w["true"]) == alphabet(w["predicted"]) for w in mine)
    lines.append(f"| {policy} | {100 - 100 * len(mine) / (tasks * per_task):.2f} | {len(mine)} of {tasks * per_task} | "
                 f"{len({w['task'] for w in mine})} | {same} |")
for policy in ("transductive", "support"):
    pairs = collections.Counter(tuple(sorted((w["true"], w["predicted"])))
                                for w in errors["wrong"] if w["policy"] == policy)
    top = sum(n for _, n in pairs.most_common(10))
    lines += ["", f"Pairs confused most often ({policy}; {len(pairs)} distinct pairs; the 10 below hold {top} of "
              f"the {sum(pairs.values())} wrong queries):", "",
              "| times | character | character |", "|---|---|---|"]
    lines += [f"| {n} | {a} | {b} |" for (a, b), n in pairs.most_common(10)]
if errors.get("task_alphabets"):
    count = collections.Counter(errors["task_alphabets"])
    wrong = {p: collections.Counter(errors["task_alphabets"][w["task"]] for w in errors["wrong"] if w["policy"] == p)
             for p in ("transductive", "support")}
    lines += ["", "Accuracy per alphabet (the task's alphabet; hardest first):", "",
              "| alphabet | tasks | transductive % | support % |", "|---|---|---|---|"]
    for name in sorted(count, key=lambda a: wrong["transductive"][a] / count[a], reverse=True):
        acc = {p: 100 - 100 * wrong[p][name] / (count[name] * per_task) for p in wrong}
        lines.append(f"| {name} | {count[name]} | {acc['transductive']:.2f} | {acc['support']:.2f} |")
(folder / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
