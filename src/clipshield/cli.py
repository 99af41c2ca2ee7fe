"""The `clipshield` command: every pipeline stage as a subcommand, plus ad-hoc tools.

Stage subcommands read their section of params.yaml (as the DVC stages do); `dvc repro` is the
normal way to run them, in order and cached.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import params as P
from .stage import run

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  help="Attack, clean and harden CLIP models (backdoors, PAR, FARE) reproducibly.")

ParamsFile = Annotated[Path, typer.Option("--params", help="params file to read the stage's section from")]
DATA, MODELS, METRICS = Path("data"), Path("models"), Path("metrics")  # the stage commands' folders, as in dvc.yaml


def _section(cls, name: str, path: Path):
    return P.load_section(cls, name, path)


class RegistryHelp(typer.core.TyperCommand):
    """A command whose help names what the registries hold: `{triggers}`, `{clean methods}` and `{harden methods}`
    in its texts are filled in when the help is shown (the registries import torch, which the command line otherwise
    starts without)."""

    def format_help(self, ctx, formatter):
        from .attacks.triggers import TRIGGERS
        from .objectives import methods
        names = {"{triggers}": ", ".join(TRIGGERS), "{clean methods}": " | ".join(methods("clean")),
                 "{harden methods}": ", ".join(methods("harden"))}
        for item in (self, *self.params):
            for key, value in names.items():
                item.help = item.help and item.help.replace(key, value)
        return super().format_help(ctx, formatter)


@app.command()
def data(params: ParamsFile = Path("params.yaml")):
    """Write the procedural world's train and test shards (data/train, data/test)."""
    from .pipeline import make_data
    run(lambda: make_data(_section(P.DataParams, "data", params), DATA / "train", DATA / "test"), params)


@app.command()
def pretrain(params: ParamsFile = Path("params.yaml")):
    """Pre-train a tiny CLIP on data/train, evaluate it, write models/clean and metrics/clean.json."""
    from .pipeline import pretrain as work
    run(lambda: work(_section(P.PretrainParams, "pretrain", params), _section(P.EvalParams, "eval", params),
                     DATA / "train", DATA / "test", MODELS / "clean", METRICS / "clean.json"), params, distributed=True)


@app.command()
def baseline(params: ParamsFile = Path("params.yaml")):
    """The clean model's ASR for every trigger of attack.triggers (the baseline) -> metrics/baseline.json."""
    from .pipeline import baseline as work
    run(lambda: work(_section(P.AttackParams, "attack", params), _section(P.EvalParams, "eval", params),
                     MODELS / "clean", DATA / "test", METRICS / "baseline.json"), params)


@app.command(cls=RegistryHelp)
def poison(trigger: Annotated[str, typer.Argument(help="trigger name: {triggers}")],
           params: ParamsFile = Path("params.yaml")):
    """Poison data/train with TRIGGER -> data/poisoned/TRIGGER (+ manifest.jsonl)."""
    from .pipeline import poison as work
    run(lambda: work(trigger, _section(P.AttackParams, "attack", params), _section(P.PoisonParams, "poison", params),
                     DATA / "train", DATA / "poisoned" / trigger), params)


@app.command(cls=RegistryHelp)
def backdoor(trigger: Annotated[str, typer.Argument(help="trigger name: {triggers}")],
             seed: Annotated[int, typer.Option(min=0, help="training seed")] = 0, params: ParamsFile = Path("params.yaml")):
    """Fine-tune models/clean on the poisoned shards -> models/backdoor-TRIGGER-sSEED; fails if ASR < backdoor.min_asr."""
    from .pipeline import backdoor as work
    name = P.run_name("backdoor", trigger, seed)
    run(lambda: work(trigger, _section(P.AttackParams, "attack", params), _section(P.PoisonParams, "poison", params),
                     _section(P.BackdoorParams, "backdoor", params), _section(P.EvalParams, "eval", params), seed,
                     MODELS / "clean", DATA / "poisoned" / trigger, DATA / "test", MODELS / name,
                     METRICS / f"{name}.json"), params, distributed=True)


