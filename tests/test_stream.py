"""Streams: Stream Batch gives each frame the image its own step-by-step run gives (checked against diffusers'
components driven by hand), residual CFG follows its formula, the similarity filter's skip chance, the queues'
back-pressure and shutdown, bad frames named while the stream goes on, the CLI over folders and videos, and a
stream leaving the pipeline as it found it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from sdaccel.optim.run.sampler import run
from sdaccel.optim.spec.errors import ConfigError
from sdaccel.optim.spec.optimization import config_class
from sdaccel.optim.spec.pipeline import GenerationRequest, PipelineSpec
from sdaccel.optim.stream.frames import load_frame
from sdaccel.optim.stream.guidance import guided, residual_noise
from sdaccel.optim.stream.pipeline import StreamPipeline
from sdaccel.optim.stream.queues import CLOSED, FrameError, FrameQueue, StreamRunner
from sdaccel.optim.stream.settings import StreamSettings
from sdaccel.optim.stream.similarity import SimilarityFilter, skip_probability

SIZE = 64


def frames(count: int, seed: int = 0, moving: bool = True):
    """Smooth random frames (a static scene when not `moving`)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=(SIZE, SIZE),
                                           mode="bilinear", align_corners=False)
    out = []
    for i in range(count):
        shift = torch.roll(base, shifts=i * 5, dims=-1) if moving else base
        out.append(shift.clamp(0, 1))
    return out


def stream_images(prepared, settings, inputs):
    outputs = []
    with StreamPipeline(prepared, settings) as stream:
        for i, frame in enumerate(inputs):
            outputs += stream.push(frame, i)
        outputs += stream.flush()
    return {o.frame: o.image for o in outputs}, stream


@pytest.fixture(scope="module")
def turbo(checkpoints):
    from sdaccel.optim.run.cache import PipelineCache

    cache = PipelineCache(max_entries=2)
    return cache, cache.prepare(PipelineSpec(model=checkpoints.get("sd-turbo")))


@pytest.fixture(scope="module")
def sd15(checkpoints):
    from sdaccel.optim.run.cache import PipelineCache

    cache = PipelineCache(max_entries=2)
    return cache, cache.prepare(PipelineSpec(model=checkpoints.get("sd15")))


