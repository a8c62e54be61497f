"""Stage (a) of scripts/gpu-check: every reference fixture through `latentserve-worker generate` on
the device, against transformers on the same device and dtype (hf_fixtures.py, run beside it)
and against the committed reference.json (transformers f32 on the CPU).

Tolerances, as worker/tests/reference_fixtures.rs: f32 logits within 1e-4 and greedy tokens
identical; f16 weights within 2e-2 of the f32 reference.

Half precision (bf16, or f16 against transformers computing in f16) against transformers in the
same dtype: by default twice transformers' own half-vs-f32 error on that fixture and device
(max |transformers half - transformers f32| over the logits, measured in the same run): two
half-precision implementations that round in a different order can each be that far from the
exact value, on opposite sides. On the CPU, transformers bf16 differs from f32 by 0.06-0.13
on these fixtures (logits up to 13.6). --half-tolerance sets a fixed value instead.

Greedy tokens must be identical to transformers' in the stated dtype: f32 where the worker runs
f32 on the device (then the half-precision greedy comparison is reported as `numerics`, not
deciding: the fixtures' smallest greedy margin is 0.06, below half-precision noise), else the
half dtype.
"""

from __future__ import annotations

import json
import re
import subprocess

from check_common import REPO, kill_group, last_json, run, tail

STAGE = "fixtures"
FIXTURES = REPO / "worker" / "tests" / "fixtures"
F32_TOLERANCE = 1e-4
F16_REFERENCE_TOLERANCE = 2e-2


