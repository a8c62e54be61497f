"""Shared pieces of scripts/gpu-check: the time budget, the log, running commands with a bounded
time, what the worker binary offers, and the list of checks.

Standard library only: the GPU machine has no network and no pip.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Log:
    """Lines with elapsed seconds, to stdout and DIR/gpu-check.log."""

    def __init__(self, path: pathlib.Path):
        self.started = time.monotonic()
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def block(self, title: str, text: str, limit: int = 4000) -> None:
        """Writes a (tail of a) multi-line text into the log file only."""
        if not text:
            return
        if len(text) > limit:
            text = "...\n" + text[-limit:]
        self.file.write(f"----- {title}\n{text.rstrip()}\n-----\n")
        self.file.flush()


class Budget:
    """The whole run's time limit, handed out to stages in shares: a stage gets its share of what
    is left (so time one stage does not use goes to the ones after it), minus a reserve kept for
    writing the results."""

    def __init__(self, total_s: float, reserve_s: float = 10.0):
        self.total_s = total_s
        self.reserve_s = reserve_s
        self.started = time.monotonic()
        self.deadline = self.started + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stage(self, name: str, share: float, remaining_shares: float) -> "StageClock":
        usable = max(0.0, self.left() - self.reserve_s)
        slice_s = usable * share / max(share, remaining_shares)
        return StageClock(name, time.monotonic() + slice_s, slice_s)


class StageClock:
    def __init__(self, name: str, deadline: float, slice_s: float):
        self.name = name
        self.deadline = deadline
        self.slice_s = slice_s
        self.started = time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, cap: float) -> float:
        """Seconds a command may take now: at most `cap`, and no later than the stage's end."""
        return max(0.0, min(cap, self.left()))

    def has(self, seconds: float) -> bool:
        return self.left() >= seconds

    def seconds(self) -> float:
        return time.monotonic() - self.started


class Results:
    """Every check (pass/fail against a target) and everything skipped, with the reason."""

    def __init__(self):
        self.checks: list[dict] = []
        self.skipped: list[dict] = []

    def check(self, stage: str, name: str, kind: str, value, target: str, passed, note: str = "") -> dict:
        entry = {
            "stage": stage,
            "name": name,
            "kind": kind,  # "correctness" (decides the exit code) or "performance"
            "value": value,
            "target": target,
            "pass": passed,  # True, False, or None when it could not be judged
        }
        if note:
            entry["note"] = note
        self.checks.append(entry)
        return entry

    def skip(self, stage: str, what: str, why: str) -> None:
        self.skipped.append({"stage": stage, "what": what, "why": why})


def run(
    cmd: list[str],
    timeout: float,
    log: Log,
    name: str,
    logs_dir: pathlib.Path,
    env: dict | None = None,
    cwd: pathlib.Path | None = None,
) -> dict:
    """Runs `cmd` for at most `timeout` seconds (its whole process group is killed after that).
    stdout and stderr are kept in logs_dir/NAME.out / .err and returned."""
    started = time.monotonic()
    log(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)")
    if timeout <= 1:
        return {"rc": None, "timed_out": True, "stdout": "", "stderr": "", "seconds": 0.0, "not_started": True}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd or REPO,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        stdout, stderr = proc.communicate()
    seconds = time.monotonic() - started
    (logs_dir / f"{name}.out").write_text(stdout or "")
    (logs_dir / f"{name}.err").write_text(stderr or "")
    status = "timed out" if timed_out else f"rc={proc.returncode}"
    log(f"  {name}: {status} in {seconds:.1f} s")
    if timed_out or proc.returncode != 0:
        log.block(f"{name} stderr (tail)", stderr or "", 3000)
    return {"rc": proc.returncode, "timed_out": timed_out, "stdout": stdout or "", "stderr": stderr or "", "seconds": seconds}


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_json(stdout: str):
    """The last line of stdout that parses as a JSON object, or None."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(text: str, lines: int = 5) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


class Worker:
    """The worker binary and what its subcommands offer (read from --help, so the script runs
    against binaries from before and after a flag was added)."""

    def __init__(self, binary: str, device: str):
        self.binary = binary
        self.device = device
        self.help: dict[str, str] = {}
        for sub in ("generate", "serve", "bench"):
            try:
                out = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, timeout=30)
                self.help[sub] = out.stdout + out.stderr
            except (OSError, subprocess.TimeoutExpired) as err:
                self.help[sub] = f"ERROR: {err}"
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
            self.version = (out.stdout or out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            self.version = f"ERROR: {err}"

    def has_flag(self, sub: str, flag: str) -> bool:
        return re.search(rf"(^|\s){re.escape(flag)}[\s=<,]", self.help.get(sub, ""), re.M) is not None

    def dtypes(self, sub: str) -> list[str]:
        """Values of --dtype that `sub` accepts (clap prints `[possible values: f32, f16]`)."""
        text = self.help.get(sub, "")
        # The option's own block: from `--dtype <DTYPE>` to the next option.
        block = re.search(r"--dtype <[A-Z_]+>(.*?)(?=\n\s*-{1,2}[a-z]|\Z)", text, re.S)
        match = re.search(r"\[possible values: ([^\]]*)\]", block.group(1)) if block else None
        if not match:
            return ["f32"]
        return [v.strip() for v in match.group(1).split(",") if v.strip()]

    def device_args(self, sub: str) -> list[str]:
        """`--device DEV` where the subcommand has the flag; without it only for a device other
        than cpu (the command then fails and says so, which is what should happen)."""
        if self.has_flag(sub, "--device") or self.device != "cpu":
            return ["--device", self.device]
        return []


def rust_log_env() -> dict:
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    return env
