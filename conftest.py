"""Loaded by every pytest run of this repository, whichever paths it collects (tests/, notebooks/)."""


def notebook_runtimes(stats: dict) -> dict[str, float]:
    """Seconds per notebook (setup, call and teardown of all its nbval cells), from pytest's reports."""
    totals: dict[str, float] = {}
    for reports in stats.values():
        for report in reports:
            path = getattr(report, "nodeid", "").split("::")[0]
            if path.endswith(".ipynb"):
                totals[path] = totals.get(path, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)
    return dict(sorted(totals.items()))


def pytest_terminal_summary(terminalreporter):
    """One line per notebook: how long it ran on this machine (the README's runtime column)."""
    totals = notebook_runtimes(terminalreporter.stats)
    if totals:
        terminalreporter.write_sep("-", "notebook runtimes on this machine")
        for path, seconds in totals.items():
            terminalreporter.write_line(f"{path}: {seconds:.0f} s")
