"""Preprocessing benchmark: a naive loop, the Ray Data pipeline and the decode floor, side by side.

    python benchmarks/preprocess.py [--studies 16] [--size 512] [--slice-spacing 1.0]
                                    [--workdir DIR] [--keep] [--big-slices 600]

One run measures, on the same generated studies (`cspine_ray.synth`, cached in the workdir so
re-runs skip generation) and with a warm page cache:

1. naive     the loop someone writes without this project, in the main process: dcmread every
             file (pixels included), sort by ImagePositionPatient z, pixel_array * slope +
             intercept as float32, scipy.ndimage.zoom every slice to 256, np.save the volume.
2. pipeline  `run_preprocess(data, out, PreprocessConfig(size=256, native_size=0))` (the shard
             volume alone, as the naive loop writes; the native level's cost is measured by
             benchmarks/native.py) on a local Ray with
             num_cpus = os.cpu_count() and no dashboard (as the preprocess command starts it),
             fresh output folder. Ray start-up (and the start of one worker process per CPU)
             happens before the clock starts and is reported apart.
3. floor     pure pixel decoding (dcmread + pixel_array) of every file in one process, divided
             by the CPU count: no pipeline that decodes every pixel can beat it. The pipeline
             does not: for 256 px shards it decodes JPEG 2000 at half resolution where the file
             allows (io/jpeg2000.py), which is why it can come in under this floor.
   (info)    the reduced decode floor: the decoding the pipeline itself does (JPEG 2000 at
             reduced resolution, other files in full), one process / CPU count. The pipeline
             time over this is its own overhead (reading headers twice, HU, resize, writes, Ray).
   (info)    full decoding in os.cpu_count() processes: how many CPUs the machine really
             delivered during the run (a VM's CPUs may not scale; other users take their share).

Goals (the issue, 2 cores): pipeline >= 1.7x the naive loop and <= 1.3x the floor.

Memory: the peak RSS (VmHWM) of every Ray worker process that ran studies, and the peak RSS of
`process_study` on one big study (768 x 768 x --big-slices, uncompressed, with and without its
segmentation) in a fresh subprocess; the project's target is ~1.5 GB for 768 x 768 x 600.

The machine may be shared: every measurement records the load average, the Linux CPU pressure,
the CPU share it got (CPU seconds / wall seconds / CPUs) and how long its processes waited for a
CPU (/proc/<pid>/schedstat). A starved measurement is repeated once and the faster run is kept;
the report adds an estimate without that waiting, and warns when decoding in os.cpu_count()
processes did not scale (then the goals cannot be judged from the run). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage
from tqdm import tqdm

SPEEDUP_GOAL = 1.7  # pipeline must be at least this much faster than the naive loop
FLOOR_GOAL = 1.3  # pipeline time must be at most this multiple of the decode floor
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIN_CPU_SHARE = 0.85  # below this a single-process measurement was starved by other users
BIG_STUDY_GOAL = 1.5e9  # bytes one 768 x 768 x 600 study may need
OUT_SIZE = 256
DATA_VERSION = 1  # bump when the generated dataset changes meaning


# ----------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    name: str
    seconds: float
    cpu_seconds: float  # CPU used by the measured processes during `seconds`
    cpus: int  # how many CPUs the method may use
    load_before: float  # 1-minute load average
    load_after: float
    pressure: float | None = None  # % of the time some task waited for a CPU (Linux PSI, avg10), at the end
    extra: dict = field(default_factory=dict)

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / (self.seconds * self.cpus)


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (None without PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def busy_text(m: "Measurement") -> str:
    psi = "" if m.pressure is None else f", CPU pressure {m.pressure:.0f}%"
    return f"load {m.load_before:.2f} -> {m.load_after:.2f}{psi}"


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def timed_in_process(name: str, fn, runs_left: int = 2) -> Measurement:
    """Time fn() in this process; repeat once (keep the faster) when other users starved it."""
    best = None
    for attempt in range(runs_left):
        load = os.getloadavg()[0]
        cpu0, wait0, t0 = self_cpu(), sched_wait(), time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - t0
        extra["waited_for_cpu_s"] = sched_wait() - wait0
        m = Measurement(name, seconds, self_cpu() - cpu0, 1, load, os.getloadavg()[0], cpu_pressure(), extra)
        print(f"  {name}: {seconds:.1f} s, CPU share {m.cpu_share:.2f}, waited for a CPU "
              f"{extra['waited_for_cpu_s']:.1f} s, {busy_text(m)}")
        best = m if best is None or m.seconds < best.seconds else best
        if m.cpu_share >= MIN_CPU_SHARE:
            break
        if attempt + 1 < runs_left:
            print(f"  {name}: got only {m.cpu_share:.0%} of a core (machine busy): measuring again")
    return best


# ----------------------------------------------------------------------------- dataset


def generate(args) -> Path:
    """The synthetic RSNA layout for these arguments, generated once and reused."""
    from cspine_ray.synth import dataset_specs, write_dataset

    n_test = max(2, args.studies // 8)
    params = {"version": DATA_VERSION, "studies": args.studies, "n_test": n_test, "size": args.size,
              "slice_spacing": args.slice_spacing, "seed": 0}
    root = args.workdir / f"data-{args.studies}x{args.size}px-{args.slice_spacing:g}mm"
    stamp = root / "benchmark-dataset.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"dataset: reusing {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    specs = dataset_specs(args.studies - n_test, seed=0, n_test=n_test, size=args.size,
                          slice_spacing=args.slice_spacing)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    write_dataset(tmp, specs, processes=os.cpu_count() or 1)
    tmp.rename(root)
    stamp.write_text(json.dumps(params))
    print(f"dataset: generated {len(specs)} studies in {time.perf_counter() - t0:.0f} s into {root}")
    return root


def generate_big(args) -> tuple[Path, Path]:
    """One 768 x 768 x ~--big-slices study (uncompressed, segmented), generated once."""
    from cspine_ray.synth import StudySpec, write_study

    root = args.workdir / f"big-768px-{args.big_slices}"
    stamp = root / "benchmark-dataset.json"
    # the synthetic neck is ~195 mm long: choose the slice spacing that gives ~big_slices slices
    spacing = round(max(0.3, 195.0 / args.big_slices), 3)
    spec = StudySpec(uid="1.2.826.0.1.3680043.10.9.1", index=1, seed=9, size=768, slice_spacing=spacing,
                     has_segmentation=True)
    params = {"version": DATA_VERSION, "uid": spec.uid, "size": 768, "slice_spacing": spacing}
    if not (stamp.exists() and json.loads(stamp.read_text()) == params):
        shutil.rmtree(root, ignore_errors=True)
        print(f"big study: generating 768 x 768 at {spacing} mm (once, ~1-2 min)...")
        t0 = time.perf_counter()
        write_study(spec, root)
        stamp.write_text(json.dumps(params))
        print(f"big study: generated in {time.perf_counter() - t0:.0f} s")
    return root / "train_images" / spec.uid, root / "segmentations" / f"{spec.uid}.nii"


def study_folders(data: Path) -> list[Path]:
    return sorted(p for split in ("train_images", "test_images") for p in (data / split).glob("*") if p.is_dir())


def warm_page_cache(files: list[Path]) -> float:
    """Read every file once so that all three methods read from memory, not disk."""
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the three methods


def naive_study(folder: Path, out: Path) -> int:
    """The plain loop for one study; returns its slice count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]), reverse=True)  # head first
    slices = []
    for ds in datasets:
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append(ndimage.zoom(hu, (OUT_SIZE / hu.shape[0], OUT_SIZE / hu.shape[1]), order=1))
    np.save(out / f"{folder.name}.npy", np.stack(slices))
    return len(slices)


