"""The ``raymerge`` command line: plan, run, submit, verify, methods, demo, align (and, from
``cli/data.py``, stats and tact).

Every ``RaymergeError`` becomes one readable line on stderr and a non-zero exit code. The
executor is chosen here: ``--executor ray`` builds ``raymerge.cluster.RayExecutor``; the engine
receives it through the ``Executor`` interface and never imports the cluster package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, NoReturn

from raymerge.cli.data import add_data_commands
from raymerge.cli.options import MERGEKIT_OPTIONS, PLAN_OPTIONS, RUN_OPTIONS, add_options, forward
from raymerge.engine import __version__
from raymerge.engine.errors import RaymergeError
from raymerge.engine.executor import Executor
from raymerge.engine.plan import build_plan, check_budget, fmt_bytes
from raymerge.engine.recipe import Recipe
from raymerge.engine.stages import Stage
from raymerge.engine.storage import is_local
from raymerge.engine.urls import RedactingFilter, redact, redact_text


def _load(args: argparse.Namespace, text: str | None = None, origin: str | None = None) -> Recipe:
    """The recipe file (or one stage's ``text``) with command-line opt-ins applied (``--allow-pickle``)."""
    from raymerge.engine.recipe import load_recipe, parse_recipe

    if text is None:
        recipe = load_recipe(args.recipe, strict=args.strict)
    else:
        recipe = parse_recipe(text, origin or str(args.recipe), strict=args.strict)
    if args.allow_pickle and not recipe.raymerge.allow_pickle_bin:
        options = recipe.raymerge.model_copy(update={"allow_pickle_bin": True})
        recipe = recipe.model_copy(update={"raymerge": options})
    return recipe


def _stages(args: argparse.Namespace, out: str | None) -> list[Stage] | None:
    """The stages of a multi-stage recipe file (None for an ordinary recipe); named intermediate
    stages go to ``--intermediate-dir``, else ``OUT.stages``."""
    from raymerge.engine.recipe import read_recipe_text
    from raymerge.engine.stages import is_multi_stage, stage_order

    text = read_recipe_text(args.recipe)
    if not is_multi_stage(text, str(args.recipe)):
        return None
    # `plan` without --intermediate-dir: a placeholder that names the option (no stage there exists).
    inter = args.intermediate_dir or (f"{out.rstrip('/')}.stages" if out is not None else "<intermediate-dir>")
    return stage_order(text, str(args.recipe), inter)


def cmd_plan(args: argparse.Namespace) -> int:
    stages = _stages(args, None)
    if stages is None:
        return _plan(args, _load(args))
    from raymerge.engine.stages import stage_done

    made = {st.dest for st in stages if st.dest is not None and stage_done(st.dest)}
    listing: list[dict[str, Any]] = []
    for i, st in enumerate(stages):
        head = f"stage {i + 1}/{len(stages)} {st.label!r} -> {st.dest or 'OUT'}"
        waits = [d for d in st.reads if d not in made]
        entry: dict[str, Any] = {"stage": st.label, "out": st.dest, "waits_for": waits, "plan": None}
        listing.append(entry)
        if waits:
            print(f"{head}: not planned, reads {', '.join(waits)}, which an earlier stage writes", file=sys.stderr)
            continue
        print(head, file=sys.stderr)
        plans: list[dict[str, Any]] = []
        _plan(args, _load(args, st.text, st.origin(args.recipe)), plans if args.json else None)
        entry["plan"] = plans[0] if plans else None
    if args.json:
        print(json.dumps({"stages": listing}, indent=1))
    return 0


def _plan(args: argparse.Namespace, recipe: Recipe, collect: list[dict[str, Any]] | None = None) -> int:
    """Print ``recipe``'s plan (with ``--json`` and ``collect``, append its summary there instead)."""
    from raymerge.engine.executor import default_memory_budget, placement_for

    where = placement_for(args.device or recipe.raymerge.device, args.device_memory)
    plan = build_plan(recipe, out_shard_bytes=args.out_shard_size, placement=where)
    budget = args.memory_budget or default_memory_budget()
    summary = plan.summary()
    summary["memory_budget"] = budget
    if args.json:
        summary["task_list"] = [
            {
                "id": t.id,
                "class": t.tensor_class,
                "read_bytes": t.read_bytes,
                "write_bytes": t.write_bytes,
                "est_host_bytes": t.est_host_bytes,
                "est_device_bytes": t.est_device_bytes,
                "flops": t.flops,
                # dense linear algebra as planned: statistics dtype, and the dtype of R S⁺'s eigh fallback
                **{k: t.shared[k] for k in ("precision", "eigh_precision") if k in t.shared},
            }
            for t in plan.tasks
        ]
        if collect is None:
            print(json.dumps(summary, indent=1))
        else:
            collect.append(summary)
    else:
        dev_budget = f"{fmt_bytes(where.device_memory)} per device" if where.device_memory else "not known"
        print(f"method      {summary['method']}  ({len(plan.models)} models)")
        print(f"tensors     {summary['tensors']}  in {summary['tasks']} tasks  {summary['tasks_by_class']}")
        print(f"read        {fmt_bytes(summary['read_bytes'])}")
        print(f"write       {fmt_bytes(summary['write_bytes'])}  in {len(plan.shards)} shard(s)")
        print(f"device      {plan.device}" + (f"  ({dev_budget})" if plan.device != "cpu" else ""))
        print(f"peak task   {fmt_bytes(summary['peak_task_host_bytes'])} host  (budget {fmt_bytes(budget)})")
        if plan.device != "cpu":
            print(f"            {fmt_bytes(summary['peak_task_device_bytes'])} device  ({dev_budget})")
            narrowed = sum(t.shared.get("precision") == "fp32" for t in plan.tasks)
            mixed = sum(t.shared.get("eigh_precision") == "fp32" for t in plan.tasks)
            if narrowed or mixed:
                print(
                    f"precision   {mixed} task(s) fp64 with an fp32 eigh fallback, {narrowed} in fp32"
                    " (fp64 would not fit the device)"
                )
        print(f"flops       {summary['flops']:.3g}")
        biggest = sorted(plan.tasks, key=lambda t: (-t.est_host_bytes - t.est_device_bytes, t.id))[:5]
        print(f"largest tasks:{'host':>59} {'device':>12}")
        for t in biggest:
            print(f"  {t.id:<60} {fmt_bytes(t.est_host_bytes):>12} {fmt_bytes(t.est_device_bytes):>12}")
    check_budget(plan, budget, where.device_memory)
    return 0


def executor_for(args: argparse.Namespace) -> Executor:
    """The executor ``--executor`` names; Ray is imported only when asked for."""
    if args.executor == "ray":
        from raymerge.cluster import RayExecutor

        return RayExecutor(workers=args.workers, address=args.address, map_reduce=getattr(args, "map_reduce", "auto"))
    from raymerge.engine.local import LocalExecutor

    return LocalExecutor(workers=args.workers)


def cmd_run(args: argparse.Namespace) -> int:
    stages = _stages(args, args.out)
    if stages is None:
        return _run(args, _load(args), args.out)
    from raymerge.engine.outpath import check_output_path
    from raymerge.engine.publish import ModelPublication
    from raymerge.engine.stages import stage_done
    from raymerge.engine.writer import OUTPUT_EXISTS

    # Everything that can be checked before the first stage runs is: a typo in the last stage or
    # an existing OUT must not surface after hours of earlier stages.
    recipes = [_load(args, st.text, st.origin(args.recipe)) for st in stages]
    for st in stages:
        check_output_path(args.out if st.final else str(st.dest))
    # The final stage's own check of OUT (``Staging``'s), made now.
    ModelPublication(args.out, overwrite=args.overwrite, exists_message=OUTPUT_EXISTS).check()
    for i, (st, recipe) in enumerate(zip(stages, recipes, strict=True)):
        dest = args.out if st.final else st.dest
        assert dest is not None
        where = f"stage {i + 1}/{len(stages)} {st.label!r}"
        if not st.final and not args.overwrite and stage_done(dest):
            print(
                f"{where}: {dest} already holds a model, used as it is (--overwrite merges it again)", file=sys.stderr
            )
            continue
        print(f"{where} -> {dest}", file=sys.stderr)
        if not st.final and is_local(dest):
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)  # as mergekit-multi does
        _run(args, recipe, dest)
    return 0