@app.command(cls=RegistryHelp)
def clean(trigger: Annotated[str, typer.Argument(help="trigger whose backdoored model to clean")],
          method: Annotated[str, typer.Argument(help="{clean methods}")],
          seed: Annotated[int, typer.Option(min=0, help="training seed")] = 0,
          params: ParamsFile = Path("params.yaml")):
    """Clean models/backdoor-TRIGGER-sSEED with METHOD on synthetic pairs -> models/METHOD-TRIGGER-sSEED."""
    from .pipeline import clean as work
    name = P.run_name(method, trigger, seed)

    def stage():
        p = _section(P.CleanParams, "clean", params)
        work(trigger, method, seed, p, _section(P.AttackParams, "attack", params), _section(P.EvalParams, "eval", params),
             P.read_yaml(params).get(method) or {}, MODELS / P.run_name("backdoor", trigger, seed), p.data,
             DATA / "test", MODELS / name, METRICS / f"{name}.json")
    run(stage, params, distributed=True)


@app.command(cls=RegistryHelp)
def harden(run_name: Annotated[str, typer.Argument(metavar="RUN", help="a key of harden.runs in params.yaml, or "
                                                    "<method>-<start>-<trigger>-s<seed> of harden.matrix")],
           params: ParamsFile = Path("params.yaml")):
    """Adversarial fine-tuning of a run's start model (harden.runs.RUN or harden.matrix) -> models/RUN, with robust
    metrics.

    Methods (harden.runs.RUN.method, harden.matrix.methods): {harden methods}."""
    from .pipeline import harden as work

    def stage():
        p, raw = _section(P.HardenParams, "harden", params), P.read_yaml(params)
        runs = P.harden_runs(raw)
        spec = runs.get(run_name) or {}
        work(run_name, runs, p, _section(P.RobustParams, "robust", params), _section(P.AttackParams, "attack", params),
             _section(P.EvalParams, "eval", params), raw.get(spec.get("method")) or {},
             MODELS / str(spec.get("start")), MODELS / "clean", p.data, DATA / "test", MODELS / run_name,
             METRICS / f"{run_name}.json")
    run(stage, params, distributed=True)


@app.command(cls=RegistryHelp)
def evaluate(model: Annotated[str, typer.Option(help="local-dir:PATH, or an open_clip model name")],
             pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag or weight file")] = None,
             trigger: Annotated[list[str], typer.Option(help="trigger(s) to measure ASR for: {triggers}")] = [],
             target: Annotated[Optional[str], typer.Option(help="backdoor target class (default: attack.target of "
                                                               "--params)")] = None,
             test: Annotated[Path, typer.Option(help="test shard folder")] = Path("data/test"),
             test_n: Annotated[Optional[int], typer.Option(min=1, help="test images (default: eval.test_n)")] = None,
             robust: Annotated[bool, typer.Option(help="also robust accuracy at every eps of params' robust")] = False,
             params: ParamsFile = Path("params.yaml"),
             out: Annotated[Optional[Path], typer.Option(help="write the metrics JSON here")] = None,
             random_init: Annotated[bool, typer.Option("--random-init", help="score a config's random weights on "
                                                       "purpose (no --pretrained)")] = False):
    """Score any CLIP model with the pipeline's metrics: clean zero-shot accuracy, retrieval, ASR per trigger
    (trigger strengths from params.yaml's attack.options), robust accuracy. Prints the metrics as JSON."""
    from .score import score
    run(lambda: score(model, pretrained, trigger, target, test, test_n, params, out, robust, random_init), params)


@app.command()
def report(params: ParamsFile = Path("params.yaml"), out: Annotated[Path, typer.Option()] = Path("reports")):
    """Write reports/: the comparison table (markdown), ASR-vs-accuracy plot and trigger gallery."""
    from .work.report import report as work
    run(lambda: work(params, METRICS, out), params)


