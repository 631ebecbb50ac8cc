#!/usr/bin/env bash
# The served meta-test of this run's model.pt (support and query views cross2, 5 steps, as the bundled omniglot-20w1s
# is served) on the 600 tasks of every other row: random and within one alphabet, into served/ (the wide run's
# evaluate.sh with RUN set to this folder; THREADS, PARALLEL as there).
RUN=docs/results/omniglot-20w1s-wide-allclasses exec "$(dirname "$0")/../omniglot-20w1s-wide/evaluate.sh" "$@"