def by_hand(prepared, settings, frame):
    """One frame's image from diffusers' own parts, step by step: the VAE's mean latent, LCM's timesteps and
    boundary scalings (or trailing timesteps for Turbo), the stream's fixed per-step noise, plain epsilon
    prediction; guidance written out as the RCFG paper defines it."""
    from diffusers import LCMScheduler

    pipe = prepared.pipe
    lcm = LCMScheduler.from_config({k: v for k, v in prepared.loaded.scheduler_config.items()
                                    if not k.startswith("_")})
    n = settings.steps
    if settings.scheduler == "lcm":
        lcm.set_timesteps(n, strength=settings.strength)
        ts = [int(t) for t in lcm.timesteps[:n]]
        scalings = [lcm.get_scalings_for_boundary_condition_discrete(t) for t in ts]
    else:
        ts = [max(0, round(1000 * settings.strength * (1 - k / n)) - 1) for k in range(n)]
        scalings = [(0.0, 1.0)] * n
    noise = torch.randn((n, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(settings.seed))
    cond, uncond = pipe.encode_prompt(settings.prompt, "cpu", 1, True, settings.negative_prompt or None)
    with torch.no_grad():
        x0 = pipe.vae.encode(frame * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        a = [float(lcm.alphas_cumprod[t]) ** 0.5 for t in ts]
        s = [(1 - float(lcm.alphas_cumprod[t])) ** 0.5 for t in ts]
        x = a[0] * x0 + s[0] * noise[0:1]
        for k, t in enumerate(ts):
            eps = pipe.unet(x, t, encoder_hidden_states=cond).sample
            if settings.cfg_mode == "self" and settings.cfg > 1:
                virtual = (x - a[k] * x0) / s[k]
                eps = settings.delta * virtual + settings.cfg * (eps - settings.delta * virtual)
            c_skip, c_out = scalings[k]
            denoised = c_out * (x - s[k] * eps) / a[k] + c_skip * x
            if k + 1 < n:
                x = a[k + 1] * denoised + s[k + 1] * noise[k + 1:k + 2]
        image = pipe.vae.decode(denoised / pipe.vae.config.scaling_factor).sample
    return (image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("family, scheduler, cfg_mode", [("sd-turbo", "turbo", "none"), ("sd15", "lcm", "self"),
                                                         ("sd15", "lcm", "none")])
def test_stream_batch_gives_each_frame_its_own_step_by_step_image(request, family, scheduler, cfg_mode):
    _, prepared = request.getfixturevalue("turbo" if family == "sd-turbo" else "sd15")
    settings = StreamSettings(prompt="a lighthouse", width=SIZE, height=SIZE, steps=3, strength=0.6,
                              scheduler=scheduler, cfg_mode=cfg_mode, cfg=1.8, delta=0.8, seed=4)
    inputs = frames(5)
    batched, stream = stream_images(prepared, settings, inputs)
    one_by_one, _ = stream_images(prepared, settings.with_(stream_batch=False), inputs)
    assert sorted(batched) == sorted(one_by_one) == list(range(5))
    assert stream.stats.unet_calls == 5 + 2 and stream.stats.unet_rows == 3 * 7  # 3 frames' steps per call
    for i, frame in enumerate(inputs):
        assert float((batched[i] - one_by_one[i]).abs().max()) < 2e-4
        assert float((batched[i] - by_hand(prepared, settings, frame)).abs().max()) < 2e-4
    assert float((batched[0] - batched[1]).abs().max()) > 1e-3  # different frames, different images


def test_sdxl_turbo_streams_with_its_added_conditioning(checkpoints):
    """SDXL-Turbo (which StreamDiffusion itself does not run): its pooled text embeds and time ids go with every
    row of the batch, so Stream Batch equals frame by frame, and the frames differ."""
    from sdaccel.optim.run.cache import PipelineCache

    prepared = PipelineCache(max_entries=1).prepare(PipelineSpec(model=checkpoints.get("sdxl-turbo")))
    settings = StreamSettings(prompt="a lighthouse", width=SIZE, height=SIZE, steps=2, strength=0.6,
                              cfg_mode="none", seed=2)
    inputs = frames(4)
    batched, stream = stream_images(prepared, settings, inputs)
    one_by_one, _ = stream_images(prepared, settings.with_(stream_batch=False), inputs)
    assert stream.kind == "turbo" and sorted(batched) == list(range(4))
    for i in range(4):
        assert float((batched[i] - one_by_one[i]).abs().max()) < 2e-4
    assert float((batched[0] - batched[1]).abs().max()) > 1e-3


def test_txt2img_stream_batch_equals_frame_by_frame(turbo):
    _, prepared = turbo
    settings = StreamSettings(prompt="a fox", width=SIZE, height=SIZE, steps=2, strength=1.0, cfg_mode="none",
                              seed=1)
    batched, _ = stream_images(prepared, settings, [None] * 4)
    single, _ = stream_images(prepared, settings.with_(stream_batch=False), [None] * 4)
    for i in range(4):
        assert float((batched[i] - single[i]).abs().max()) < 2e-4
    assert float((batched[0] - batched[1]).abs().max()) > 1e-3  # each frame its own noise (seed + frame)


def test_residual_cfg_formula_and_the_passes_each_mode_runs(sd15):
    eps_c, eps_n = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(guided(eps_c, eps_n, 3.0, 1.0), eps_n + 3.0 * (eps_c - eps_n))
    assert torch.allclose(guided(eps_c, eps_n, 2.0, 0.5), 0.5 * eps_n + 2.0 * (eps_c - 0.5 * eps_n))
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(residual_noise(0.6 * x0 + 0.8 * noise, x0, 0.6, 0.8), noise, atol=1e-6)
    _, prepared = sd15
    base = StreamSettings(prompt="a lighthouse", negative_prompt="blurry", width=SIZE, height=SIZE, steps=2,
                          strength=0.6, scheduler="lcm", cfg=2.0, seed=2)
    rows = {}
    images = {}
    for mode in ("none", "self", "onetime", "full"):
        images[mode], stream = stream_images(prepared, base.with_(cfg_mode=mode), frames(3))
        rows[mode] = stream.stats.unet_rows / stream.stats.unet_calls
    assert rows == {"none": 2, "self": 2, "onetime": 3, "full": 4}  # onetime: one negative row per new frame
    for mode in ("self", "onetime", "full"):
        assert float((images[mode][0] - images["none"][0]).abs().max()) > 1e-3, mode
    # onetime's negative at a frame's first step is the real negative pass: with one step it equals full CFG
    one = base.with_(steps=1)
    full, _ = stream_images(prepared, one.with_(cfg_mode="full"), frames(2))
    onetime, _ = stream_images(prepared, one.with_(cfg_mode="onetime"), frames(2))
    assert all(float((full[i] - onetime[i]).abs().max()) < 2e-4 for i in range(2))


def test_similarity_filter_skip_chance_and_max_skip(sd15):
    assert skip_probability(0.97, 0.98) == 0.0 and skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    still = torch.ones(1, 3, 8, 8)
    always = SimilarityFilter(threshold=0.5, max_skip=3, seed=0)
    decisions = [always.should_skip(still) for _ in range(9)]
    assert decisions == [False, True, True, True, False, True, True, True, False]  # identical: skip up to 3
    gen = torch.Generator().manual_seed(0)
    noisy = SimilarityFilter(threshold=0.98, max_skip=10)
    assert not any(noisy.should_skip(torch.rand(1, 3, 8, 8, generator=gen) - 0.5) for _ in range(20))
    scaled = torch.ones(1, 3, 8, 8)
    scaled[..., 0, 0] = 3.0  # a frame at a known cosine similarity to the reference (about 0.972)
    similarity = float(torch.nn.functional.cosine_similarity(scaled.reshape(-1), still.reshape(-1), dim=0))
    skips = 0
    for seed in range(400):
        trial = SimilarityFilter(threshold=0.9, seed=seed)
        assert not trial.should_skip(still)  # the first frame is processed and becomes the reference ...
        skips += trial.should_skip(scaled)  # ... the changed frame is skipped by chance
    assert 0.5 < skip_probability(similarity, 0.9) < 0.9
    assert abs(skips / 400 - skip_probability(similarity, 0.9)) < 0.08
    _, prepared = sd15
    settings = StreamSettings(prompt="x", width=SIZE, height=SIZE, steps=2, strength=0.5, scheduler="lcm",
                              cfg_mode="none", similarity_filter=True, similarity_threshold=0.9, max_skip=4)
    static, stream = stream_images(prepared, settings, frames(12, moving=False))
    assert sorted(static) == list(range(12)) and stream.stats.skipped >= 6
    moving, stream = stream_images(prepared, settings.with_(similarity_threshold=0.999), frames(12))
    assert stream.stats.skipped == 0


def test_queue_back_pressure_drop_policy_and_close():
    blocking = FrameQueue(2, "block")
    assert blocking.put(1) and blocking.put(2)
    done = threading.Event()
    threading.Thread(target=lambda: (blocking.put(3), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # full: the reader waits ...
    assert blocking.get() == 1
    assert done.wait(2)  # ... until a frame is taken
    dropping = FrameQueue(2, "drop_oldest")
    for i in range(5):
        dropping.put(i)
    assert (dropping.dropped, dropping.get(), dropping.get()) == (3, 3, 4)
    dropping.close()
    assert dropping.get() is CLOSED and not dropping.put(9)
    waiting = FrameQueue(1)
    got = []
    reader = threading.Thread(target=lambda: got.append(waiting.get()), daemon=True)
    reader.start()
    waiting.close()
    reader.join(2)
    assert got == [CLOSED]


def test_bad_frames_are_named_and_the_stream_goes_on(sd15, tmp_path):
    from PIL import Image

    _, prepared = sd15
    settings = StreamSettings(prompt="x", width=SIZE, height=SIZE, steps=2, strength=0.5, scheduler="lcm",
                              cfg_mode="none", resize="strict")
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for path, frame in zip(good, frames(3)):
        Image.fromarray((frame[0].permute(1, 2, 0) * 255).byte().numpy()).save(path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    large = tmp_path / "large.png"
    Image.new("RGB", (SIZE * 2, SIZE)).save(large)
    items = [good[0], corrupt, torch.rand(SIZE, SIZE, 1), good[1], large, good[2]]
    received = []
    runner = StreamRunner(StreamPipeline(prepared, settings), enumerate(items),
                          lambda item: load_frame(item, SIZE, SIZE, settings.resize), received.append)
    summary = runner.run()
    errors = [r for r in received if isinstance(r, FrameError)]
    images = [r for r in received if not isinstance(r, FrameError)]
    assert [e.frame for e in errors] == [1, 2, 4] and summary["errors"] == 3
    assert "corrupt.png" in errors[0].message and "not an image" in errors[1].message
    assert "is 128x64, the stream is 64x64" in errors[2].message and "resize fit" in errors[2].message
    assert sorted(i.frame for i in images) == [0, 3, 5]
    fitted = load_frame(large, SIZE, SIZE, "fit")
    assert fitted.shape == (1, 3, SIZE, SIZE)


def test_stop_ends_every_thread_cleanly(sd15):
    _, prepared = sd15
    settings = StreamSettings(prompt="x", width=SIZE, height=SIZE, steps=2, strength=0.5, scheduler="lcm",
                              cfg_mode="none")
    received = []

    def endless():
        i = 0
        while True:
            yield i, frames(1, seed=i)[0]
            i += 1

    runner = StreamRunner(StreamPipeline(prepared, settings), endless(), lambda f: f, received.append,
                          queue_size=2, policy="drop_oldest")
    threading.Timer(1.5, runner.stop).start()
    before = threading.active_count()
    summary = runner.run()
    time.sleep(0.1)
    assert received and summary["frames_out"] == len(received)
    assert not any(t.name.startswith("sdaccel-stream") for t in threading.enumerate())
    assert threading.active_count() <= before


def test_a_stream_leaves_the_pipeline_as_it_found_it(sd15):
    cache, prepared = sd15
    request = GenerationRequest(prompt="a lighthouse", width=SIZE, height=SIZE, steps=2, seed=3)
    spec = prepared.spec
    before = run(spec, request, cache=cache).images_tensor
    settings = StreamSettings(prompt="x", width=SIZE, height=SIZE, steps=2, strength=0.5, scheduler="lcm",
                              cfg_mode="self", cfg=1.5, similarity_filter=True)
    first, _ = stream_images(prepared, settings, frames(3))
    assert torch.equal(run(spec, request, cache=cache).images_tensor, before)
    stream_images(prepared, settings.with_(stream_batch=False, cfg_mode="full", similarity_filter=False), frames(3))
    again, _ = stream_images(prepared, settings, frames(3))  # toggles off and on again: the same images
    assert all(torch.equal(first[i], again[i]) for i in first)


def test_units_a_stream_cannot_run_and_bad_settings_are_refused(checkpoints, cache):
    deep = PipelineSpec(model=checkpoints.get("sd15")).with_optimization(config_class("deepcache")())
    prepared = cache.prepare(deep)
    with pytest.raises(ConfigError, match="optimizations.deepcache.*cannot run in a stream"):
        StreamPipeline(prepared, StreamSettings(width=SIZE, height=SIZE))
    plain = cache.prepare(PipelineSpec(model=checkpoints.get("sd15")))
    with pytest.raises(ConfigError, match="self guidance needs an input frame"):
        StreamPipeline(plain, StreamSettings(width=SIZE, height=SIZE, strength=1.0, cfg_mode="self"))
    with pytest.raises(ConfigError, match="StreamSettings.width"):
        StreamSettings(width=100)
    with pytest.raises(ConfigError, match="StreamSettings.steps.*LCM"):
        StreamPipeline(plain, StreamSettings(width=SIZE, height=SIZE, steps=40, strength=0.3, scheduler="lcm"))


def test_cli_streams_a_folder_a_video_and_txt2img(checkpoints, tmp_path, capsys):
    from PIL import Image
    from sdaccel.optim.cli import main

    av = pytest.importorskip("av")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, frame in enumerate(frames(4)):
        Image.fromarray((frame[0].permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"f{i:02d}.png")
    ref = checkpoints.get("sd15")
    model = ["--checkpoint", ref.path, "--config-dir", ref.config_dir]
    common = ["stream", *model, "--width", "64", "--height", "64", "--steps", "2",
              "--scheduler", "lcm", "--cfg-mode", "self", "--prompt", "ink"]
    assert main(common + ["--input", str(folder), "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"frame_{i:06d}.png" for i in range(4)]
    assert "4 frames out of 4" in capsys.readouterr().out
    video = tmp_path / "clip.mp4"
    assert main(common + ["--input", str(folder), "--output", str(video)]) == 0
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    assert not list(tmp_path.glob("*.partial*"))
    assert main(common + ["--input", str(video), "--output", str(tmp_path / "again")]) == 0
    assert len(list((tmp_path / "again").glob("*.png"))) == 4
    txt = ["stream", *model, "--width", "64", "--height", "64", "--steps", "2", "--strength", "1",
           "--cfg-mode", "none", "--frames", "3", "--output", str(tmp_path / "t2i")]
    assert main(txt) == 0 and len(list((tmp_path / "t2i").glob("*.png"))) == 3
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "x")]) == 2  # img2img without --input
    assert "--input" in capsys.readouterr().err
    assert main(common + ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_bench_stream_rows_their_references_and_the_peer_row(tmp_path, capsys):
    import json

    from sdaccel.optim.bench.stream import StreamBenchSettings, format_stream_table, run_stream_bench
    from sdaccel.optim.cli import main

    settings = StreamBenchSettings(family="sd-turbo", size=64, steps=2, strength=0.5, frames=4, warmup=3,
                                   checkpoint="synthetic-tiny:sd-turbo",
                                   variants=["diffusers-img2img", "stream", "stream-batch", "tiny-vae", "ssf-static",
                                             "ssf-moving", "streamdiffusion"])
    report = run_stream_bench(settings, say=lambda _: None)
    rows = {row["variant"]: row for row in report["rows"]}
    for name in ("diffusers-img2img", "stream", "stream-batch", "tiny-vae", "ssf-static", "ssf-moving"):
        assert rows[name]["fps"] > 0 and rows[name]["frames"] == 4, name
    assert rows["stream"]["against"] == "diffusers-img2img" and rows["tiny-vae"]["against"] == "stream-batch"
    assert rows["stream"]["vs_reference"] == pytest.approx(rows["stream"]["fps"] / rows["diffusers-img2img"]["fps"],
                                                           rel=1e-3)
    assert rows["ssf-static"]["skip_rate"] > 0.5 and rows["ssf-moving"]["skip_rate"] == 0.0
    assert rows["stream-batch"]["unet_calls"] == 4 and rows["stream"]["unet_calls"] == 8  # 2 steps a frame
    assert "--streamdiffusion-python" in rows["streamdiffusion"]["skipped_reason"]
    table = format_stream_table(report)
    assert "stream-batch" in table and "skipped:" in table
    out = tmp_path / "stream.json"
    assert main(["bench", "stream", "--family", "sd-turbo", "--checkpoint", "synthetic-tiny:sd-turbo", "--size", "64",
                 "--frames", "2", "--variants", "stream,stream-batch", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved["rows"]] == ["stream", "stream-batch"]
    assert out.with_suffix(".md").is_file() and "bench stream" in capsys.readouterr().out
    assert main(["bench", "stream", "--variants", "warp"]) == 2