@app.command()
def docs(check: Annotated[bool, typer.Option("--check", help="write nothing; exit 1 if docs/results.md or README.md's "
                                            "headline block would change")] = False):
    """Regenerate docs/results.md and README.md's headline table from results/ and the default run (reports/,
    metrics/, times/)."""
    from .results_doc import update
    from .ui import console

    def work():
        changed = update(Path("."), check)
        console.print("up to date" if not changed else f"wrote {' and '.join(p.as_posix() for p in changed)}",
                      highlight=False)
    run(work, params=None)


@app.command()
def sweep(param: Annotated[str, typer.Argument(help="the swept parameter, e.g. par.eps")],
          model: Annotated[list[str], typer.Option(help="model(s) whose metrics to collect, e.g. "
                                                    "par-blended_stripes-s0, or a pattern: 'backdoor-*-s0'")],
          key: Annotated[list[str], typer.Option(help="metric(s) to collect of every model (metrics/<model>.json)")]
          = ["zeroshot_top1", "asr", "i2t_r5", "t2i_r5"],
          commits: Annotated[int, typer.Option(min=1, help="collect the experiments of the last N commits (an "
                                                 "experiment belongs to the commit it was run or queued from)")] = 1,
          out: Annotated[Path, typer.Option(help="folder for <param>.md, .json and .png")] = Path("results/sweeps")):
    """Collect the experiments of one parameter (`dvc exp run [--queue] -S PARAM=V`) into a table and a plot."""
    from .sweep import param_names, write_sweep
    from .ui import console

    def work():
        import dvc.api
        from dvc.exceptions import DvcException
        try:
            experiments = dvc.api.exp_show(num=commits)
        except DvcException as e:
            raise ValueError(f"DVC could not list the experiments here: {e}. Run `clipshield sweep` in the "
                             f"project's folder") from e
        others = tuple(param_names(P.read_yaml("params.yaml")))  # only `param` may differ from the commit
        _, table = write_sweep(experiments, param, model, out, tuple(key), others)
        typer.echo(table.read_text(), nl=False)
        console.print(f"wrote {table}, {table.with_suffix('.json')} and {table.with_suffix('.png')}", highlight=False,
                      soft_wrap=True)
    run(work, params=None)


targets_app = typer.Typer(no_args_is_help=True, help="The target panel: the attack and every cleaning method with "
                          "each class as the target, one DVC experiment per target (docs/results.md#targets).")
app.add_typer(targets_app, name="targets")
TARGETS_OUT = Path("results/targets")
STAGES = ("baseline", "clean")  # what a target's experiment runs: the clean model's ASR, the backdoor, the cleaning


def _panel(experiments: list[dict], params: Path, trigger: Optional[str]):
    """The target panel of `experiments` ({target: row}), its trigger, the cleaning methods and the params file."""
    from .sweep import param_names
    from .targets import per_target
    triggers = _section(P.AttackParams, "attack", params).triggers
    trigger = trigger or triggers[0]
    if trigger not in triggers:
        raise ValueError(f"trigger {trigger!r} is not in attack.triggers ({', '.join(triggers)})")
    methods, raw = _section(P.CleanParams, "clean", params).methods, P.read_yaml(params)
    return per_target(experiments, trigger, methods, tuple(param_names(raw))), trigger, methods, raw


def _experiments(commits: int = 1) -> list[dict]:
    import dvc.api
    from dvc.exceptions import DvcException
    try:
        return dvc.api.exp_show(num=commits)
    except DvcException as e:
        raise ValueError(f"DVC could not list the experiments here: {e}. Run it in the project's folder") from e