def run_naive(folders: list[Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    slices = sum(naive_study(f, out) for f in tqdm(folders, desc="naive", unit="study", leave=False))
    return {"slices": slices}


def full_decode(path: Path) -> tuple[int, bool]:
    """The floor's work for one file: dcmread + pixel_array. Returns (pixels, decoded reduced)."""
    return pydicom.dcmread(path).pixel_array.size, False


def pipeline_decode(path: Path) -> tuple[int, bool]:
    """The decoding the pipeline itself does for OUT_SIZE shards: JPEG 2000 at reduced resolution
    where the file allows (io/jpeg2000.py), everything else in full."""
    from cspine_ray.io.jpeg2000 import decode_reduced
    from cspine_ray.preprocess.resample import halvings

    ds = pydicom.dcmread(path)
    band = decode_reduced(ds, halvings((int(ds.Rows), int(ds.Columns)), OUT_SIZE))
    return (band.size, True) if band is not None else (ds.pixel_array.size, False)


def run_floor(files: list[Path], decode=full_decode, desc: str = "decode floor") -> dict:
    pixels = reduced = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in tqdm(files, desc=desc, unit="file", leave=False, mininterval=1.0):
            n, was_reduced = decode(path)
            pixels, reduced = pixels + n, reduced + was_reduced
    return {"pixels": pixels, "files_decoded_reduced": reduced}


def _decode_files(paths: list[Path]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(full_decode(p)[0] for p in paths)


def run_parallel_decode(files: list[Path], cpus: int) -> Measurement:
    """The floor's decoding in `cpus` processes: what this machine really delivers in parallel now
    (a VM's CPUs may not scale, and other users take their share)."""
    best = None
    for attempt in range(2):
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), os.times()
        with ProcessPoolExecutor(cpus) as pool:  # small chunks balance the slow (JPEG 2000) files
            list(pool.map(_decode_files, [files[i:i + 8] for i in range(0, len(files), 8)]))
        seconds, c1 = time.perf_counter() - t0, os.times()
        cpu = c1.children_user + c1.children_system - c0.children_user - c0.children_system
        m = Measurement("parallel decode", seconds, cpu, cpus, load, os.getloadavg()[0], cpu_pressure())
        print(f"  parallel decode ({cpus} processes): {seconds:.1f} s, CPU share {m.cpu_share:.2f}, {busy_text(m)}")
        best = m if best is None or m.seconds < best.seconds else best
        if m.cpu_share >= MIN_CPU_SHARE:
            break
        if attempt == 0:
            print("  parallel decode: the machine was busy (low CPU share): measuring again")
    return best


def _worker_warmup(row: dict) -> dict:
    """Import what a study task imports, so the pipeline's clock does not time worker start-up."""
    import cspine_ray.preprocess.study  # noqa: F401  (pydicom, nibabel, the resampler)

    time.sleep(1.0)  # hold this worker so that the other rows land on other workers
    return {"pid": os.getpid(), "code": str(Path(cspine_ray.preprocess.study.__file__).parents[1])}


def warm_up_workers(cpus: int) -> tuple[set[int], set[str]]:
    """One tiny Ray Data map over `cpus` rows: starts the worker processes and pays Ray Data's
    own worker-side imports (pyarrow, the executor) outside the timed region."""
    import ray

    ray.data.DataContext.get_current().op_resource_reservation_enabled = False  # as the pipeline does
    ds = ray.data.from_items([{"i": i} for i in range(cpus)], override_num_blocks=cpus)
    rows = list(ds.map(_worker_warmup, num_cpus=1).iter_rows())
    return {r["pid"] for r in rows}, {r["code"] for r in rows}


def _proc_cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; psutil is not a dependency)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def sched_wait(pid: int | str = "self") -> float:
    """Seconds the main thread of a process spent runnable but waiting for a CPU (/proc/<pid>/schedstat):
    time other processes held the CPUs. The measured work runs on the main thread (Ray workers too)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _proc_status(pid: int, key: str) -> int:
    """A memory line of /proc/<pid>/status (VmHWM = peak RSS, VmRSS) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _ray_kind(cmd: str) -> str | None:
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "worker"
    if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray/_private",
                              "runtime_env/agent", "monitor.py")):
        return "ray-system"
    return None


