"""Build data/lung_demo from the team's shared LC25000 lung bundle (../shared/data/lung).

Deterministic: per split and class, groups (near-duplicate clusters from groups.csv) are taken
round-robin in sorted order so the demo covers as many distinct originals as possible; the file
bytes are copied unchanged. The train split keeps the bundle's imbalance (10 : 3.3 : 1).

    python data/make_lung_demo.py [--src ../shared/data/lung]
"""

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

COUNTS = {"train": {"lung_aca": 120, "lung_n": 40, "lung_scc": 12},
          "val": {"lung_aca": 20, "lung_n": 20, "lung_scc": 20},
          "test": {"lung_aca": 30, "lung_n": 30, "lung_scc": 30}}


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(here.parents[1] / "shared" / "data" / "lung"))
    ap.add_argument("--dst", default=str(here / "lung_demo"))
    args = ap.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    rows = list(csv.DictReader(open(src / "groups.csv")))
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["split"], r["class"])][r["group_id"]].append(r)
    kept = []
    for (split, cls), groups in sorted(by.items()):
        want = COUNTS[split][cls]
        queues = [sorted(v, key=lambda r: r["file"]) for _, v in sorted(groups.items())]
        picked, i = [], 0
        while len(picked) < want and any(queues):
            q = queues[i % len(queues)]
            if q:
                picked.append(q.pop(0))
            i += 1
        for r in picked:
            out = dst / r["file"]
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / r["file"], out)
        kept += picked
    with open(dst / "groups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(kept, key=lambda r: r["file"]))
    print(f"wrote {len(kept)} tiles to {dst}")


if __name__ == "__main__":
    main()