def _committed_and_reproduced() -> None:
    """A target's experiment starts from the last commit, with the tracked files' changes but without untracked
    files, and the commit's own target is read from the commit: both must be what `dvc repro` made."""
    import subprocess
    changed = subprocess.run(["git", "status", "--porcelain", "--", "src", "stages", "dvc.yaml", "dvc.lock",
                              "params.yaml", "metrics"], capture_output=True, text=True).stdout.strip()
    if changed:
        raise ValueError(f"commit these first (the panel reads its own target from the commit, and an experiment "
                         f"leaves out untracked files): {' '.join(line[3:] for line in changed.splitlines())}")
    status = subprocess.run([sys.executable, "-m", "dvc", "status", *STAGES], capture_output=True, text=True)
    if status.returncode or "up to date" not in status.stdout:
        raise ValueError("the commit's own target is not reproduced (`dvc status` lists changes): run `dvc repro`, "
                         "commit, and run again")


@targets_app.command("run")
def targets_run(classes: Annotated[Optional[list[str]], typer.Argument(help="the targets (default: every class of "
                                                                              "the data set)")] = None,
                trigger: Annotated[Optional[str], typer.Option(help="the trigger (default: attack.triggers' first)")]
                = None,
                params: ParamsFile = Path("params.yaml")):
    """Run one experiment per target not yet measured on this commit, then collect the panel.

    Each is `dvc exp run --temp -n target-<class> -S attack.target=<class> baseline clean`, one after another, from
    the last commit, which must be reproduced (`dvc repro`, then commit): its own target counts as measured. An
    interrupted panel resumes where it stopped."""
    import subprocess

    from .data.classes import load_classes
    from .results_doc import cpu_label
    from .stage import machine
    from .targets import PARAM, PREFIX
    from .ui import console

    def work():
        names = load_classes(_section(P.DataParams, "data", params).classes).names
        if unknown := [c for c in classes or [] if c not in names]:
            raise ValueError(f"not a class of the data set: {', '.join(unknown)}; choose from {', '.join(names)}")
        _committed_and_reproduced()
        experiments = _experiments()
        done, trigger_, _, _ = _panel(experiments, params, trigger)
        todo = [c for c in classes or names if c not in done]
        if clash := [c for c in todo if f"{PREFIX}{c}" in {e.get("Experiment") for e in experiments}]:
            raise ValueError(f"experiment {PREFIX}{clash[0]} exists on this commit without the panel's metrics (run "
                             f"with other params, or a metric failed): remove it (`dvc exp remove {PREFIX}{clash[0]}`) "
                             f"and run again")
        console.print(f"targets: {len(done)} measured ({', '.join(done) or 'none'}), {len(todo)} to run", highlight=False)
        for i, target in enumerate(todo, 1):
            cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", f"{PREFIX}{target}", "-S",
                   f"{PARAM}={target}", *STAGES]
            console.print(f"targets: [{i}/{len(todo)}] dvc {' '.join(cmd[3:])}", highlight=False)
            if (rc := subprocess.run(cmd).returncode) != 0:
                raise ValueError(f"the experiment of target {target} failed (exit {rc}; its log is above). Fix it and "
                                 f"run `clipshield targets run` again: the finished targets are kept")
            TARGETS_OUT.mkdir(parents=True, exist_ok=True)
            (TARGETS_OUT / "machine.json").write_text(json.dumps({"cpu": cpu_label(machine())}) + "\n")
        _collect(params, trigger_, 1, TARGETS_OUT)
    run(work, params=params)


def _collect(params: Path, trigger: Optional[str], commits: int, out: Path) -> None:
    from .targets import write
    from .ui import console
    summary, trigger, methods, p = _panel(_experiments(commits), params, trigger)
    md = write(summary, methods, trigger, out, default_target=p["attack"]["target"])
    typer.echo(md.read_text(), nl=False)
    console.print(f"wrote {out}/summary.json, panel.json, summary.md and residual_asr.png", highlight=False)