class RaySampler(threading.Thread):
    """Samples every Ray process during the pipeline run: worker peak RSS and CPU of all of them."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.kind: dict[int, str] = {}
        self.hwm: dict[int, int] = {}  # pid -> VmHWM bytes (the kernel's own peak RSS)
        self.rss0: dict[int, int] = {}  # pid -> RSS when first seen
        self.cpu0: dict[int, float] = {}
        self.cpu1: dict[int, float] = {}
        self.wait0: dict[int, float] = {}  # pid -> seconds waited for a CPU
        self.wait1: dict[int, float] = {}
        self.poll()

    def poll(self) -> None:
        for pid in _descendants(os.getpid()):  # only our Ray: others may run theirs meanwhile
            try:
                if pid not in self.kind:
                    kind = _ray_kind(_proc_cmdline(pid))
                    if kind is None:
                        continue
                    self.kind[pid] = kind
                    self.cpu0[pid] = _proc_cpu(pid)
                    self.rss0[pid] = _proc_status(pid, "VmRSS")
                    if kind == "worker":
                        self.wait0[pid] = sched_wait(pid)
                self.cpu1[pid] = _proc_cpu(pid)
                if self.kind[pid] == "worker":
                    self.hwm[pid] = max(self.hwm.get(pid, 0), _proc_status(pid, "VmHWM"))
                    self.wait1[pid] = sched_wait(pid)
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.poll()

    def cpu_used(self, kind: str) -> float:
        return sum(self.cpu1[p] - self.cpu0[p] for p in self.cpu1 if self.kind[p] == kind)


def run_pipeline_measured(data: Path, out: Path, cpus: int) -> Measurement:
    """Start Ray (untimed), then time run_preprocess while sampling the Ray processes."""
    import ray

    from cspine_ray.preprocess.config import PreprocessConfig
    from cspine_ray.preprocess.pipeline import run_preprocess
    from cspine_ray.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=cpus, dashboard=False)  # as `python -m cspine_ray.preprocess` starts it
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_pids, code = warm_up_workers(cpus)
    warmed = time.perf_counter() - t0
    print(f"  Ray start-up {started:.1f} s, {len(warm_pids)} worker(s) warmed up in {warmed:.1f} s (not timed); "
          f"workers run {', '.join(sorted(code))}")
    time.sleep(2.0)  # let start-up work (agents) settle before the clock starts

    best = None
    for attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        sampler = RaySampler()
        sampler.start()
        load = os.getloadavg()[0]
        cpu0, t0 = self_cpu(), time.perf_counter()
        manifest = run_preprocess(data, out, PreprocessConfig(size=OUT_SIZE, native_size=0),
                                  num_cpus=cpus)
        seconds = time.perf_counter() - t0
        driver_cpu = self_cpu() - cpu0
        sampler.finish()
        worker_cpu, system_cpu = sampler.cpu_used("worker"), sampler.cpu_used("ray-system")
        ok = int((manifest["status"] == "ok").sum())
        busy = [p for p in sampler.kind if sampler.kind[p] == "worker"
                and (p in warm_pids or sampler.cpu1[p] - sampler.cpu0[p] > 1.0)]
        m = Measurement("pipeline", seconds, worker_cpu + system_cpu + driver_cpu, cpus, load, os.getloadavg()[0],
                        cpu_pressure(), {
            "ok_studies": ok, "failed_studies": int(len(manifest) - ok),
            "worker_cpu_s": worker_cpu, "ray_system_cpu_s": system_cpu, "driver_cpu_s": driver_cpu,
            "ray_start_s": started, "worker_warmup_s": warmed,
            "workers": {str(p): {"peak_rss_mb": sampler.hwm[p] / 2**20,
                                 "rss_before_mb": sampler.rss0[p] / 2**20,
                                 "cpu_s": sampler.cpu1[p] - sampler.cpu0[p],
                                 "waited_for_cpu_s": sampler.wait1[p] - sampler.wait0[p],
                                 "warmed": p in warm_pids} for p in busy},
        })
        waited = sum(w["waited_for_cpu_s"] for w in m.extra["workers"].values())
        m.extra["worker_waited_for_cpu_s"] = waited
        # a worker's wall time is running + waiting for a CPU + idle (no task: start, tail, scheduling)
        m.extra["worker_idle_s"] = len(busy) * seconds - sum(w["cpu_s"] for w in m.extra["workers"].values()) - waited
        print(f"  pipeline: {seconds:.1f} s ({ok} ok), CPU: workers {worker_cpu:.1f} s, Ray system "
              f"{system_cpu:.1f} s, driver {driver_cpu:.1f} s; CPU share {m.cpu_share:.2f}, {busy_text(m)}")
        print(f"  pipeline: {len(busy)} workers x {seconds:.1f} s = running {worker_cpu:.1f} s + waiting for a CPU "
              f"{waited:.1f} s + idle {m.extra['worker_idle_s']:.1f} s (no study to run: start, tail, Ray)")
        best = m if best is None or m.seconds < best.seconds else best
        # repeat only a run whose workers clearly waited for CPUs that other processes held
        if waited <= 0.15 * seconds * max(len(busy), 1) or attempt == 1:
            break
        print("  pipeline: the workers waited long for CPUs that other processes held: measuring again")
    ray.shutdown()
    return best


# ----------------------------------------------------------------------------- one big study

BIG_STUDY_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from cspine_ray.preprocess.config import PreprocessConfig
from cspine_ray.preprocess.study import StudyItem, process_study
base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
image_dir, seg, out = sys.argv[1], sys.argv[2], sys.argv[3]
item = StudyItem(study_uid=Path(image_dir).name, split="train", image_dir=image_dir,
                 segmentation=seg or None)
(Path(out) / "studies").mkdir(parents=True)
t0 = time.perf_counter()
row = process_study(item, PreprocessConfig(size=256), out)
seconds = time.perf_counter() - t0
ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# VmHWM is this process image's own peak; ru_maxrss also counts the parent's RSS at fork time
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"status": row.status, "reason": row.reason, "slices": row.n_slices,
                  "seconds": seconds, "peak_rss": peak, "ru_maxrss": ru_maxrss, "rss_after_imports": base}))
"""


