import subprocess
import sys

import pytest

from ctxzip.cli import main


def test_help_lists_groups(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2


def test_demo_bad_args_are_clear(capsys):
    assert main(["demo", "--rates", "0"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["demo", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["demo", "--docs", "0"]) == 2


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "ctxzip", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "ctxzip" in out.stdout


@pytest.mark.slow
def test_demo_runs(tmp_path):
    out = tmp_path / "demo.json"
    assert main(["demo", "--docs", "1", "--context-tokens", "256", "--rates", "0.5",
                 "--methods", "random-drop,truncate-tail", "--presses", "snapkv", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert by["truncate-tail"]["continuation"] > by["random-drop"]["continuation"]
    assert 0.0 < by["kv:snapkv"]["achieved_rate"] < 0.8  # measured cache bytes vs bf16


def test_demo_unknown_press_is_clear(capsys):
    assert main(["demo", "--presses", "nope"]) == 2
    assert "unknown press" in capsys.readouterr().err
