"""Helpers for tests/test_browser.py: a throw-away JupyterLab server and a headless Chromium.

Nothing here touches the user's Jupyter settings, kernels or browser profile: the server gets
fresh config/data/runtime/settings/workspace folders (with one ``python3`` kernel = this
interpreter), Chromium a fresh user-data dir; all are removed afterwards. The server is
``jupyter-lab`` itself (not a wrapper), so the PID we hold is the server's; it is stopped by
that PID, and any of its kernels still alive afterwards are ended by theirs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_ENV_VAR = "L2R_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Flags that work in containers run as root, with no network beyond package registries."""

# JupyterLab user settings for the test server: no autosave (running the notebook must not
# rewrite the file in the repository), every cell in the DOM (no windowing), no news/update pop-ups.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # notebooks stored without kernel metadata start the default kernel instead of asking
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def chromium_path() -> str | None:
    """The Chromium to drive: ``$L2R_CHROMIUM`` or ``/usr/bin/chromium``; None if not there."""
    path = os.environ.get(CHROMIUM_ENV_VAR, DEFAULT_CHROMIUM)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (read from /proc; empty where there is no /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class JupyterLabServer:
    """``jupyter-lab`` on 127.0.0.1 with a token, isolated settings, serving ``root_dir``.

    Use as a context manager; ``url(path)`` gives an address with the token. ``log()`` returns
    the server's output so far (for failure messages).
    """

    def __init__(self, root_dir: str | os.PathLike, startup_timeout: float = 90.0) -> None:
        self.root_dir = Path(root_dir).resolve()
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.home = Path(tempfile.mkdtemp(prefix="l2r-jupyterlab-"))
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> dict[str, str]:
        dirs = {name: self.home / name for name in
                ("config", "data", "runtime", "settings", "workspaces", "ipython", "checkpoints")}
        for folder in dirs.values():
            folder.mkdir()
        kernel = dirs["data"] / "kernels" / "python3"
        kernel.mkdir(parents=True)
        (kernel / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "metadata": {"debugger": False},
        }))
        for name, values in LAB_SETTINGS.items():
            target = dirs["settings"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps({
            "ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}},
        }))
        env = dict(os.environ)
        env.update({
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
            "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
            "IPYTHONDIR": str(dirs["ipython"]),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        })
        env.pop("JUPYTER_PATH", None)
        env.pop("JUPYTER_CONFIG_PATH", None)
        # the test run exports MPLBACKEND=agg; a learner's kernel has the inline backend
        env.pop("MPLBACKEND", None)
        return env

    def command(self) -> list[str]:
        executable = Path(sys.executable).parent / "jupyter-lab"
        if not executable.exists():
            found = shutil.which("jupyter-lab")
            if found is None:
                raise FileNotFoundError("jupyter-lab is not installed in this environment")
            executable = Path(found)
        cmd = [
            str(executable),
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.news_url=",
            # checkpoints go to the temporary folder, not to .ipynb_checkpoints/ in the repository
            f"--FileCheckpoints.checkpoint_dir={self.home / 'checkpoints'}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        return cmd

    def start(self) -> None:
        env = self._prepare()
        self._log_file = open(self.home / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            self.command(), cwd=self.home, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        status_url = f"http://127.0.0.1:{self.port}/api/status?token={self.token}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter-lab exited with code {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(status_url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"jupyter-lab did not answer within {self.startup_timeout:.0f} s:\n{self.log()}")

    # ------------------------------------------------------------------ use
    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def log(self, tail: int = 6000) -> str:
        try:
            text = (self.home / "server.log").read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return text[-tail:]

    # ------------------------------------------------------------------ tear-down
    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server by its PID (it shuts its kernels down), then make sure all are gone."""
        if self.process is not None:
            pid = self.process.pid
            descendants = _children(pid)
            if self.process.poll() is None:
                os.kill(pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    os.kill(pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
            deadline = time.monotonic() + 10
            for child in descendants:
                while _alive(child) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _alive(child):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> JupyterLabServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def launch_chromium(playwright, user_data_dir: str | os.PathLike, executable: str):
    """A headless Chromium (Debian's, never a downloaded one) with a fresh profile."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir),
        executable_path=executable,
        headless=True,
        args=list(CHROMIUM_FLAGS),
        viewport={"width": 1400, "height": 1000},
        timeout=60_000,
    )
