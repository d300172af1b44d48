"""Column steps whose length settles: the experiment behind RESULTS.md section 11, "A settling column step".

    .venv/bin/python tools/column_settle.py bench stream --mode replace --facts F --per-request 100 --requests 1 \
        --settings '{"optimizer": "column", "lr": 2.0}' --out OUT

Runs any `lune-fast` command with ColumnSteps.settle on (lune_fast.optim): each column's length halves when its
gradient reverses direction and grows back ×1.2 up to lr while it keeps it. A plain column step has one length
whatever the gradient, so it swings around an answer it must bring precisely over a threshold (replace mode on
CounterFact: the 60-step cap); this one settles. Not yet a run setting: measured on two runs only.
"""
from __future__ import annotations

import sys

from lune_fast import optim
from lune_fast.cli import main

if __name__ == "__main__":
    optim.ColumnSteps.settle = True
    sys.exit(main(sys.argv[1:]))
