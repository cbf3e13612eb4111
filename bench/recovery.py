"""Recovery after a kill -9 of one worker: braid vs torchrun, 4 CPU workers, CLIP tiny, one run each.

Recovery = seconds from the kill -9 of one worker process to the next completed training step.

braid: `braid run` of a 4-worker job (default timeouts) on `braid data synth` data; the sample
ledger says when each worker applied each step. The worker holding --kill-rank is killed once the
ledger shows --kill-steps[i] applied; recovery ends at the first "applied" event of a later
generation. Survivors keep their state, so nothing is redone.

torchrun: `torchrun --max-restarts=3 --rdzv-backend=c10d` of bench/torchrun_worker.py (open_clip
CLIP of the same shape, gloo DDP, checkpoint every 50 steps). The agent restarts all 4 processes,
which reload the checkpoint; recovery ends at the first step rank 0 logs after the kill, and the
steps between the checkpoint and the kill are redone.

Usage (from the repository root, after `cargo build --release`):
    .venv/bin/python bench/recovery.py --out bench/results/recovery-cpu-DATE.md

Prints a markdown table (and writes it to --out): kills, recovery seconds each, median, steps
redone, the ratio braid / torchrun, plus where each recovery's time went.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_S = 0.02


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Kill:
    """One kill -9 and what followed it."""

    at_step: int  # the step the driver waited for before killing
    rank: int
    pid: int
    kill_ms: int
    last_step_before: int  # highest step completed before the kill
    recovered_ms: int | None = None  # first completed step after the kill
    first_step_after: int | None = None
    caught_up_ms: int | None = None  # first step past last_step_before after the kill
    phases: list[tuple[str, int]] = field(default_factory=list)  # (what, unix ms), in order

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_ms is None else (self.recovered_ms - self.kill_ms) / 1000

    @property
    def redone(self) -> int | None:
        if self.first_step_after is None:
            return None
        return max(0, self.last_step_before - self.first_step_after + 1)


class JsonLines:
    """Reads the complete lines appended to a set of JSON-lines files since the last call."""

    def __init__(self, paths_fn):
        self.paths_fn = paths_fn
        self.offsets: dict[str, int] = {}

    def read(self) -> list[tuple[str, dict]]:
        out = []
        for path in self.paths_fn():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                if line.strip():
                    out.append((path, json.loads(line)))
        return out


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return kids


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this driver started `proc` in (start_new_session=True)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def kill_strays(work: str) -> None:
    """SIGKILL what this run started and is still alive outside its process groups (torchrun puts
    each worker in a session of its own): processes whose command line names the working folder."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if work in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(pred, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


# ---------------------------------------------------------------------------------------------
# braid


ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(\w+)\s+(.*)$")


def log_lines(path: str) -> list[tuple[int, str]]:
    """(unix ms, message) of each timestamped line of a braid log (tracing's UTC format)."""
    out = []
    try:
        text = open(path, errors="replace").read()
    except FileNotFoundError:
        return out
    for raw in text.splitlines():
        m = LOG_TIME.match(ANSI.sub("", raw))
        if m:
            t = datetime.datetime.fromisoformat(m.group(1)[:26]).replace(tzinfo=datetime.timezone.utc)
            out.append((int(t.timestamp() * 1000), m.group(3)))
    return out


def braid_phases(kill: Kill, gen_before: int, run_err: str, log_dir: str, respawn_ms: int | None) -> list:
    """Where a braid recovery went, from the coordinator's and workers' logs."""
    coord = [(t, m) for t, m in log_lines(run_err) if t >= kill.kill_ms]
    workers = [(t, m) for f in sorted(os.listdir(log_dir)) for t, m in log_lines(os.path.join(log_dir, f))
               if t >= kill.kill_ms]
    new_gen = f"generation={gen_before + 1}"
    phases = []

    def first(lines, needle):
        hits = [t for t, m in lines if needle(m)]
        return min(hits) if hits else None

    def last(lines, needle):
        hits = [t for t, m in lines if needle(m)]
        return max(hits) if hits else None

    for what, t in [
        ("a survivor's collective failed", first(workers, lambda m: f"generation {gen_before} failed" in m)),
        ("coordinator ended the generation", first(coord, lambda m: f"generation {gen_before} ended" in m)),
        ("braid run saw the exit, restarts", first(coord, lambda m: "restarting it" in m)),
        ("replacement process running", respawn_ms),
        ("all collectives connected", last(workers, lambda m: "collective connected" in m and new_gen in m)),
        ("all rendezvous complete (state received)",
         last(workers, lambda m: "rendezvous complete" in m and new_gen in m)),
        ("first step applied", kill.recovered_ms),
    ]:
        if t is not None:
            phases.append((what, t))
    return phases


