"""`ctxzip kernels` subcommands."""

from __future__ import annotations

import json

from ctxzip.cli import main


def test_kernels_check_and_info(capsys):
    assert main(["kernels", "info"]) == 0
    assert "ctxzip" in capsys.readouterr().out
    assert main(["kernels", "check", "--tokens", "33", "--backend", "torch"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ok"] is True and res["max_abs_error"]["mass"] < 1e-4


def test_kernels_bad_args(capsys):
    assert main(["kernels", "check", "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["kernels", "scores", "--text", "   "]) == 2
    assert main(["kernels", "scores", "--text", "hi", "--window", "-1"]) == 2