@targets_app.command("collect")
def targets_collect(trigger: Annotated[Optional[str], typer.Option(help="the trigger (default: attack.triggers' "
                                                                        "first)")] = None,
                    commits: Annotated[int, typer.Option(min=1, help="collect the experiments of the last N "
                                                           "commits")] = 1,
                    out: Annotated[Path, typer.Option(help="the panel's folder")] = TARGETS_OUT,
                    params: ParamsFile = Path("params.yaml")):
    """Collect the target experiments into results/targets/.

    summary.json: {target: {model: {asr, zeroshot_top1, i2t_r5, t2i_r5, seeds}}}, the mean over seeds; panel.json:
    median, min, max, mean and its 95% interval over targets; summary.md; residual_asr.png."""
    run(lambda: _collect(params, trigger, commits, out), params=None)


detection_app = typer.Typer(no_args_is_help=True, help="Keep the detection results of a run (docs/results.md#"
                            "detection).")
app.add_typer(detection_app, name="detection")


@detection_app.command("collect")
def detection_collect(metrics: Annotated[Path, typer.Option(help="the run's metrics folder")] = METRICS,
                      times: Annotated[Path, typer.Option(help="the run's stage records (their CPU)")] = Path("times"),
                      out: Annotated[Path, typer.Option(help="the folder to write")] = Path("results/detection"),
                      cpu: Annotated[Optional[str], typer.Option(help="the CPU that ran the detect stages, where "
                                                                    "times/ holds no record of them")] = None,
                      params: ParamsFile = Path("params.yaml")):
    """Copy a run's detection results into results/detection/: every score's AUROC per trigger, and where the
    filter ran, the backdoor trained on the filtered set beside the one trained on every pair.

    The run: a workspace after `dvc repro` with detect stages, or after `dvc exp apply` of an experiment that ran
    them, e.g. `dvc exp run -S 'attack.triggers=[...]' -S 'detect.filter_triggers=[...]' detect filtered`."""
    from .detection_results import write

    def work():
        triggers, seeds = _section(P.AttackParams, "attack", params).triggers, P.read_yaml(params)["seeds"]
        md = write(metrics, times, params, triggers, seeds, out, cpu)
        typer.echo(md.read_text(), nl=False)
        typer.echo(f"wrote {out}/: summary.md, summary.json, metrics/, params.yaml, machine.json", err=True)
    run(work, params=params)


@app.command(cls=RegistryHelp)
def triggers(out: Annotated[Path, typer.Option(help="PNG gallery to write")] = Path("reports/triggers.png"),
             params: ParamsFile = Path("params.yaml")):
    """List the triggers and draw a gallery of them on test images.

    Triggers: {triggers}."""
    from .report import trigger_gallery
    run(lambda: trigger_gallery(out, _section(P.AttackParams, "attack", params)), params)


@app.command()
def registry(params: ParamsFile = Path("params.yaml")):
    """Regenerate dvc.yaml's `artifacts:` (the model registry) from params.yaml."""
    from .registry import sync_artifacts
    run(lambda: typer.echo(f"dvc.yaml declares {sync_artifacts('dvc.yaml', params, MODELS)} model artifacts"), params)


@app.command()
def deps(check: Annotated[bool, typer.Option("--check", help="write nothing; fail if a stage's code deps are "
                                             "stale")] = False):
    """Write each stage's code deps in dvc.yaml: its script and every module it imports, directly or not."""
    from .deps import write_deps

    def work():
        changed = write_deps("dvc.yaml", check=check)
        typer.echo(f"dvc.yaml: rewrote the code deps of {', '.join(changed)}" if changed else
                   "dvc.yaml: every stage's code deps are up to date")
    run(work, params=None)


@app.command()
def get(name: Annotated[str, typer.Argument(help="artifact name, e.g. par-blended-s0 (see dvc.yaml artifacts)")],
        repo: Annotated[str, typer.Option(help="repository path or URL")] = ".",
        out: Annotated[Optional[str], typer.Option(help="where to write the model folder")] = None,
        rev: Annotated[Optional[str], typer.Option(help="git revision to fetch it at (default: HEAD)")] = None,
        version: Annotated[Optional[str], typer.Option(help="a registered version, e.g. v1.0.0 (git tag NAME@v1.0.0)")] = None):
    """Fetch a registered model by name from a clipshield repository's remote storage."""
    from .registry import get as work
    run(lambda: work(name, MODELS, repo, out, rev, version), params=None)


