"""How much the MiniLM demo's conclusion depends on its learning-rate selection rule.

``make demo-full`` picks each method's lr on the validation split by "best accuracy; among lrs within
1 point of it, the best retrieval MRR". This script re-applies the rule with another tolerance to the
*same* validation trials (read from ``docs/demo/results.json``), runs the test seeds of every method
whose choice changes (reusing the rows whose lr and seed the full run already has), and writes
``docs/demo/tolerance<P>.md``/``.json``. ``--seeds``/``--methods`` restrict or extend them.

    python benchmarks/experiments/demo_selection_sensitivity.py --tolerance 0.02 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from rqcore_torch import calibrate, demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="docs/demo/results.json")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--seeds", default=None, help="comma list (default: the full run's)")
    p.add_argument("--methods", default=None, help="comma list (default: the full run's)")
    a = p.parse_args()
    report = json.loads(Path(a.results).read_text())
    cfg = demo.DemoConfig(
        **{
            f.name: report["config"][f.name]
            for f in fields(demo.DemoConfig)
            if f.name in report["config"]
        }
    )
    cfg.seeds = tuple(cfg.seeds)
    cfg.methods = tuple(cfg.methods)
    cfg.progress = False
    seeds = cfg.seeds if a.seeds is None else tuple(int(x) for x in a.seeds.split(","))
    methods = cfg.methods if a.methods is None else tuple(a.methods.split(","))
    chosen = {
        m: demo._select(t, a.tolerance) for m, t in report["lr_selection"].items() if m in methods
    }
    print("lrs with tolerance", a.tolerance, chosen)
    model_path = report["model"]
    encoder, tokenizer = demo.load_encoder(model_path)
    prep = demo.prepare(cfg, model_path, encoder, tokenizer)
    stats = calibrate(encoder, prep.calibration, progress=False, seed=cfg.seeds[0])
    rows = []
    have = set()
    for r in report["results"]:
        m = r["method"]
        if m in methods and r["seed"] in seeds and (m == "head" or chosen[m] == r["lr"]):
            rows.append(demo.MethodResult(**r))
            have.add((m, r["seed"]))
    for seed in seeds:
        for m, lr in chosen.items():
            if (m, seed) not in have:
                res = demo.run_method(m, prep, cfg, model_path, stats, seed, lr)
                print(f"{m} seed {seed} lr {lr:g}: acc {res.accuracy:.3f} MRR {res.mrr:.3f}")
                rows.append(res)
    order = {m: i for i, m in enumerate(demo.METHODS)}
    rows.sort(key=lambda r: (order[r.method], r.seed))
    summary = demo.summarize(rows)
    pre = (report["pretrained"]["recall_at_1"], report["pretrained"]["mrr"])
    table = demo.format_table(summary, pre)
    print(table)
    stem = Path(a.results).parent / f"tolerance{round(100 * a.tolerance)}"
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "tolerance": a.tolerance,
                "lrs": chosen,
                "seeds": list(seeds),
                "results": [vars(r) for r in rows],
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
