"""All benchmarks in one command, each section in its own process (its peak memory is its own).

    python benchmarks/run.py                       # every section -> benchmarks/results/benchmarks.{json,md}
    python benchmarks/run.py --sections sngan32 cyclegan --iters 10

Sections (medians over ``--iters`` repetitions after a warm-up; device, dtype, layout, threads,
torch version, the CPU model and its avx2 / avx512_bf16 / amx flags recorded). Each section runs in
its own process and the results files are rewritten after each one: a failed section is named in
them and the others are kept. Everything runs on a fresh clone (bundled data only).

* ``conv``      the fp32 convolution ceiling of this CPU (3x3, 256 channels, forward + backward)
* ``gans``      one training iteration of each family at 64 px, batch 64 (shipped widths)
* ``sngan32``   mimicry's SNGAN-32 shape (ResNet G 4.3 M / D 1.1 M, ch 64, hinge, batch 64):
                one D step, one G step, one iteration of 5 D + 1 G steps
* ``cyclegan``  junyanz's shape (resnet_9blocks G x2, 70x70 PatchGAN x2, ngf = ndf = 64, LSGAN,
                identity 0.5, pool 50): batch 1 at 256 px and batch 4 at 128 px
* ``effnet``    EfficientNet-B0 training steps (efficientnet-pytorch): batch 16 at 224, 64 at 64
* ``segmentation``  compare_monuseg's U-Net: its training step, and a whole 1000 px image predicted
                (BatchNorm as trained and folded into the convolutions)
* ``data``      decoding a folder into the tile cache, tensor flips/rot90, albumentations 'classic'
* ``scale``     time and peak memory against the number of tiles (``--scale 1000 10000 100000``):
                gan-generate (PNG + sha256 per tile), then piq-report of that set
* ``metrics``   feature passes (pixels, EfficientNet-B0 at 64 px) and KID on 1k tiles

Every training section is timed twice: the reference-equivalent path (fp32, NCHW, eager, the
ResNet blocks resampling literally -- interpolate / pool, then convolve: what mimicry and
pytorch-CycleGAN-and-pix2pix run, on the same networks) and histosynth's default
path on this device: the one the engine chooses by measuring the candidates the shipped ``auto``
keys admit (fp32 / bf16 where the CPU has it natively, NCHW / channels_last; histosynth/autotune.py),
measured again here for each network; the ratio is the speed-up. The paths of one benchmark
take turns step by step (``_timed_together``), so a host whose speed drifts slows them alike.
Since the reference-equivalent path is one of the candidates, the default is never slower than
it, up to timing noise.
The reference figures quoted in issue 6 (measured on this machine kind) are printed beside them.
FLOPs per iteration are counted with torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histosynth.checkpoint import atomic_write_text  # noqa: E402
from histosynth.runtime import Runtime, cpu_facts  # noqa: E402

DEMO = ROOT / "data" / "lung_demo"
# the CycleGAN section times steps, not translations: two bundled folders of 384 px H&E crops stand
# in for the two domains, so the benchmarks run on a fresh clone
BUNDLED_A = ROOT / "data" / "monuseg_demo" / "train" / "images"
BUNDLED_B = ROOT / "data" / "monuseg_demo" / "test" / "images"
# issue 6: medians measured with the reference code on this machine kind (2 cores, fp32)
QUOTED = {"sngan32_d_step": 2.43, "sngan32_g_step": 3.58, "sngan32_iteration": 15.7,
          "cyclegan_b1_256": 5.83, "cyclegan_b4_128": 6.18}
REFERENCE = "reference-equivalent (fp32, NCHW, eager)"
DEFAULT = "histosynth default (measured choice)"
COMPILED = "histosynth default + train.compile on"


def _sync(rt: Runtime):
    return torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)


def _median_time(fn, iters: int, rt: Runtime, warmup: int = 1) -> float:
    return _timed_together({0: fn}, iters, {0: rt}, {0: warmup})[0]


def _timed_together(fns: dict, iters: int, runtimes: dict, warmup: dict | None = None) -> dict[str, float]:
    """Median seconds of ``iters`` timed calls of each of ``fns`` (name -> function), the functions
    taking turns, in alternating order, after ``warmup[name]`` untimed calls each (default 1): a
    host whose speed drifts during a run (the same U-Net step measured 0.185 and 0.227 s an hour
    apart on the shared 2-core machine) then slows every path alike, and their ratio holds.
    ``runtimes``: name -> the Runtime whose device is synchronised around each call."""
    for name, fn in fns.items():
        for _ in range((warmup or {}).get(name, 1)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(iters):
        for name in order if i % 2 == 0 else order[::-1]:
            sync = _sync(runtimes[name])
            sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def _flops(fn) -> int | None:
    """FLOPs of one call (torch.utils.flop_counter); None where the counter cannot follow the
    step (the gradient penalty's double backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
    except RuntimeError:
        return None
    return int(fc.get_total_flops())


def _reference_runtime() -> Runtime:
    """fp32, NCHW, and the per-tensor Adam / AdamW loop, as the reference implementations run."""
    return dataclasses.replace(Runtime.from_choices("auto", "off", "off"), fused_optimizers=False)


def _paths(name: str, build, compile: bool = False) -> list[tuple[str, object, Runtime, dict]]:
    """(path, task, runtime, measured candidates) for the reference-equivalent path, histosynth's
    default path -- the one the engine chooses, measured here now between the candidates the
    shipped ``auto`` keys admit (histosynth/autotune.py; with ``compile``, the compiled twin of the
    fastest eager path too, as ``train.compile: auto`` does for a long run) -- and, with
    ``compile`` where the default is eager, that path compiled (``train.compile: on``: what
    compiling would give). ``build(rt)``: a fresh task on runtime ``rt``."""
    from gans.layers import set_fused
    from histosynth import autotune
    from histosynth.runtime import cpp_compiler
    ref = _reference_runtime()
    can_compile = compile and (torch.cuda.is_available() or cpp_compiler() is not None)
    choice = autotune.choose(name, build, Runtime.candidates("auto", "auto", "auto", cpu_fast_path=True,
                                                             compile="auto" if can_compile else "off"),
                             force=True)
    paths = [(REFERENCE, ref), (DEFAULT, choice.runtime)]
    if can_compile and not choice.runtime.compiled:
        paths.append((COMPILED, dataclasses.replace(choice.runtime, compiled=True)))
    out = []
    for path, rt in paths:
        torch.manual_seed(0)
        torch._dynamo.reset()     # a training run has one shape: no dynamic-shape kernels from the last size
        task = build(rt)
        if path == REFERENCE:     # the papers' code resamples, then convolves; one convolution (gans/layers.py)
            for module in task.modules.values():
                set_fused(module, fused=False)
        out.append((path, task, rt, choice.seconds if path != REFERENCE else {}))
    return out


def _gan_builder(family: str, size: int, batch: int, ch: int | None, extra=()):
    from gans.adversarial import GANTask, load_data
    from gans.config import GANConfig
    from histosynth import config as configlib

    sets = [f"data.image_size={size}", f"train.batch_size={batch}", "data.cache=memory",
            *extra] + ([f"model.ch={ch}"] if ch else [])
    cfg = configlib.load(GANConfig, family, sets)[0]
    data = load_data(cfg, progress=False)
    return lambda rt: GANTask(cfg, data, rt)


def _row(bench: str, path: str, rt: Runtime, s: float, n_img: int, measured: dict, **extra) -> dict:
    return {"bench": bench, "path": path, "runtime": rt.describe(), "s": s, "images_per_s": n_img / s,
            **({"candidates_s_per_step": measured} if measured else {}), **extra}


def section_gans(iters: int) -> list[dict]:
    rows = []
    for family in ("dcgan", "sngan", "wgan_gp"):
        paths = _paths(family, _gan_builder(family, 64, 64, None))
        s = _timed_together({p: task.train_step for p, task, _, _ in paths}, iters, {p: rt for p, _, rt, _ in paths})
        for path, task, rt, measured in paths:
            rows.append(_row(f"{family} 64px b64 iteration", path, rt, s[path], task.plan.images_per_step, measured,
                             flops=_flops(task.train_step)))
    return rows


def section_sngan32(iters: int) -> list[dict]:
    rows = []
    extra = ["train.n_dis=5", "train.diffaugment=''", "loss.type=hinge"]
    paths = _paths("sngan", _gan_builder("sngan", 32, 64, 64, extra), compile=True)
    runtimes = {p: rt for p, _, rt, _ in paths}
    warm = {p: 3 if rt.compiled else 1 for p, rt in runtimes.items()}    # compiling: the first calls (grad on / off)

    def d_step(task):                             # one D update, its real batch drawn as in training
        return lambda: task.d_step(*task.real_batch())

    def g_step(task):
        _, y = task.real_batch()
        return lambda: task.g_step(y)
    d = _timed_together({p: d_step(task) for p, task, _, _ in paths}, iters, runtimes, warm)
    g = _timed_together({p: g_step(task) for p, task, _, _ in paths}, iters, runtimes, warm)
    it = _timed_together({p: task.train_step for p, task, _, _ in paths}, max(1, iters // 2), runtimes)  # 5 D + 1 G
    for path, task, rt, measured in paths:
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in task.modules.items()}
        fl = _flops(task.train_step)
        for name, s, n_img, quoted in (("D step", d[path], 64, "sngan32_d_step"),
                                       ("G step", g[path], 64, "sngan32_g_step"),
                                       ("iteration (5 D + 1 G)", it[path], 64 * 5, "sngan32_iteration")):
            rows.append(_row(f"SNGAN-32 {name} (G {params['G'] / 1e6:.2f} M, D {params['D'] / 1e6:.2f} M)",
                             path, rt, s, n_img, measured, quoted_reference_s=QUOTED[quoted],
                             flops=fl if name.startswith("iteration") else None))
    return rows


def cyclegan_config(batch: int, size: int):
    """junyanz's CycleGAN shape on the bundled stand-in domains."""
    from gans.train_gan import load_config
    return load_config("cyclegan_cpu", [f"data.root_a={BUNDLED_A}", f"data.root_b={BUNDLED_B}",
                                        f"train.batch_size={batch}", f"data.image_size={size}",
                                        "data.load_size=256", "data.cache=memory", "model.ngf=64",
                                        "model.ndf=64", "model.n_blocks=9", "model.d_layers=3",
                                        "loss.type=lsgan", "loss.lambda_identity=0.5",
                                        "loss.pool_size=50"])[0]


def section_cyclegan(iters: int) -> list[dict]:
    from gans.families.cyclegan import CycleGANTask, load_data

    rows = []
    for batch, size, quoted in ((1, 256, "cyclegan_b1_256"), (4, 128, "cyclegan_b4_128")):
        cfg = cyclegan_config(batch, size)
        data = load_data(cfg, progress=False)
        paths = _paths("cyclegan", lambda rt: CycleGANTask(cfg, data, rt), compile=True)
        runtimes = {p: rt for p, _, rt, _ in paths}
        fns = {p: task.train_step for p, task, _, _ in paths}
        # the convolution ceiling, timed in the same turns (10 calls a turn: ~1 s), so that the
        # share of it that CycleGAN reaches does not depend on when each was measured
        conv_rt = _reference_runtime()
        convs = _conv_steps(conv_rt)
        for i, c in enumerate(convs):
            fns[i], runtimes[i] = (lambda c=c: [c.step() for _ in range(10)]), conv_rt
        s = _timed_together(fns, iters, runtimes, {p: 3 if rt.compiled else 1 for p, rt in runtimes.items()})
        ceiling = max(10 * c.flops / s[i] for i, c in enumerate(convs))
        fl = _flops(paths[0][1].train_step)            # every path computes the same arithmetic
        for path, task, rt, measured in paths:
            rows.append(_row(f"CycleGAN resnet_9blocks b{batch} {size}px iteration", path, rt, s[path], batch,
                             measured, quoted_reference_s=QUOTED[quoted], flops=fl, flop_per_s=fl / s[path],
                             conv_ceiling_flop_per_s=ceiling))
    return rows


def section_effnet(iters: int) -> list[dict]:
    """The classifier's own training step (ClassifierTask.train_step: batch assembly from uint8
    tiles, forward, loss, backward, AdamW) on random tiles; the reference is efficientnet-pytorch's
    network as it comes (its memory-efficient swish, fp32, NCHW)."""
    import numpy as np
    from classifier.config import ClassifierConfig
    from classifier.data import TileDataset
    from classifier.model import set_same_padding
    from classifier.task import ClassifierTask
    from histosynth import config as configlib

    from histosynth import autotune

    rows = []
    for batch, size in ((16, 224), (64, 64)):
        tiles = np.random.default_rng(0).integers(0, 256, (2 * batch, 3, size, size), dtype=np.uint8)
        data = TileDataset(tiles, np.arange(2 * batch) % 3)
        cfg = configlib.load(ClassifierConfig, None, [f"model.image_size={size}", f"train.batch_size={batch}",
                                                      "train.epochs=1000"])[0]
        t = cfg.train

        def build(rt):
            return ClassifierTask(cfg, data, tiles[:1], np.zeros(1, int), ["a", "b", "c"], rt, seed=0)
        choice = autotune.choose("classifier", build, Runtime.candidates(t.device, t.amp, t.channels_last),
                                 force=True)
        runtimes, tasks = {REFERENCE: _reference_runtime(), DEFAULT: choice.runtime}, {}
        for path, rt in runtimes.items():
            torch.manual_seed(0)
            tasks[path] = build(rt)
            if path == REFERENCE:
                tasks[path].model.body.set_swish(memory_efficient=True)    # efficientnet-pytorch's defaults
                set_same_padding(tasks[path].model.body, folded=False)
        s = _timed_together({p: task.train_step for p, task in tasks.items()}, iters, runtimes)
        for path, task in tasks.items():
            rows.append(_row(f"EfficientNet-B0 train step b{batch} {size}px", path, runtimes[path], s[path], batch,
                             choice.seconds if path == DEFAULT else {}, flops=_flops(task.train_step)))
    return rows


def section_segmentation(iters: int) -> list[dict]:
    """compare_monuseg.yaml's U-Net, the two costs of its cells: the training step
    (SegmentationTask.train_step on crops of the bundled MoNuSeg demo tiles), reference-equivalent
    path against the measured default; and one whole 1000 px image predicted (predict_image) on the
    reference-equivalent path, on the prediction path with the BatchNorms as trained, and on the
    prediction path with them folded into the convolutions, as predict_images runs it (the folding,
    once per call of predict_images, is not timed)."""
    import copy

    import numpy as np
    from experiments.config import CompareConfig
    from histosynth import autotune
    from histosynth import config as configlib
    from histosynth.runtime import fold_batchnorm
    from segmentation.data import load_pairs
    from segmentation.task import PairDataset, SegmentationTask, predict_image, segmenter_runtime

    cfg = configlib.load(CompareConfig, "compare_monuseg.yaml", [])[0].downstream
    m, t = cfg.model, cfg.train
    demo = ROOT / "data" / "monuseg_demo"
    pairs = load_pairs(demo / "train", m.tile_size, 1, None, None, False)
    data = PairDataset(pairs.images, pairs.masks, "flip_rot90", m.image_size, 0)

    def build(rt):
        return SegmentationTask(cfg, data, None, None, rt, 0)
    choice = autotune.choose("segmenter", build, segmenter_runtime(cfg, candidates=True), force=True)
    runtimes, tasks = {REFERENCE: _reference_runtime(), DEFAULT: choice.runtime}, {}
    for path, rt in runtimes.items():
        torch.manual_seed(0)
        tasks[path] = build(rt)
    s = _timed_together({p: task.train_step for p, task in tasks.items()}, iters, runtimes)
    net = f"U-Net ({m.encoder}, decoder {'/'.join(map(str, m.decoder_channels or ['smp']))})"
    rows = [_row(f"{net} train step b{t.batch_size} {m.image_size}px", path, runtimes[path], s[path], t.batch_size,
                 choice.seconds if path == DEFAULT else {}, flops=_flops(task.train_step))
            for path, task in tasks.items()]

    image = load_pairs(demo / "test", None, 1, None, None, False).images[0]            # 3 x 384 x 384
    image = np.pad(image, ((0, 0), (308, 308), (308, 308)), mode="reflect")          # 1000 px, as MoNuSeg's
    trained = copy.deepcopy(tasks[DEFAULT].model).eval()
    predict = segmenter_runtime(cfg, inference=True)
    unfolded = "prediction path, BatchNorm as trained"
    runtimes = {REFERENCE: _reference_runtime(), unfolded: predict, DEFAULT: predict}
    models = {REFERENCE: runtimes[REFERENCE].prepare(copy.deepcopy(trained)),
              unfolded: predict.prepare(copy.deepcopy(trained)), DEFAULT: predict.prepare(fold_batchnorm(trained))}
    calls = {p: (lambda p=p: predict_image(models[p], image, runtimes[p], cfg.eval.window)) for p in models}
    s = _timed_together(calls, iters, runtimes)
    rows += [_row(f"{net} whole {image.shape[1]}px image predicted", path, runtimes[path], s[path], 1, {},
                  flops=_flops(calls[path])) for path in calls]
    return rows


def section_data(iters: int) -> list[dict]:
    import numpy as np
    from classifier.augment import build_augment
    from histosynth.data import TileCache, flip_rot90

    src = DEMO / "train"
    n = sum(1 for _ in src.rglob("*.jpg"))
    t = time.perf_counter()
    cache = TileCache.build(src, 64, cache_dir=None, progress=False)
    decode = time.perf_counter() - t
    x = torch.from_numpy(np.asarray(cache.images[:64]).copy())
    gen = torch.Generator().manual_seed(0)
    rt = Runtime.from_choices("cpu", "off", "off")
    s_flip = _median_time(lambda: flip_rot90(x, gen, "flip_rot90"), iters, rt)
    aug = build_augment("classic", 0)
    imgs = [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in np.asarray(cache.images[:64])]
    s_alb = _median_time(lambda: [aug(image=im) for im in imgs], iters, rt)
    return [{"bench": f"decode {n} JPEGs into the 64 px tile cache", "path": "once per data set",
             "s": decode, "images_per_s": n / decode},
            {"bench": "tensor flips/rot90 (GAN loop), batch 64 at 64 px", "path": "per step", "s": s_flip,
             "images_per_s": 64 / s_flip},
            {"bench": "albumentations 'classic' (classifier), 64 tiles at 64 px", "path": "per step",
             "s": s_alb, "images_per_s": 64 / s_alb}]


SCALE_SIZES = [1000, 10000]


def _timed_child(code: str) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of ``code`` run in a fresh Python process."""
    wrapped = ("import sys,time,resource; sys.path.insert(0, %r); t=time.perf_counter()\n%s\n"
               "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)" % (str(ROOT), code))
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    s, rss = out.stdout.split()[-2:]
    return float(s), int(rss) / 1024


def section_scale(iters: int) -> list[dict]:
    """Time and peak memory against the number of tiles: gan-generate N tiles, then piq-report of
    those N synthetic tiles against the demo's real test split (pixel features, 64 px, 2
    subsamples; every pass streams through the memory-mapped tile cache). Each in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from gans.train_gan import load_config, train_gan
        cfg, _ = load_config("dcgan", ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=2",
                                       "data.cache=memory"])
        run = Path(tmp) / "run"
        train_gan(cfg, run, progress=False)
        for n in SCALE_SIZES:
            per_class = n // 3
            fake = Path(tmp) / f"g{n}"
            s, rss = _timed_child("from gans.generate import generate; generate(%r, %r, %d, progress=False)"
                                  % (str(run), str(fake), per_class))
            rows.append({"bench": f"gan-generate {per_class * 3} tiles (dcgan 64 px, PNG + sha256)",
                         "path": "histosynth default", "s": s, "images_per_s": per_class * 3 / s,
                         "peak_rss_mb": rss, "tiles": per_class * 3})
            s, rss = _timed_child(
                "import os; os.environ['HISTOSYNTH_CACHE']=%r; from metrics.report import build_report; "
                "build_report(%r, %r, %r, extractor='pixels', size=64, progress=False, n_boot=2)"
                % (str(Path(tmp) / "cache"), str(DEMO / "test"), str(fake), str(Path(tmp) / f"r{n}")))
            rows.append({"bench": f"piq-report of {per_class * 3} synthetic tiles vs the demo test split "
                                  "(pixel features, 64 px, overall + per class, 2 subsamples)",
                         "path": "histosynth default", "s": s, "images_per_s": per_class * 3 / s,
                         "peak_rss_mb": rss, "tiles": per_class * 3})
            shutil.rmtree(fake)
    return rows