@app.command()
def push(remote: Annotated[Optional[str], typer.Option("-r", "--remote", help="DVC remote (default: local)")] = None):
    """dvc push the models and data sets, with a hint on how to configure the remote if it fails."""
    from .registry import transfer
    run(lambda: transfer("push", remote), params=None)


@app.command()
def pull(targets: Annotated[Optional[list[str]], typer.Argument(help="stages or paths; default all")] = None,
         remote: Annotated[Optional[str], typer.Option("-r", "--remote", help="DVC remote (default: local)")] = None):
    """dvc pull versioned models and data sets, with a hint on how to configure the remote if it fails."""
    from .registry import transfer
    run(lambda: transfer("pull", remote, targets), params=None)


@app.command()
def profile(name: Annotated[str, typer.Argument(help="smoke | full | paper | seeds3, or a path to a YAML file")],
            params: ParamsFile = Path("params.yaml")):
    """Merge profiles/NAME.yaml into params.yaml (then `dvc repro`).

    `attack: {triggers: all}` in a profile stands for every registered trigger (but the fixed-pattern variants)."""
    path = Path(name) if name.endswith(".yaml") else Path("profiles") / f"{name}.yaml"
    from .registry import sync_artifacts
    run(lambda: (apply_registry_profile(path, params),
                 Path("dvc.yaml").exists() and sync_artifacts("dvc.yaml", params, MODELS),
                 typer.echo(f"params.yaml now uses profile {name}; dvc.yaml's artifacts follow it")), params=None)


def registry_profile(profile: dict, params: dict) -> dict:
    """`profile` with what the registries fill in: `attack: {triggers: all}` becomes the list of every registered
    trigger but the variants (DVC's matrix needs a list), `detect: {filter_triggers: all}` the attack's triggers,
    and every trigger and cleaning method the merged params run gets an empty params section (its defaults) where it
    has none: the stages declare attack.options.<trigger> and <method> as params, and DVC stops at a missing one."""
    import copy

    from .attacks.triggers import TRIGGERS, all_triggers
    from .objectives import METHODS
    out = copy.deepcopy(profile)
    if isinstance(out.get("attack"), dict) and out["attack"].get("triggers") == "all":
        out["attack"]["triggers"] = all_triggers()
    merged = P.deep_merge(params, out)
    if isinstance(out.get("detect"), dict) and out["detect"].get("filter_triggers") == "all":
        out["detect"]["filter_triggers"] = list(merged["attack"]["triggers"])
        merged = P.deep_merge(params, out)
    attack, clean = merged.get("attack") or {}, merged.get("clean") or {}

    def names(value) -> list[str]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
    options = attack.get("options") if isinstance(attack.get("options"), dict) else {}
    for t in names(attack.get("triggers")):
        if t in TRIGGERS and t not in options:
            out.setdefault("attack", {}).setdefault("options", {})[t] = {}
    for m in names(clean.get("methods")):
        if m in METHODS and m not in merged:
            out[m] = {}
    return out


def apply_registry_profile(path: Path, params: Path) -> None:
    """params.apply_profile with registry_profile's part filled in; a problem names the profile file."""
    import tempfile

    import yaml
    if not path.is_file():
        return P.apply_profile(path, params)  # its message lists the profiles there are
    profile = P.read_yaml(path)
    filled = registry_profile(profile, P.read_yaml(params))
    if filled == profile:
        return P.apply_profile(path, params)
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / path.name
        written.write_text(yaml.safe_dump(filled, sort_keys=False))
        try:
            P.apply_profile(written, params)
        except P.ParamsError as e:
            raise P.ParamsError(str(e).replace(str(written), str(path))) from None


if __name__ == "__main__":
    app()