def max_abs_diff(a: list[float], b: list[float]) -> float | None:
    if len(a) != len(b):
        return None
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def run_stage(ctx, clock) -> dict:
    args, log, results, worker = ctx.args, ctx.log, ctx.results, ctx.worker
    fixtures = sorted(p for p in FIXTURES.iterdir() if (p / "reference.json").exists())
    if args.fixtures:
        wanted = set(args.fixtures.split(","))
        fixtures = [p for p in fixtures if p.name in wanted]
    offered = worker.dtypes("generate")
    dtypes = []
    for dtype in args.dtypes.split(","):
        if dtype in offered:
            dtypes.append(dtype)
        else:
            results.skip(STAGE, f"dtype {dtype}", f"the worker's generate offers --dtype {', '.join(offered)} only")
    out: dict = {"fixtures": [p.name for p in fixtures], "dtypes": dtypes, "worker_dtypes": offered, "runs": []}

    # transformers runs beside the worker (both are small); its lines arrive one by one.
    hf_path = ctx.out_dir / "transformers-fixtures.jsonl"
    hf_path.write_text("")
    hf_proc = None
    if args.skip_transformers:
        results.skip(STAGE, "transformers on the device", "--skip-transformers")
    else:
        cmd = [args.python, str(REPO / "scripts" / "gpu" / "hf_fixtures.py"),
               "--fixtures", ",".join(str(p) for p in fixtures),
               "--device", ctx.torch_device, "--dtypes", ",".join(dtypes), "--out", str(hf_path)]
        log(f"$ {' '.join(cmd)}   (in the background)")
        hf_err = open(ctx.logs_dir / "hf-fixtures.err", "w")
        hf_proc = subprocess.Popen(cmd, stdout=hf_err, stderr=hf_err, cwd=REPO, start_new_session=True)

    ours: dict = {}
    for fixture in fixtures:
        reference = json.loads((fixture / "reference.json").read_text())
        for dtype in dtypes:
            key = f"{fixture.name}/{dtype}"
            if not clock.has(5):
                results.skip(STAGE, f"worker {key}", "out of time")
                continue
            cmd = [worker.binary, "generate", "--model", str(fixture),
                   "--prompt-ids", ",".join(str(i) for i in reference["prompt_ids"]),
                   "--max-new-tokens", str(len(reference["greedy_ids"])), "--temperature", "0",
                   "--ignore-eos", "--json", "--logits", "--dtype", dtype] + worker.device_args("generate")
            res = run(cmd, clock.timeout(args.generate_timeout), log, f"generate-{fixture.name}-{dtype}", ctx.logs_dir)
            parsed = last_json(res["stdout"]) if res["rc"] == 0 else None
            if parsed is None:
                why = "timed out" if res["timed_out"] else f"exit {res['rc']}: {tail(res['stderr'], 2)}"
                ours[key] = {"error": why}
                if res["rc"] not in (0, None) and re.search(r"unsupported|not supported", res["stderr"], re.I) \
                        and dtype in res["stderr"].lower():
                    # "f32 where supported": a dtype the device refuses is not judged, not failed.
                    ours[key]["unsupported"] = True
            else:
                ours[key] = {"first_logits": parsed.get("first_logits", []),
                             "generated_ids": parsed.get("generated_ids", []), "seconds": round(res["seconds"], 2)}

    hf: dict = {}
    if hf_proc is not None:
        try:
            hf_proc.wait(timeout=max(1.0, clock.left()))
        except subprocess.TimeoutExpired:
            kill_group(hf_proc)
            results.skip(STAGE, "part of transformers' fixture runs", "out of time (stopped at the stage's end)")
        for line in hf_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "versions":
                out["transformers_versions"] = record
                ctx.environment["transformers_probe"] = record
            elif record.get("kind") == "fixture":
                hf[f"{record['fixture']}/{record['dtype']}"] = record
        if hf_proc.returncode not in (0, None) and not hf:
            out["transformers_error"] = tail((ctx.logs_dir / "hf-fixtures.err").read_text(errors="replace"), 8)

    for fixture in fixtures:
        reference = json.loads((fixture / "reference.json").read_text())
        ref_logits = reference["logits"][-1]
        ref_ids = reference["greedy_ids"]
        for dtype in dtypes:
            key = f"{fixture.name}/{dtype}"
            row: dict = {"fixture": fixture.name, "dtype": dtype, "device": worker.device}
            mine = ours.get(key)
            if mine is None:
                row["worker"] = "not run (out of time)"
                out["runs"].append(row)
                continue
            if mine.get("unsupported"):
                row["worker_error"] = mine["error"]
                results.skip(STAGE, f"worker {key}", f"the worker does not support it here: {mine['error'][:300]}")
                out["runs"].append(row)
                continue
            if "error" in mine:
                row["worker_error"] = mine["error"]
                results.check(STAGE, f"{key}: worker runs", "correctness", None, "generate succeeds", False, mine["error"])
                out["runs"].append(row)
                continue
            row["worker_seconds"] = mine["seconds"]
            row["worker_ids"] = mine["generated_ids"]
            # Against the committed reference (transformers f32 on the CPU, exact stored weights).
            diff = max_abs_diff(mine["first_logits"], ref_logits)
            same = mine["generated_ids"] == ref_ids
            row["vs_reference"] = {"max_abs_logit_error": diff, "greedy_ids_match": same}
            if dtype == "f32" or dtype == "f16":
                tol = F32_TOLERANCE if dtype == "f32" else F16_REFERENCE_TOLERANCE
                results.check(STAGE, f"{key}: logits vs reference.json", "correctness", diff,
                              f"<= {tol:g}", diff is not None and diff <= tol)
                results.check(STAGE, f"{key}: greedy ids vs reference.json", "correctness", same, "identical", same)
            else:
                row["vs_reference"]["note"] = "informational: the reference is f32; the bf16 target is against transformers in bf16"
            # Against transformers on the same device and dtype.
            theirs = hf.get(key)
            if theirs is None:
                if hf_proc is not None:
                    results.skip(STAGE, f"transformers {key}", "not reached in time")
                row["vs_transformers"] = "not run"
            elif "error" in theirs:
                row["vs_transformers"] = {"error": theirs["error"]}
                results.check(STAGE, f"{key}: greedy ids vs transformers on {ctx.torch_device}", "correctness",
                              None, "identical", None, f"transformers could not run it: {theirs['error'][:300]}")
            else:
                diff = max_abs_diff(mine["first_logits"], theirs["first_logits"])
                same = mine["generated_ids"] == theirs["greedy_ids"]
                row["vs_transformers"] = {"max_abs_logit_error": diff, "greedy_ids_match": same,
                                          "transformers_ids": theirs["greedy_ids"],
                                          "transformers_seconds": round(theirs["seconds"], 2)}
                if theirs.get("note"):
                    row["vs_transformers"]["note"] = theirs["note"]
                tol, note, greedy_kind = F32_TOLERANCE, "", "correctness"
                if dtype != "f32":
                    hf_f32 = hf.get(f"{fixture.name}/f32", {})
                    own = (max_abs_diff(theirs["first_logits"], hf_f32["first_logits"])
                           if "first_logits" in hf_f32 else None)
                    row["vs_transformers"]["transformers_half_vs_f32"] = own
                    if args.half_tolerance is not None:
                        tol, note = args.half_tolerance, "fixed by --half-tolerance"
                    elif own is not None:
                        tol, note = max(2 * own, 1e-3), f"2 x transformers' own {dtype}-vs-f32 error ({own:.4g})"
                    else:
                        tol, note = 0.3, "transformers f32 missing: fallback 0.3 (2 x 0.13, CPU rehearsal)"
                    f32_ok = "first_logits" in ours.get(f"{fixture.name}/f32", {})
                    if f32_ok:
                        greedy_kind = "numerics"
                results.check(STAGE, f"{key}: logits vs transformers on {ctx.torch_device}", "correctness", diff,
                              f"<= {tol:.4g}", diff is not None and diff <= tol, note)
                results.check(STAGE, f"{key}: greedy ids vs transformers on {ctx.torch_device}", greedy_kind,
                              same, "identical", same,
                              "" if greedy_kind == "correctness" else "reported: the greedy target is stated for f32, which ran")
            out["runs"].append(row)
            log(f"  {key}: {json.dumps({k: v for k, v in row.items() if k.startswith('vs_')}, default=str)[:300]}")
    return out
