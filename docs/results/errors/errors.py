"""Which characters a bundled model's wrong answers confuse (docs/results/errors/README.md).

`python docs/results/errors/errors.py CHECKPOINT [trainer.evaluate options]` runs `python -m
trainer.evaluate` unchanged and records, for the final inner step under each batch-norm policy, every query it
gets wrong: the task, the true and the predicted character (alphabet/characterNN of images_evaluation), and
every task's alphabet (within-alphabet tasks). Writes errors.json beside the evaluation's results (--out) and prints
the pairs that recur. The background split only (the bundled models' split).
"""

import collections
import json
import sys
from pathlib import Path

import trainer.evaluate as evaluate
from trainer.data.omniglot import load_omniglot, omniglot_split_indices
from trainer.data.sampler import TaskSampler

argv = sys.argv[1:]
if not argv or "--out" not in argv:
    print("usage: errors.py CHECKPOINT --out DIR [trainer.evaluate options]", file=sys.stderr)
    sys.exit(2)
out = Path(argv[argv.index("--out") + 1])
calls, batches, alphabets, wrong = [], [], [], []

_sample = TaskSampler.sample


def sample(self, n, *a, **k):
    b = _sample(self, n, *a, **k)
    batches.append(b)
    alphabets.extend([] if b.alphabet is None else [self.alphabet_names[a] for a in b.alphabet.tolist()])
    calls.append([])
    return b


_metric = evaluate._query_metric


def metric(spec, logits, query_y):
    calls[-1].append((logits.argmax(-1).cpu(), query_y.cpu()))
    return _metric(spec, logits, query_y)


TaskSampler.sample = sample
evaluate._query_metric = metric
rc = evaluate.main(argv)
split = json.loads((out / "results.json").read_text())["split"]
if split != "background":
    print(f"errors.py: the evaluation ran on the {split!r} split, expected 'background'", file=sys.stderr)
    sys.exit(2)
data = load_omniglot(None)
test = omniglot_split_indices(data, "background", 0)["test"]
names = [data.characters[i] for i in test]
policies = ("transductive", "support")
done = 0
for b, chunk in zip(batches, calls):
    assert len(chunk) % 2 == 0, "expected the transductive and support policies only (no running statistics)"
    for policy, (pred, y) in zip(policies, chunk[-2:]):  # the final step's two policies
        for t, q in (pred != y).nonzero().tolist():
            true_c, pred_c = b.classes[t, y[t, q]].item(), b.classes[t, pred[t, q]].item()
            wrong.append({"policy": policy, "task": done + t, "query": q, "true": names[true_c],
                          "predicted": names[pred_c]})
    done += b.num_tasks
(out / "errors.json").write_text(json.dumps({"checkpoint": argv[0], "command": " ".join(sys.argv), "tasks": done,
                                             "task_alphabets": alphabets or None,
                                             "wrong": wrong}, indent=1))
for policy in policies:
    mine = [w for w in wrong if w["policy"] == policy]
    pairs = collections.Counter(tuple(sorted((w["true"], w["predicted"]))) for w in mine)
    tasks = collections.Counter(w["task"] for w in mine)
    same = sum(w["true"].split("/")[0] == w["predicted"].split("/")[0] for w in mine)
    print(f"{policy}: {len(mine)} wrong queries in {len(tasks)} of {done} tasks; same alphabet: {same}")
    for pair, n in pairs.most_common(15):
        print(f"  {n:3d}  {pair[0]}  <->  {pair[1]}")
sys.exit(rc)
