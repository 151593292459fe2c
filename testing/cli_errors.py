"""A command's refusal as tests expect it: exit code 2 and one line on stderr, no traceback."""

from __future__ import annotations


def one_line_error(main, argv: list[str], capsys) -> str:
    """Runs `main(argv)` (a CLI entry point) and returns its one-line error; fails the test otherwise."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, rc, err)
    return lines[0]