def _run(args: argparse.Namespace, recipe: Recipe, out: str) -> int:
    from raymerge.engine.merge import format_figures, merge

    figures = merge(
        recipe,
        out,
        executor=executor_for(args),
        device_memory=args.device_memory,
        memory_budget=args.memory_budget,
        out_shard_bytes=args.out_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        device="cuda" if args.cuda else args.device,
        copy_tokenizer=args.copy_tokenizer,
    )
    print(format_figures(figures))
    print(f"wrote {Path(out).absolute() if is_local(out) else redact(out)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    from raymerge.cluster.submit import DEFAULT_DASHBOARD, submit_merge

    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_DASHBOARD
    return submit_merge(
        args.recipe,
        args.out,
        address=address,
        run_args=forward(args, (*RUN_OPTIONS, *MERGEKIT_OPTIONS)),
        wait=not args.no_wait,
        job_id=args.job_id,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from raymerge.engine.verify import verify_model

    rep = verify_model(args.model, structural=args.structural)
    sums = (
        f"{rep.tasks_checked} task checksums over {fmt_bytes(rep.bytes_checked)} match"
        if rep.tasks_checked
        else "tensor bytes NOT checked (no receipts)"
    )
    headers = f"{rep.headers_checked} header(s) match the merge's" if rep.headers_checked else "headers NOT compared"
    what = "structure ok" if rep.structural_only else "ok"
    print(
        f"{what}: {rep.tensors} tensors in {rep.shards} shard(s); {headers}; {sums}; all floating-point values finite"
    )
    return 0


def describe_methods(name: str | None = None) -> str:
    """``raymerge methods``: every method with its reference, or one method's parameters."""
    from raymerge.engine.methods import METHODS
    from raymerge.engine.recipe import suggest

    if name is None:
        shown = {
            n: (", ".join(p.name for p in spec.params) or "-", spec.reference)
            for n, spec in sorted(METHODS.items())
            if n != "mean_task_vector"
        }
        w1, w2 = max(map(len, shown)), max(len(v[0]) for v in shown.values())
        rows = [f"{n:<{w1}}  {ps:<{w2}}  {ref}" for n, (ps, ref) in shown.items()]
        return "\n".join([f"{'method':<{w1}}  {'parameters':<{w2}}  reference", *rows])
    if name not in METHODS:
        raise RaymergeError(f"unknown method {name!r}", hint=suggest(name, METHODS))
    spec = METHODS[name]
    lines = [f"{name}: {spec.reference}"]
    applies = "all tensors" if len(spec.applies_to) == 4 else ", ".join(sorted(spec.applies_to)) + " tensors"
    lines.append(f"  applies to {applies}" + (f"; others get {spec.fallback!r}" if spec.fallback else ""))
    lines.append("  needs a base model" if spec.needs_base else "  no base model needed")
    for p in spec.params:
        default = "required" if p.required else f"default {p.default!r}"
        where = "per model" if p.scope.value == "model" else "top-level"
        allowed = (
            f"one of {', '.join(p.choices)}"
            if p.choices
            else p.allowed()
            if p.kind in (int, float)
            else p.kind.__name__
        )
        lines.append(f"  {p.name:<22} {where:<9} {default:<16} {allowed}" + (f" — {p.help}" if p.help else ""))
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(describe_methods(args.name))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raymerge.engine.demo import run_demo

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raymerge-demo-"))
    return run_demo(workdir, size=args.size)


def _also_pair(text: str) -> tuple[str, str]:
    """``EXPERT_DIR:OUT_DIR`` → the pair, split at the last colon that does not start a URL's ``://``,
    so either side may be a URL (``s3://a/e:s3://b/e``)."""
    cuts = [i for i, c in enumerate(text) if c == ":" and not text.startswith("//", i + 1)]
    src, dst = (text[: cuts[-1]], text[cuts[-1] + 1 :]) if cuts else ("", "")
    if not src or not dst:
        raise argparse.ArgumentTypeError(f"expected EXPERT_DIR:OUT_DIR, got {text!r}")
    return src, dst


def cmd_align(args: argparse.Namespace) -> int:
    from raymerge.engine.align import align_checkpoints

    rep = align_checkpoints(
        args.reference,
        args.model,
        args.out,
        also=args.also,
        heads=not args.no_heads,
        max_iter=args.max_iter,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    drop = 100 * (1 - rep.distance_after / rep.distance_before) if rep.distance_before else 0.0
    print(
        f"aligned {redact(args.model)} to {redact(args.reference)}: {rep.permutations} permutations, {rep.moved_units} of "
        f"{rep.units} units moved; weight distance {rep.distance_before:.6g} -> {rep.distance_after:.6g} "
        f"({drop:.1f}% lower) in {rep.seconds:.1f} s"
    )
    for out in rep.outputs:
        print(f"wrote {redact(str(out))}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as the one ``raymerge: error:`` line every other
    refusal is (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"raymerge: error: {redact_text(message)} (see `{self.prog} --help`)\n")
        sys.exit(2)


def report_internal_error(exc: BaseException) -> int:
    """An exception nothing anticipated: one line naming it, and the traceback in a log file."""
    text = redact_text("".join(traceback.format_exception(exc)))
    try:
        fd, log_path = tempfile.mkstemp(prefix="raymerge-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"raymerge {__version__}: {' '.join(sys.argv)}\n{text}")
        where = f"traceback in {log_path}"
    except OSError as err:
        where = f"no traceback saved: {err.strerror}"
    message = " ".join(redact_text(str(exc)).split())[:500]
    print(
        f"raymerge: error: internal error: {type(exc).__name__}: {message} (please report; {where})",
        file=sys.stderr,
    )
    return 70  # EX_SOFTWARE


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="raymerge", description="Out-of-core merging of fine-tuned models.")
    p.add_argument("--version", action="version", version=f"raymerge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("plan", help="validate a recipe against checkpoint headers and print the plan")
    sp.add_argument("recipe", help="recipe YAML (mergekit schema + raymerge keys)")
    add_options(sp, PLAN_OPTIONS)
    sp.add_argument("--json", action="store_true", help="machine-readable output, with every task")
    sp.add_argument(
        "--intermediate-dir",
        default=None,
        help="multi-stage recipes: where `run` writes the named stages (the stages after them are planned "
        "once those exist)",
    )
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("run", help="run a merge into OUT (resumes an interrupted run of the same plan)")
    sp.add_argument("recipe", help="recipe YAML (mergekit schema + raymerge keys)")
    sp.add_argument("out", help="output model directory (published atomically)")
    add_options(sp, RUN_OPTIONS)
    add_options(sp.add_argument_group("mergekit-yaml's flags, accepted"), MERGEKIT_OPTIONS)
    sp.add_argument("--executor", choices=["local", "ray"], default="local", help="where tasks run")
    sp.add_argument(
        "--address", default=None, help="Ray cluster to join (auto | HOST:PORT); default: embedded local Ray"
    )
    sp.add_argument(
        "--map-reduce",
        choices=["auto", "always"],
        default="auto",
        help="Ray: ACTMat/WUDI statistics summed over nodes that each read some experts: when no node "
        "reads all of a tensor's experts (auto), or for every such tensor (always)",
    )
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("submit", help="run a merge on a Ray cluster as a job (Ray Jobs API); streams its logs")
    sp.add_argument("recipe", help="recipe YAML (mergekit schema + raymerge keys)")
    sp.add_argument("--out", required=True, help="output model directory, on storage every node mounts")
    add_options(sp, RUN_OPTIONS)
    add_options(sp.add_argument_group("mergekit-yaml's flags, accepted"), MERGEKIT_OPTIONS)
    sp.add_argument(
        "--address", default=None, help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    )
    sp.add_argument("--job-id", default=None, help="submission id for the job (default: chosen by Ray)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("methods", help="list the merge methods, or one method's parameters, defaults and ranges")
    sp.add_argument("name", nargs="?", default=None, help="a method name (e.g. ties)")
    sp.set_defaults(fn=cmd_methods)

    sp = sub.add_parser("verify", help="recheck a merged model: index, headers, receipts' checksums, finiteness")
    sp.add_argument("model", help="model directory or URL (s3://, gs://, https://, …) written by raymerge run")
    sp.add_argument(
        "--structural",
        action="store_true",
        help="check the structure only (index, headers, sizes, finiteness): for models without raymerge's receipts",
    )
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("demo", help="build small checkpoints, merge them, print the figures")
    sp.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    sp.add_argument("--size", default="small", choices=["tiny", "small", "1b"], help="synthetic model size")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("align", help="permute MODEL's hidden units into REFERENCE's basis (weight matching)")
    sp.add_argument("--reference", required=True, help="model A, whose unit order is kept")
    sp.add_argument("--model", required=True, help="model B, permuted to match A (its function is unchanged)")
    sp.add_argument("--out", required=True, help="output directory for the permuted model B")
    sp.add_argument(
        "--also",
        action="append",
        type=_also_pair,
        default=[],
        metavar="EXPERT_DIR:OUT_DIR",
        help="an expert fine-tuned from MODEL, written with the same permutation (repeatable)",
    )
    sp.add_argument("--no-heads", action="store_true", help="permute MLP hidden units only, not attention heads")
    sp.add_argument("--max-iter", type=int, default=100, help="coordinate-descent passes at most (default 100)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the order permutations are visited in")
    sp.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_align)
    add_data_commands(sub)
    _no_abbreviations(p)
    return p


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated long options everywhere: ``run R --out DIR`` must not be read as
    ``--out-shard-size DIR`` (argparse's default), but fail naming ``--out``."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # no model URL's credentials in any log line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        return int(args.fn(args))
    except RaymergeError as exc:
        print(f"raymerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raymerge: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the traceback in a file
        return report_internal_error(exc)


def console_main() -> None:
    """The ``raymerge`` console script: ``main()``, then leave without the interpreter's teardown.

    Tearing down an interpreter that imported torch runs thousands of finalizers (0.45 s on the
    2-core benchmark machine, a sixth of a small merge's wall); by then every output is written,
    fsynced and renamed, and the journal closed. Streams and logging are flushed first. A process
    connected to a Ray cluster exits normally, so that Ray's own exit handler disconnects it."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        sys.exit(code)
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken pipe: let the normal exit report it
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