def big_study_memory(image_dir: Path, seg: Path, workdir: Path, with_seg: bool) -> dict:
    """Peak RSS of process_study on the big study, in a fresh interpreter."""
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        env = dict(os.environ, OMP_NUM_THREADS="1")  # what a Ray worker with num_cpus=1 gets
        proc = subprocess.run([sys.executable, "-c", BIG_STUDY_CHILD, str(image_dir),
                               str(seg) if with_seg else "", str(Path(out) / "shards")],
                              capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(n_studies: int, naive: Measurement, floor: Measurement, reduced: Measurement,
           parallel: Measurement, pipe: Measurement, cpus: int) -> dict:
    floor_s = floor.seconds / cpus
    reduced_s = reduced.seconds / cpus
    speedup = naive.seconds / pipe.seconds
    vs_floor = pipe.seconds / floor_s
    vs_reduced = pipe.seconds / reduced_s
    scaling = floor.seconds / parallel.seconds
    print()
    print(f"{n_studies} studies, {cpus} CPUs, load average now {os.getloadavg()[0]:.2f}")
    print(f"{'method':<30}{'seconds':>8}{'studies/s':>10}{'CPU share':>10}   machine")
    rows = [("naive (1 process)", naive.seconds, naive),
            (f"pipeline (Ray, {cpus} CPUs)", pipe.seconds, pipe),
            (f"decode floor (1 process / {cpus})", floor_s, floor),
            (f"reduced decode (1 process / {cpus})", reduced_s, reduced),
            (f"decode in {cpus} processes (info)", parallel.seconds, parallel)]
    for name, seconds, m in rows:
        print(f"{name:<30}{seconds:>8.1f}{n_studies / seconds:>10.3f}{m.cpu_share:>10.2f}   {busy_text(m)}")
    print(f"CPU seconds (independent of other users' load): naive {naive.cpu_seconds:.1f}, pipeline "
          f"{pipe.cpu_seconds:.1f} (workers {pipe.extra['worker_cpu_s']:.1f} + Ray processes "
          f"{pipe.extra['ray_system_cpu_s']:.1f} + driver {pipe.extra['driver_cpu_s']:.1f}), decode {floor.cpu_seconds:.1f}")
    print(f"pipeline speed-up over naive: {speedup:.2f}x (goal >= {SPEEDUP_GOAL}x)  {verdict(speedup >= SPEEDUP_GOAL)}")
    print(f"pipeline time / decode floor: {vs_floor:.2f}x (goal <= {FLOOR_GOAL}x)  {verdict(vs_floor <= FLOOR_GOAL)}")
    print(f"pipeline time / decode in {cpus} processes: {pipe.seconds / parallel.seconds:.2f}x (info)")
    print(f"pipeline time / the pipeline's own decoding (JPEG 2000 at reduced resolution, "
          f"{reduced.extra['files_decoded_reduced']} of the files): {vs_reduced:.2f}x (info: its overhead)")
    # Estimate without other users: drop the time our processes waited for a CPU (the pipeline's
    # workers ran side by side, so their mean wait). Only an estimate: Ray's own processes also wait.
    n_workers = max(len(pipe.extra["workers"]), 1)
    est_naive = naive.seconds - naive.extra["waited_for_cpu_s"]
    est_floor = (floor.seconds - floor.extra["waited_for_cpu_s"]) / cpus
    est_pipe = pipe.seconds - pipe.extra["worker_waited_for_cpu_s"] / n_workers
    print(f"estimate without waiting for CPUs: naive {est_naive:.1f} s, pipeline {est_pipe:.1f} s, floor "
          f"{est_floor:.1f} s -> speed-up {est_naive / est_pipe:.2f}x, vs floor {est_pipe / est_floor:.2f}x")
    if scaling < MIN_CPU_SHARE * cpus:
        print(f"WARNING: plain decoding in {cpus} processes ran only {scaling:.2f}x faster than in one: this "
              f"machine did not deliver {cpus} CPUs (other users); the goals cannot be judged from this run")
    return {"speedup": speedup, "vs_floor": vs_floor, "floor_s": floor_s, "parallel_scaling": scaling,
            "reduced_floor_s": reduced_s, "vs_reduced_floor": vs_reduced,
            "estimate_without_waiting": {"naive_s": est_naive, "pipeline_s": est_pipe, "floor_s": est_floor,
                                         "speedup": est_naive / est_pipe, "vs_floor": est_pipe / est_floor},
            "speedup_pass": speedup >= SPEEDUP_GOAL, "floor_pass": vs_floor <= FLOOR_GOAL}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=16, help="generated studies (>= 3; default 16)")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels (10%% of studies are 1.5x)")
    parser.add_argument("--slice-spacing", type=float, default=1.0, help="mm between slices (~195 mm of neck)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cspine-ray-bench-preprocess",
                        help="holds the cached datasets and the outputs")
    parser.add_argument("--keep", action="store_true", help="keep the naive and pipeline outputs")
    parser.add_argument("--big-slices", type=int, default=600,
                        help="slices of the 768 x 768 memory study (0 skips it; default 600)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.studies < 3:
        parser.error("--studies must be at least 3")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.workdir.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    data = generate(args)
    folders = study_folders(data)
    files = sorted(p for f in folders for p in f.iterdir() if p.is_file())
    print(f"dataset: {len(folders)} studies, {len(files)} files, "
          f"{sum(p.stat().st_size for p in files) / 2**20:.0f} MiB; "
          f"page cache warmed in {warm_page_cache(files):.1f} s")

    print("measuring (one after another, same files):")
    floor = timed_in_process("decode floor", lambda: run_floor(files))
    reduced = timed_in_process("reduced decode floor",
                               lambda: run_floor(files, pipeline_decode, "reduced decode floor"))
    parallel = run_parallel_decode(files, cpus)
    naive = timed_in_process("naive", lambda: run_naive(folders, args.workdir / "out-naive"))
    pipe = run_pipeline_measured(data, args.workdir / "out-pipeline", cpus)
    results = {"studies": len(folders), "files": len(files), "cpus": cpus, "size": args.size,
               "slice_spacing": args.slice_spacing, "naive": vars(naive), "floor": vars(floor),
               "parallel_decode": vars(parallel), "reduced_floor": vars(reduced), "pipeline": vars(pipe)}
    results.update(report(len(folders), naive, floor, reduced, parallel, pipe, cpus))

    workers = pipe.extra["workers"]
    print("peak memory per Ray worker (VmHWM, the kernel's peak RSS; it includes imported libraries):")
    for pid, w in sorted(workers.items()):
        print(f"  worker {pid}: peak {w['peak_rss_mb']:.0f} MB (idle before the run {w['rss_before_mb']:.0f} MB), "
              f"CPU {w['cpu_s']:.1f} s")

    if args.big_slices > 0:
        image_dir, seg = generate_big(args)
        results["big_study"] = {}
        for with_seg in (False, True):
            r = big_study_memory(image_dir, seg, args.workdir, with_seg)
            results["big_study"]["with_segmentation" if with_seg else "images_only"] = r
            # the part above the imports grows with the slice count; scale it to 600 slices
            at600 = r["rss_after_imports"] + (r["peak_rss"] - r["rss_after_imports"]) * 600 / max(r["slices"], 1)
            r["peak_rss_at_600"] = at600
            print(f"one 768 x 768 x {r['slices']} study {'with' if with_seg else 'without'} segmentation "
                  f"({r['status']}): peak RSS {r['peak_rss'] / 1e9:.2f} GB (after imports "
                  f"{r['rss_after_imports'] / 1e9:.2f} GB), {r['seconds']:.1f} s; at 600 slices ~{at600 / 1e9:.2f} GB "
                  f"{verdict(at600 <= BIG_STUDY_GOAL)} (goal ~{BIG_STUDY_GOAL / 1e9:.1f} GB)")

    if not args.keep:
        for name in ("out-naive", "out-pipeline"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"peak RSS of this driver process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