def make_data(braid: str, data: str) -> int:
    """`braid data synth` into `data`; returns the tokenizer's vocabulary size (the model's)."""
    synth = subprocess.run([braid, "data", "synth", data, "--train-samples", "4000", "--eval-samples", "100",
                            "--json"], check=True, capture_output=True, text=True)
    return json.loads(synth.stdout)["vocab_size"]


def run_braid(args, work: str, braid: str, data: str) -> tuple[list[Kill], dict]:
    d = os.path.join(work, "braid")
    os.makedirs(d)
    job = os.path.join(d, "job.toml")
    with open(job, "w") as f:
        f.write(f"""[job]
name = "recovery-braid"
[model]
preset = "tiny"
[data]
train = "{data}/train/manifest.json"
tokenizer = "{data}/tokenizer.json"
decode_threads = 1
[train]
global_batch = 64
steps = {args.steps}
threads = 1
[cluster]
min_workers = 4
max_workers = 4
max_restarts = 3
[checkpoint]
url = "{d}/ckpt"
every_steps = 50
[telemetry]
sample_ledger = "{d}/ledger"
""")
    ledger_dir, log_dir = os.path.join(d, "ledger"), os.path.join(d, "logs")
    run_out, run_err = os.path.join(d, "run.json"), os.path.join(d, "run.err")
    cmd = [braid, "run", job, "--json", "--log-dir", log_dir, "--no-eval"]
    print(f"braid: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=open(run_out, "w"), stderr=open(run_err, "w"), start_new_session=True)
    ledger = JsonLines(lambda: [os.path.join(ledger_dir, f) for f in sorted(os.listdir(ledger_dir))]
                       if os.path.isdir(ledger_dir) else [])
    applied: list[dict] = []  # every "applied" event, in the order read
    rank_of_file: dict[str, int] = {}

    def pump() -> None:
        for path, e in ledger.read():
            rank_of_file[path] = e["rank"]
            if e["event"] == "applied":
                applied.append(e)

    kills = []
    try:
        for at_step in args.kill_steps:
            wait_until(lambda: (pump(), any(e["step"] >= at_step for e in applied))[1], args.timeout_s,
                       f"braid step {at_step}")
            workers = children(proc.pid)
            target = None
            for pid in workers:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        path = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if rank_of_file.get(path) == args.kill_rank:
                        target = pid
            if target is None:
                raise RuntimeError(f"no braid worker holds rank {args.kill_rank} (children {workers})")
            gen_before = max(e["generation"] for e in applied)
            os.kill(target, signal.SIGKILL)
            kill = Kill(at_step, args.kill_rank, target, now_ms(), 0)
            survivors = set(workers) - {target}
            respawn_ms = None

            def recovered():
                nonlocal respawn_ms
                pump()
                if respawn_ms is None and set(children(proc.pid)) - survivors - {target}:
                    respawn_ms = now_ms()
                return [e for e in applied if e["unix_ms"] > kill.kill_ms and e["generation"] > gen_before]

            after = wait_until(recovered, args.timeout_s, "braid's first step after the kill")
            kill.last_step_before = max(e["step"] for e in applied
                                        if e["unix_ms"] <= kill.kill_ms and e["generation"] == gen_before)
            first = min(after, key=lambda e: e["unix_ms"])
            kill.recovered_ms, kill.first_step_after = first["unix_ms"], first["step"]
            past = wait_until(lambda: (pump(), [e for e in applied if e["generation"] > gen_before
                                                and e["step"] > kill.last_step_before])[1],
                              args.timeout_s, "braid to pass the step of the kill")
            kill.caught_up_ms = min(e["unix_ms"] for e in past)
            time.sleep(1.0)  # let the logs of the rendezvous flush
            kill.phases = braid_phases(kill, gen_before, run_err, log_dir, respawn_ms)
            kills.append(kill)
            print(f"braid: killed rank {kill.rank} (pid {target}) after step {kill.last_step_before}; "
                  f"recovered in {kill.recovery_s:.2f} s", file=sys.stderr)
        proc.wait(timeout=args.timeout_s)
        summary = json.load(open(run_out))
    finally:
        kill_group(proc)
    return kills, {"summary": summary, "work": d}


# ---------------------------------------------------------------------------------------------
# torchrun


def run_torchrun(args, work: str, vocab: int) -> tuple[list[Kill], dict]:
    d = os.path.join(work, "torchrun")
    os.makedirs(d)
    step_log, out = os.path.join(d, "steps.jsonl"), os.path.join(d, "torchrun.log")
    cmd = [args.torchrun, "--nnodes=1", "--nproc-per-node=4", "--max-restarts=3", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{args.port}", os.path.join(REPO, "bench", "torchrun_worker.py"),
           "--ckpt-dir", os.path.join(d, "ckpt"), "--step-log", step_log, "--steps", str(args.steps),
           "--batch", "16", "--every", "50", "--vocab", str(vocab), "--threads", "1"]
    print(f"torchrun: {shlex.join(cmd)}", file=sys.stderr)
    # torchrun's default (since 2.5) shares the agent's TCPStore with the workers, and a restarted
    # group then reads the previous attempt's gloo addresses from it ("connectFullMesh failed ...
    # Connection refused"; pytorch/pytorch#135712). This is the opt-out that issue names.
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log = JsonLines(lambda: [step_log])
    events: list[dict] = []

    def pump() -> list[dict]:
        events.extend(e for _, e in log.read())
        return events

    def steps(restart_min: int = 0) -> list[dict]:
        return [e for e in pump() if e["event"] == "step" and e["restart"] >= restart_min]

    kills = []
    try:
        for at_step in args.kill_steps:
            wait_until(lambda: any(e["step"] >= at_step for e in steps()), args.timeout_s,
                       f"torchrun step {at_step}")
            target = None
            for pid in children(proc.pid):
                try:
                    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={args.kill_rank}".encode() in env:
                    target = pid
            if target is None:
                raise RuntimeError(f"no torchrun worker with RANK={args.kill_rank}")
            restart_before = max(e["restart"] for e in events)
            os.kill(target, signal.SIGKILL)
            kill = Kill(at_step, args.kill_rank, target, now_ms(), 0)
            after = wait_until(lambda: steps(restart_before + 1), args.timeout_s,
                               "torchrun's first step after the kill")
            kill.last_step_before = max(e["step"] for e in events if e["event"] == "step"
                                        and e["restart"] == restart_before and e["unix_ms"] <= kill.kill_ms)
            kill.recovered_ms, kill.first_step_after = after[0]["unix_ms"], after[0]["step"]
            past = wait_until(lambda: [e for e in steps(restart_before + 1) if e["step"] > kill.last_step_before],
                              args.timeout_s, "torchrun to pass the step of the kill")
            kill.caught_up_ms = past[0]["unix_ms"]
            joined = next(e for e in events if e["event"] == "joined" and e["restart"] == restart_before + 1)
            ready = next(e for e in events if e["event"] == "ready" and e["restart"] == restart_before + 1)
            kill.phases = [
                ("agent restarted the workers (rank 0 process started)", joined["unix_ms_process"]),
                ("rank 0 imported torch + open_clip", joined["unix_ms_imported"]),
                ("process group initialised (rendezvous)", joined["unix_ms"]),
                (f"checkpoint of step {ready['start_step'] - 1} loaded, DDP built", ready["unix_ms"]),
                ("first step completed", kill.recovered_ms),
                (f"back past step {kill.last_step_before}", kill.caught_up_ms),
            ]
            kills.append(kill)
            print(f"torchrun: killed rank {kill.rank} (pid {target}) after step {kill.last_step_before}; "
                  f"recovered in {kill.recovery_s:.2f} s, {kill.redone} steps redone", file=sys.stderr)
        rc = proc.wait(timeout=args.timeout_s)
    finally:
        kill_group(proc)
    return kills, {"rc": rc, "work": d}


# ---------------------------------------------------------------------------------------------
# report


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def median_recovery(kills: list[Kill]) -> float | None:
    xs = [k.recovery_s for k in kills if k.recovery_s is not None]
    return statistics.median(xs) if xs else None


def report(args, braid: list[Kill], torch_kills: list[Kill], started: str, load: tuple) -> str:
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mb, mt = median_recovery(braid), median_recovery(torch_kills)
    built = datetime.datetime.fromtimestamp(args.braid_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    git = ["git", "-C", REPO]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    commit = (commit or "unknown") + (" with uncommitted changes" if dirty.stdout.strip() else "")
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip() or "unknown"
    lines = [
        "# Recovery after kill -9 of one worker: braid vs torchrun",
        "",
        f"- Date: {started} (UTC)",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}; "
        f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}",
        f"- Command: `{args.command}`",
        f"- braid: {args.braid} built {built}, source at commit {commit}; torch {torch_version}, "
        "torchrun with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (without it a restarted gloo group reads the "
        "previous attempt's addresses from the shared store and fails to connect, pytorch/pytorch#135712).",
        "- Job: 4 CPU workers, CLIP tiny, global batch 64 (16 per worker), 1 intra-op thread each, "
        f"{args.steps} steps, checkpoint every 50 steps, default timeouts on both sides; "
        f"kill -9 of the rank-{args.kill_rank} worker once step {', '.join(map(str, args.kill_steps))} "
        "is done, one run per implementation.",
        "- Recovery: kill -9 to the next completed training step (braid: first `applied` ledger event of "
        "the next generation; torchrun: first step rank 0 logs after the restart). Catch-up: kill to the "
        "first step past the last one completed before the kill.",
        "",
        "| implementation | kills (after step) | recovery s, each | median recovery s | steps redone, each "
        "| catch-up s, each |",
        "|---|---|---|---|---|---|",
    ]
    for name, kills in [("braid", braid), ("torchrun", torch_kills)]:
        lines.append(
            f"| {name} | {len(kills)} ({', '.join(str(k.last_step_before) for k in kills)}) "
            f"| {', '.join(fmt_s(k.recovery_s) for k in kills)} | {fmt_s(median_recovery(kills))} "
            f"| {', '.join(str(k.redone) for k in kills)} "
            f"| {', '.join(fmt_s(None if k.caught_up_ms is None else (k.caught_up_ms - k.kill_ms) / 1000) for k in kills)} |")
    ratio = mb / mt if mb is not None and mt else None

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else "met" if ok else "NOT met"

    lines += [
        "",
        f"Ratio braid / torchrun (median recovery): **{'-' if ratio is None else f'{ratio:.3f}'}**. "
        f"Target: braid under 10 s ({verdict(None if mb is None else mb < 10)}) and under a third "
        f"of torchrun's ({verdict(None if ratio is None else ratio < 1 / 3)}).",
        "",
        "## Where the time went (seconds after the kill)",
        "",
    ]
    for name, kills in [("braid", braid), ("torchrun", torch_kills)]:
        for i, k in enumerate(kills, 1):
            steps = "; ".join(f"{what} +{(t - k.kill_ms) / 1000:.2f}" for what, t in k.phases)
            lines.append(f"- {name} kill {i} (pid {k.pid}, rank {k.rank}, after step {k.last_step_before}): {steps}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--braid", default=os.path.join(REPO, "target", "release", "braid"))
    ap.add_argument("--torchrun", default=os.path.join(os.path.dirname(sys.executable), "torchrun"))
    ap.add_argument("--steps", type=int, default=400, help="training steps of each run")
    ap.add_argument("--kill-steps", type=lambda s: [int(x) for x in s.split(",")], default=[125, 225, 325],
                    help="kill once these steps are done (comma-separated; at most 3, the restart budget)")
    ap.add_argument("--kill-rank", type=int, default=2, help="rank of the worker to kill (not 0: torchrun's logger)")
    ap.add_argument("--port", type=int, default=29611, help="torchrun's c10d rendezvous port")
    ap.add_argument("--timeout-s", type=float, default=300, help="give up waiting for any one thing after this")
    ap.add_argument("--work", help="working folder (default: a new temporary one, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--only", choices=["braid", "torchrun"], help="run one side only")
    args = ap.parse_args()
    if len(args.kill_steps) > 3:
        ap.error("at most 3 kills: both sides run with a restart budget of 3")
    args.command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                               else sys.executable] + sys.argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()
    work = args.work or tempfile.mkdtemp(prefix="braid-recovery-")
    os.makedirs(work, exist_ok=True)
    try:
        # A private copy, so a rebuild of target/release/braid during the run cannot change what
        # `braid run` spawns as the replacement worker (it execs its own path).
        os.makedirs(os.path.join(work, "bin"))
        braid = os.path.join(work, "bin", "braid")
        args.braid_mtime = os.path.getmtime(args.braid)
        shutil.copy2(args.braid, braid)
        data = os.path.join(work, "data")
        vocab = make_data(braid, data)
        braid_kills, torch_kills = [], []
        if args.only != "torchrun":
            braid_kills, info = run_braid(args, work, braid, data)
            s = info["summary"]
            print(f"braid: finished={s['finished']} restarts={s['restarts']} steps={s['steps']} "
                  f"final_loss={s['final_loss']:.3f}", file=sys.stderr)
        if args.only != "braid":
            torch_kills, info = run_torchrun(args, work, vocab)
            print(f"torchrun: exit code {info['rc']}", file=sys.stderr)
        text = report(args, braid_kills, torch_kills, started, load)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    finally:
        kill_strays(work)
        if args.keep or args.work:
            print(f"working folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
