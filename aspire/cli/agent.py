"""The agent's commands: audit, chat, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from aspire.cli.app import app
from aspire.cli.options import (PAUSED_EXIT, Annotations, Attr, Classes, ConfigFile, Device, FailOn, Format, Json,
                                LlmModel, Offline, RetrySkipped, RunDir, Seed, Target, split_classes)
from aspire.cli.render import accuracy_line, audit_summary, err, findings_table, gate, out, print_json, verdict_line
from aspire.cli.runs import default_run_dir, open_cli_run, probe_config


# ---------------------------------------------------------------- audit / chat / demo (aspire.agent)
@app.command("audit")
def audit_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="dataset folder (not with --resume)"),
    format: Format = "waterbirds",
    attr: Attr = None,
    target: Target = None,
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint written by aspire train (not with --resume)"),
    annotations: Annotations = None,
    classes: Classes = None,
    run_dir: RunDir = None,
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the audit in this run folder (killed or paused)"),
    from_probe: Optional[Path] = typer.Option(None, "--from-probe", help="continue a probe run as an audit, in its "
                                              "folder: its captions, phrases and edits are reused"),
    config_file: ConfigFile = None,
    seed: Seed = 0,
    llm_model: LlmModel = None,
    offline: Offline = False,
    yes: bool = typer.Option(False, "--yes", "-y", help="approve every stage as proposed (non-interactive)"),
    device: Device = None,
    json_out: Json = False,
    fail_on: FailOn = None,
    retry_skipped: RetrySkipped = False,
) -> None:
    """The investigation agent: probe hypotheses until the findings are stable, then (approved) generate
    images without the spurious features, retrain, evaluate and report. Resumable (--resume RUN_DIR).

    A resumed audit keeps the settings the run recorded (flags given on resume are recorded too); API keys,
    which are never recorded, come from the environment or from --config FILE named again (only its keys are read)."""
    from aspire.agent import audit_context, auto_approve, context_from_run, make_planner, run_audit, thread_id
    from aspire.agent.approval import terminal_approver
    from aspire.agent.llm_planner import planner_record
    from aspire.errors import ConfigError
    from aspire.workflows.runs import existing_run

    overrides = {k: v for k, v in (("offline", True if offline else None), ("model", llm_model)) if v is not None}
    # 1. a new run, or the recorded one (a probe run becomes an audit only when asked: --from-probe)
    if resume is not None and from_probe is not None:
        raise ConfigError("give --resume RUN_DIR or --from-probe RUN_DIR, not both")
    if resume is not None or from_probe is not None:
        flag, folder = ("--resume", resume) if resume is not None else ("--from-probe", from_probe)
        if data is not None or model is not None or run_dir is not None:
            raise ConfigError(f"{flag} RUN_DIR continues with the inputs the run recorded: "
                              "leave out --data, --model and --run-dir")
        store = existing_run(folder)   # its kind first: a refused folder is left as it was
        kind = store.get_meta("kind")
        store.close()
        if from_probe is not None and kind != "probe":
            raise ConfigError(f"{folder}: a {kind} run, not a probe run" + (
                f"; continue it with `aspire audit --resume {folder}`" if kind == "audit" else ""))
        if from_probe is None and kind != "audit":
            raise ConfigError(f"{folder}: a {kind} run, not an audit; continue a probe run as an audit with "
                              f"`aspire audit --from-probe {folder}`, or start one in another --run-dir")
        ctx = context_from_run(folder, agent_overrides=overrides, device=device, progress=True,
                               secrets_from=config_file)
        if from_probe is not None:  # the probe run becomes an audit; its recorded work is reused
            store = ctx.pipeline.store
            store.set_meta("kind", "audit")
            store.set_meta("record", {**(store.get_meta("record") or {}), "planner": planner_record(ctx.config.agent)})
            thread_id(store)
        err.print(f"{'resuming the audit' if resume else 'auditing the probe run'} in {folder}", highlight=False)
    else:
        if data is None or model is None:
            raise ConfigError("aspire audit needs --data DIR and --model MODEL.pt (or --resume / --from-probe RUN_DIR)")
        from aspire.data.formats import load_dataset
        from aspire.models.classifier import load_checkpoint
        from aspire.provenance import run_record
        from aspire.workflows.runs import RunArgs, check_probe_inputs

        ds = load_dataset(data, format, attr=attr, target=target)
        cfg = probe_config(config_file, annotations, data)
        for key, value in overrides.items():
            setattr(cfg.agent, key, value)
        clf = load_checkpoint(model, device=device)
        classes = split_classes(classes)
        check_probe_inputs(ds, clf, cfg, classes)   # before anything is written
        run_dir = run_dir or default_run_dir("audit")
        args = RunArgs(data=str(data.resolve()), format=format, model=str(model.resolve()),
                       classes=classes, seed=seed, attr=attr, target=target)
        store = open_cli_run(run_dir, "audit", args)
        if store.get_meta("record") is None:
            planner = planner_record(cfg.agent)
            store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names},
                                                planner=planner))
        thread_id(store)
        planner_obj, _ = make_planner(cfg.agent)
        ctx = audit_context(ds, clf, cfg, store, model_path=str(model.resolve()), classes=classes,
                            seed=seed, progress=True, planner=planner_obj)
    err.print(make_planner(ctx.config.agent)[1], highlight=False, soft_wrap=True)
    if retry_skipped:
        err.print(f"retrying {ctx.pipeline.retry_failed()} recorded failure(s)", highlight=False)
    # 2. run until done, asking for approvals (or approving them with --yes)
    approve = auto_approve if yes else (terminal_approver(err) if sys.stdin.isatty() else None)
    result = run_audit(ctx, approve=approve)
    failures = ctx.pipeline.store.events("llm_failure")
    if failures:   # the planner degraded: said on stderr, not only in the JSON's llm_failures
        err.print(f"warning: the LLM planner failed {len(failures)} time(s) (the first: {failures[0].get('reason')}); "
                  "those rounds were planned by the offline planner", highlight=False, soft_wrap=True)
    audit_summary(result, json_out)   # paused too: what was found so far (JSON: status "paused", pending)
    if result.status == "paused":
        stage = (result.pending or {}).get("stage", "?")
        err.print(f"{result.run_dir}: the audit waits for approval before {stage}; continue with "
                  f"`aspire audit --resume {result.run_dir} --yes`, or in a terminal", highlight=False, soft_wrap=True)
        raise typer.Exit(PAUSED_EXIT)
    gate(result.findings, fail_on)


@app.command("chat")
def chat_cmd(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder (default: the latest under ./runs)"),
    config_file: ConfigFile = None,
    llm_model: LlmModel = None,
    device: Device = None,
    json_out: bool = typer.Option(False, "--json", help="read one question per line on stdin, write one JSON "
                                  "answer per line ({question, answer, llm}) on stdout"),
) -> None:
    """Talk with the agent about a run: what was found, why a class, the evidence of a finding, test a concept
    now, compare classes, what next; approve and retrain. Without an LLM configured (or once it stops answering)
    it answers from the run's evidence, in sentences. Ctrl-C cancels an answer; Ctrl-D exits."""
    from aspire.agent.chat import ChatSession
    from aspire.agent.offline_chat import OfflineSession
    from aspire.agent.terminal import QUIT
    from aspire.agent.tools import RunTools
    from aspire import llm
    from aspire.config import load_config
    from aspire.errors import ConfigError

    if run_dir is None:
        runs = sorted((p.parent for p in Path("runs").glob("*/run.sqlite")), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError("no run folder under ./runs: pass --run-dir DIR (a folder written by aspire audit or probe)")
        run_dir = runs[-1]
    settings = load_config(config_file).agent
    if llm_model:
        settings.model = llm_model
    tools = RunTools(run_dir, device=device, progress=not json_out)
    if not json_out:
        session = ChatSession(tools, settings, console=out) if llm.configured(settings) else OfflineSession(tools, out)
        raise typer.Exit(session.run())
    # --json: no terminal, no streaming; each answer as one JSON line
    import io
    import json

    from rich.console import Console

    from aspire.errors import AspireError

    quiet = Console(file=io.StringIO())
    chat = ChatSession(tools, settings.model_copy(update={"stream": False}), console=quiet) \
        if llm.configured(settings) else None
    answer = chat.turn if chat is not None else OfflineSession(tools, quiet).command
    for line in sys.stdin:
        question = line.strip()
        if question.lower() in QUIT:
            break
        if not question:
            continue
        try:
            reply = {"answer": answer(question)}
        except AspireError as e:
            reply = {"answer": "", "error": str(e)}
        reply["llm"] = chat is not None and chat.offline is None
        print(json.dumps({"question": question, **reply}), flush=True)


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", help="folder for the toy data, the model and the run"),
    seed: Seed = 0,
    size_px: int = typer.Option(64, "--size", help="toy image size in px"),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class",
                                                  help="toy training images per class (default: the benchmark's 800)"),
    epochs: int = typer.Option(10, "--epochs", help="ERM epochs of the audited smallcnn"),
    retrain_epochs: Optional[int] = typer.Option(None, "--retrain-epochs", help="default: as --epochs"),
    json_out: Json = False,
) -> None:
    """The whole pipeline offline on toy-waterbirds: toy data → ERM smallcnn → audit (offline planner,
    approved) → generate → retrain → report; prints the findings and worst-group accuracy before → after."""
    from aspire.workflows.demo import run_demo

    sizes = None
    if train_per_class is not None:
        n = max(1, train_per_class)
        sizes = {"train": n, "val": max(1, n // 4), "test": max(1, n // 2)}
    summary = run_demo(out_dir, seed=seed, size_px=size_px, sizes=sizes, epochs=epochs, retrain_epochs=retrain_epochs,
                       log=lambda msg: err.print(msg, highlight=False))
    if json_out:
        print_json(summary)
        return
    from aspire.schemas import Finding

    findings = [Finding.model_validate(f) for f in summary["findings"]]
    findings_table(findings, f"findings ({sum(f.spurious for f in findings)} spurious)")
    out.print(accuracy_line(summary["accuracy"]), highlight=False, soft_wrap=True)
    if summary.get("reprobe"):
        out.print(verdict_line(summary["reprobe"]["verdicts"]), highlight=False, soft_wrap=True)
    report = (summary.get("report") or {}).get("html")
    out.print(f"report: {report}" if report else "report: not written (aspire.report is not available)",
              highlight=False, soft_wrap=True)
    out.print(f"run: {summary['run_dir']} ({summary['seconds']:.0f} s)", highlight=False)
