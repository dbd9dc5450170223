"""What every command-line test checks of a refused argument: argparse's usage, the message, exit status 2."""

import pytest


def exits_with_usage(main, argv, message, capsys):
    """``main(argv)`` exits with status 2, printing the usage and ``message`` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err