def section_metrics(iters: int) -> list[dict]:
    import numpy as np
    from classifier.model import create_classifier
    from metrics.distribution import kid
    from metrics.features import ClassifierExtractor, PixelExtractor

    x = torch.randint(0, 256, (1000, 3, 64, 64), dtype=torch.uint8)
    rows = []
    rt = Runtime.from_choices("auto", "off", "off")
    pix = PixelExtractor()
    s = _median_time(lambda: [pix(x[i:i + 64]) for i in range(0, 1000, 64)], max(1, iters // 3), rt)
    rows.append({"bench": "pixel features, 1000 tiles", "path": "histosynth default", "s": s, "images_per_s": 1000 / s})
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": create_classifier("efficientnet-b0", 3).state_dict(), "variant": "efficientnet-b0"},
                   Path(tmp) / "w.pt")
        ext = ClassifierExtractor(Path(tmp) / "w.pt", "efficientnet-b0", 64)
        s = _median_time(lambda: [ext(x[i:i + 64]) for i in range(0, 1000, 64)], 1, rt)
    rows.append({"bench": "EfficientNet-B0 features at 64 px, 1000 tiles", "path": "histosynth default", "s": s,
                 "images_per_s": 1000 / s})
    f1, f2 = torch.from_numpy(np.random.default_rng(0).normal(size=(1000, 1280))).float(), \
        torch.from_numpy(np.random.default_rng(1).normal(size=(1000, 1280))).float()
    s = _median_time(lambda: kid(f1, f2), max(1, iters // 3), rt)
    rows.append({"bench": "KID (piq), 1000 x 1000 tiles, 1280-d", "path": "histosynth default", "s": s,
                 "images_per_s": 2000 / s})
    return rows


class ConvStep(NamedTuple):
    bench: str
    layout: str
    batch: int
    step: Callable[[], None]    # one forward + backward
    flops: int


def _conv_steps(rt: Runtime) -> list[ConvStep]:
    """The fp32 convolution microbenchmark: 3x3, 256 channels (CycleGAN's resnet blocks are such
    convolutions at 64x64 for 256 px input), forward + backward, NCHW and channels_last."""
    out = []
    for batch, ch, hw in ((1, 256, 64), (4, 256, 32)):
        for layout in ("NCHW", "channels_last"):
            torch.manual_seed(0)
            conv = torch.nn.Conv2d(ch, ch, 3, padding=1).to(rt.device)
            x = torch.randn(batch, ch, hw, hw, device=rt.device, requires_grad=True)
            if layout == "channels_last":
                conv, x = conv.to(memory_format=torch.channels_last), \
                    x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

            def step(conv=conv, x=x):
                conv(x).sum().backward()
            out.append(ConvStep(f"fp32 conv3x3 {ch}->{ch} at {hw}x{hw}, b{batch}, forward + backward", layout,
                                batch, step, _flops(step)))
    return out


def section_conv(iters: int) -> list[dict]:
    """The plain fp32 convolution throughput of this CPU: the ceiling the CycleGAN figures are read
    against (the cyclegan section also times it in turns with its own steps)."""
    rt = Runtime.from_choices("auto", "off", "off")
    convs = _conv_steps(rt)
    s = _timed_together({i: c.step for i, c in enumerate(convs)}, max(iters, 5), {i: rt for i in range(len(convs))})
    return [{"bench": c.bench, "path": f"microbenchmark, {c.layout}", "runtime": f"{rt.device} | fp32 | {c.layout}",
             "s": s[i], "images_per_s": c.batch / s[i], "flops": c.flops} for i, c in enumerate(convs)]


SECTIONS = {"conv": section_conv, "gans": section_gans, "sngan32": section_sngan32, "cyclegan": section_cyclegan,
            "effnet": section_effnet, "segmentation": section_segmentation, "data": section_data, "scale": section_scale,
            "metrics": section_metrics}


def _run_one(name: str, iters: int) -> list[dict]:
    rows = SECTIONS[name](iters)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    for r in rows:
        r["section"] = name
        r.setdefault("peak_rss_mb", rss)
        r["peak_cuda_mb"] = cuda
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    cpu = (f"CPU: {meta['cpu']}; flags {', '.join(meta['cpu_flags']) or 'none of avx2/avx512/amx'}; "
           f"torch kernels {meta['torch_cpu_capability']}, oneDNN ISA {meta['onednn_max_cpu_isa']}"
           if "cpu_flags" in meta else f"CPU: {meta.get('cpu', '?')}")
    lines = [f"device: {meta['device'].replace(' | ', ', ')}; torch {meta['torch']}; {meta['threads']} threads; "
             f"medians of {meta['iters']} after warm-up; {meta['time']}", "", cpu, "",
             "| benchmark | path | runtime | s | images/s | speed-up vs fp32 eager | quoted reference s | x quoted | GFLOP/s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["bench"]: r["s"] for r in rows if r["path"] == REFERENCE}
    for r in rows:
        ratio = f"{base[r['bench']] / r['s']:.2f}x" if r["bench"] in base and not r["path"].startswith("reference") else ""
        quoted = r.get("quoted_reference_s")
        xq = f"{quoted / r['s']:.2f}x" if quoted else ""
        gflops = f"{r['flops'] / r['s'] / 1e9:.1f}" if r.get("flops") else ""
        runtime = r.get("runtime", "").replace(" | ", ", ")
        lines.append(f"| {r['bench']} | {r['path']} | {runtime} | {r['s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {ratio} | {quoted or ''} | {xq} | {gflops} | {r['peak_rss_mb']:.0f} |")
    measured = [r for r in rows if r.get("candidates_s_per_step")]
    if measured:
        lines += ["", "The default path is the engine's measured choice (histosynth/autotune.py); the candidates "
                      "the shipped `auto` keys admit, seconds per step as measured for the choice:"]
        lines += [f"- {r['bench']}: " + ", ".join(f"{k.split(' | ', 1)[1]} {v:.3g}" for k, v in
                                                  r["candidates_s_per_step"].items()) + f" -> {r['runtime']}"
                  for r in measured if r["path"] == DEFAULT]
    conv = max((r["flops"] / r["s"] for r in rows if r.get("section") == "conv" and r.get("flops")), default=None)
    if conv:
        lines += ["", f"fp32 convolution ceiling (best of the conv section's microbenchmark): {conv / 1e9:.1f} GFLOP/s"]
    cyc = [r for r in rows if r.get("section") == "cyclegan" and r.get("flops") and "fp32" in r.get("runtime", "")]
    if cyc and (conv or any(r.get("conv_ceiling_flop_per_s") for r in cyc)):
        lines += ["", "CycleGAN against the fp32 convolution ceiling (the best of the same microbenchmark, timed in "
                      "turns with the CycleGAN steps; the conv section's, timed earlier, in brackets):"]
        for r in cyc:
            own = r.get("conv_ceiling_flop_per_s")
            rate = r["flops"] / r["s"]
            lines.append(f"- {r['bench']}, {r['path']}: {rate / 1e9:.1f} GFLOP/s"
                         + (f" = {100 * rate / own:.0f} % of {own / 1e9:.1f}" if own else "")
                         + (f" ({100 * rate / conv:.0f} % of {conv / 1e9:.1f})" if conv else ""))
    peak = meta.get("peak_bf16_tflops")
    if peak:
        lines += ["", f"MFU against the device's dense bf16 peak ({peak:.0f} TFLOP/s):"]
        lines += [f"- {r['bench']}, {r['path']}: {r['flops'] / r['s'] / 1e12:.2f} TFLOP/s = "
                  f"{100 * r['flops'] / r['s'] / 1e12 / peak:.2f} %" for r in rows if r.get("flops")]
    for name, why in meta.get("failed", {}).items():
        lines += ["", f"section {name} FAILED: {why}"]
    return "\n".join(lines) + "\n"


# dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets) for the MFU column; HISTOSYNTH_PEAK_TFLOPS
# overrides, e.g. for a GPU not listed or a power-capped one
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def device_peak_tflops() -> float | None:
    import os
    if os.environ.get("HISTOSYNTH_PEAK_TFLOPS"):
        return float(os.environ["HISTOSYNTH_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _write(out: Path, meta: dict, rows: list[dict]) -> str:
    atomic_write_text(out / "benchmarks.json", json.dumps({"meta": meta, "results": rows}, indent=1))
    md = _markdown(meta, rows)
    atomic_write_text(out / "benchmarks.md", md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--scale", type=int, nargs="+", default=SCALE_SIZES, metavar="N",
                    help="tile counts of the scaling section (e.g. 1000 10000 100000)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render", action="store_true", help="only rewrite benchmarks.md from benchmarks.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        data = json.loads((out / "benchmarks.json").read_text())
        atomic_write_text(out / "benchmarks.md", _markdown(data["meta"], data["results"]))
        return
    if args._child:
        SCALE_SIZES[:] = args.scale
        print(json.dumps(_run_one(args._child, args.iters)))
        return
    rt = Runtime.from_choices("auto", "auto", "auto", cpu_fast_path=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            **cpu_facts(), "device": rt.describe() + (
                f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "iters": args.iters, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "failed": {},
            "peak_bf16_tflops": device_peak_tflops()}
    rows: list[dict] = []
    for name in args.sections:               # each section alone; what finished is written at once
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        run = subprocess.run([sys.executable, __file__, "--_child", name, "--iters", str(args.iters),
                              "--scale", *map(str, args.scale)], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            meta["failed"][name] = (run.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
            print(f"benchmarks: section {name} failed; going on with the others", file=sys.stderr)
        else:
            rows += json.loads(run.stdout.strip().splitlines()[-1])
        md = _write(out, meta, rows)
    print(md)
    if meta["failed"]:
        raise SystemExit(f"benchmark sections failed: {', '.join(meta['failed'])} (the others are in {out})")


if __name__ == "__main__":
    main()
