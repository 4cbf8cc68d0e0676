"""``python -m bench [--only NAME] [--runs N] [--objects N] [--out DIR]`` (see bench/README.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from bench.common import (DEFAULT_DATA_DIR, DEFAULT_RESULTS_DIR, HostLoad, StepError,
                          now_stamp)
from bench import deps
from bench.machine import machine_info
from bench.netem import EmulatedNetwork
from bench.origin import Origin, seaweed_version
from bench.report import RunRecord, WorkloadResult, markdown, summary_table, write_results
from bench.workloads import WORKLOADS
from bench.workloads.base import Sizes


@dataclass
class Context:
    args: argparse.Namespace
    origin: Origin
    work_dir: Path
    data_dir: Path
    sizes: Sizes
    mode: str = "loopback"             # the network mode being run
    netem: EmulatedNetwork | None = None  # set while the emulated network is on

    @property
    def contenders(self) -> list[str]:
        return self.args.contenders

    @staticmethod
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", action="append", choices=sorted(WORKLOADS), metavar="NAME",
                   help=f"run only this workload (repeatable); one of {', '.join(WORKLOADS)}")
    p.add_argument("--runs", type=int, default=None,
                   help="runs per workload in the loopback mode (default: each workload's own "
                        "count, 2-3, chosen so the full run takes ~40 min here; 1 with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="small sizes and 1 run: the whole harness in a few minutes")
    p.add_argument("--objects", type=int, default=None,
                   help="objects in the listing prefix (default 100000; 2000 with --smoke)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR,
                   help=f"where the JSON/markdown results go (default {DEFAULT_RESULTS_DIR})")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"persistent origin data + run dirs (default {DEFAULT_DATA_DIR})")
    p.add_argument("--repopulate", action="store_true",
                   help="upload the datasets again even if their marker exists")
    p.add_argument("--timeout", type=float, default=None,
                   help="timeout in seconds for each mount / find / umount / measured step "
                        "(default 900; 300 with --smoke)")
    p.add_argument("--contenders", default="objfs,s3fs,rclone",
                   help="FUSE clients to compare, comma-separated (default objfs,s3fs,rclone)")
    p.add_argument("--net", choices=("loopback", "emulated", "both"), default="both",
                   help="network modes: loopback as is, the emulated object-store network "
                        "(bench/netem.py; root), or both (default)")
    p.add_argument("--emulated-runs", type=int, default=None,
                   help="runs per workload in the emulated mode (default 1)")
    p.add_argument("--rate-mbit", type=float, default=400,
                   help="emulated per-connection bandwidth, each way (default 400 = 50 MB/s)")
    p.add_argument("--delay-ms", type=float, default=20,
                   help="emulated delay added to each request and SYN (default 20)")
    p.add_argument("--no-setup", action="store_true",
                   help="do not install missing tools (apt/pip) before running")
    p.add_argument("--origin-host", default="127.0.0.2",
                   help="loopback address the origin listens on (default 127.0.0.2)")
    p.add_argument("--mount-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `objfs mount` (repeatable, e.g. --mount-arg=--ttl=600)")
    p.add_argument("--keep-run-dirs", action="store_true",
                   help="keep each run's cache dir and logs even when the run succeeded")
    a = p.parse_args(argv)
    sizes = Sizes.smoke() if a.smoke else Sizes()
    if a.runs is None and a.smoke:
        a.runs = 1
    if a.objects is None:
        a.objects = sizes.listing_objects
    if a.timeout is None:
        a.timeout = sizes.step_timeout
    if a.emulated_runs is None:
        a.emulated_runs = 1
    if (a.runs is not None and a.runs < 1) or a.objects < 1 or a.emulated_runs < 1:
        p.error("--runs, --emulated-runs and --objects must be >= 1")
    from bench.mounts import CONTENDERS
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    a.sizes = replace(sizes, listing_objects=a.objects, step_timeout=a.timeout)
    return a


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = now_stamp()
    names = args.only or list(WORKLOADS)
    modes = ["loopback", "emulated"] if args.net == "both" else [args.net]
    data_dir = args.data_dir.resolve()
    work_dir = data_dir / "runs"
    work_dir.mkdir(parents=True, exist_ok=True)
    origin = Origin(data_dir, log=Context.log, host=args.origin_host)
    ctx = Context(args, origin, work_dir, data_dir, args.sizes)
    results: list[WorkloadResult] = []
    header: dict = {"schema": 2, "started_at": started,
                    "command": ["python", "-m", "bench", *sys.argv[1:]],
                    "settings": {"runs": args.runs, "emulated_runs": args.emulated_runs,
                                 "objects": args.objects, "smoke": args.smoke,
                                 "sizes": args.sizes.to_json(), "workloads": names,
                                 "contenders": ctx.contenders, "net": modes,
                                 "data_dir": str(data_dir), "timeout_s": args.timeout,
                                 "mount_args": args.mount_arg,
                                 "figure": "median of the runs that measured it, with min/max"}}
    error = None
    try:
        if not args.no_setup:
            header["deps"] = deps.ensure(ctx.contenders, "emulated" in modes, log=ctx.log)
        header["machine"] = machine_info(seaweed_version())
        header["machine"]["peers"] = deps.peer_versions()
        origin.start()
        header["origin"] = {"server": "SeaweedFS weed mini", "impl": origin.server_impl,
                            "endpoint": origin.endpoint, "data_dir": str(origin.server_dir),
                            "pid": origin.server.pid}
        for mode in modes:
            _run_mode(ctx, mode, names, results, header)
    except KeyboardInterrupt as e:
        error = f"interrupted ({e})"
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        ctx.log(f"harness error: {error}")
    finally:
        if ctx.netem is not None:
            ctx.netem.stop()
            ctx.netem = None
        try:
            origin.stop()
        except Exception as e:  # noqa: BLE001
            ctx.log(f"origin stop failed: {e}")
        header["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        header["error"] = error
        md = _markdown_doc(header, results)
        jpath, mpath = write_results(args.out, f"{stamp}-{'-'.join(names)}", header,
                                     results, md)
        print(md)
        ctx.log(f"results: {jpath} and {mpath}")
    ok = error is None and all(r.status == "ok" and all(x.status == "ok" for x in r.runs)
                               for r in results)
    return 0 if ok else 1


def _run_mode(ctx: Context, mode: str, names: list[str], results: list[WorkloadResult],
              header: dict) -> None:
    """Every selected workload that runs in ``mode``: setups first (datasets are populated at
    full speed, before the emulated network is on), then the runs."""
    args = ctx.args
    ctx.mode = mode
    todo = []
    for name in names:
        cls = WORKLOADS[name]
        # a workload runs in the modes it supports when asked for by name (--only), and in
        # its default modes when everything runs
        if mode not in (cls.modes if args.only else cls.default_modes):
            continue
        w = cls(ctx)
        res = WorkloadResult(name, w.description, w.metrics, mode=mode)
        if hasattr(w, "matrix"):
            res.matrix = w.matrix()
        results.append(res)
        ctx.log(f"== [{mode}] workload {name}: setup")
        try:
            res.setup = w.setup()
        except Exception as e:  # noqa: BLE001 - reported, never dropped
            res.status, res.error = "setup-failed", f"{e}\n{traceback.format_exc()}"
            ctx.log(f"{name}: setup failed: {e}")
            continue
        todo.append((w, res))
    if not todo:
        return
    if mode == "emulated":
        net = EmulatedNetwork(ctx.origin.host, ctx.origin.port, rate_mbit=args.rate_mbit,
                              delay_ms=args.delay_ms, log=ctx.log)
        header.setdefault("netem", net.describe())
        try:
            net.start()
        except Exception as e:  # noqa: BLE001
            for _, res in todo:
                res.status, res.error = "setup-failed", f"emulated network: {e}"
            ctx.log(f"emulated network unavailable: {e}")
            return
        ctx.netem = net
    try:
        for w, res in todo:
            res.settings = w.settings()
            if mode == "loopback":
                runs = args.runs or w.full_runs
            else:
                runs = args.emulated_runs
            try:
                for i in range(1, runs + 1):
                    ctx.log(f"== [{mode}] {res.name}: run {i}/{runs}")
                    rec = RunRecord(run=i, started_at=time.strftime("%H:%M:%S"))
                    res.runs.append(rec)
                    _one_run(ctx, w, rec)
            finally:
                w.teardown()
    finally:
        if ctx.netem is not None:
            header["netem"]["delay_cpu_s_total"] = round(ctx.netem.delay_cpu_s(), 3)
            if not ctx.netem.alive():
                header["netem"]["delay_process_died"] = True
            ctx.netem.stop()
            ctx.netem = None


def _one_run(ctx: Context, w, rec: RunRecord) -> None:
    t0 = time.perf_counter()
    host = HostLoad()
    try:
        w.run_once(rec)
    except StepError as e:
        rec.status, rec.error = e.status, str(e)
    except KeyboardInterrupt:
        rec.status, rec.error = "interrupted", "interrupted"
        raise
    except Exception as e:  # noqa: BLE001
        rec.status = "failed"
        rec.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        rec.wall_s = time.perf_counter() - t0
        rec.extra["host"] = host.finish()
        if ctx.netem is not None and not ctx.netem.alive():
            rec.extra["netem_delay_process_died"] = True
    if rec.status != "ok":
        ctx.log(f"{w.name} run {rec.run}: {rec.status}: {rec.error}")


def _markdown_doc(header: dict, results: list[WorkloadResult]) -> str:
    m = header.get("machine", {})
    s = header["settings"]
    lines = [f"## objfs bench — {header['started_at']}", ""]
    if m:
        deps = ", ".join(f"{k} {v}" for k, v in m.get("objfs_deps", {}).items())
        peers = m.get("peers", {})
        git = m.get("git", {})
        lines += [f"machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), "
                  f"{m.get('memory_gib')} GiB, kernel {m.get('kernel')}, {m.get('os')}, "
                  f"python {m.get('python')}",
                  f"software: objfs {m.get('objfs')} (git {str(git.get('commit'))[:10]}"
                  f"{', dirty tree' if git.get('dirty') else ''}; {deps}); "
                  f"SeaweedFS {m.get('seaweedfs')}; s5cmd {m.get('s5cmd')}; "
                  f"{peers.get('s3fs', 's3fs ?')}; {peers.get('rclone', 'rclone ?')}; "
                  f"{peers.get('fio', 'fio ?')}", ""]
    o = header.get("origin")
    if o:
        lines += [f"origin: {o['server']} at {o['endpoint']} ({o['impl']})", ""]
    net = header.get("netem")
    if net:
        lines += [f"emulated network: {net['per_connection_rate_MBps']:g} MB/s per connection "
                  f"each way ({net['classes_per_direction']} HTB classes per direction on lo), "
                  f"+{net['request_delay_ms']:g} ms on every request and SYN (NFQUEUE delay "
                  f"process, {net.get('delay_cpu_s_total', 0):.1f} s CPU in total)"
                  + (" — **the delay process died during the run**"
                     if net.get("delay_process_died") else ""), ""]
    runs = ", ".join(f"{r.title} {len(r.runs)}" for r in results)
    lines += [f"settings: runs per workload: {runs}; objects={s['objects']}, "
              f"timeout={s['timeout_s']} s per step, objfs mount args="
              f"{s['mount_args'] or 'none'}; each figure is the {s['figure']}", ""]
    if header.get("error"):
        lines += [f"**harness error**: {header['error']}", ""]
    summ = summary_table(results)
    if summ:
        lines += ["### Summary", "", *summ, "",
                  "Cells: median (min–max) over the runs; ratio columns: objfs / peer per run, "
                  "median. Details, all figures and failures per workload below.", ""]
    for r in results:
        lines.append(markdown(r))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
