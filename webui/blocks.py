"""The SDAccel gradio Blocks: Generate (txt2img/img2img, every toggle, the refiner ensemble) and Bench.

One builder serves the standalone `python -m sdaccel webui` and the A1111/Forge tab (scripts/), so both show
the same knobs as the ComfyUI nodes and the CLI: the controls come from the engine's field descriptions.
Generations and benchmarks go through the session's one queue, so they never run at once.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..optim.spec.errors import GenerationInterrupted, SDAccelError
from .controls import control, ui_fields
from .form import NO_REFINER, build_job, fit_settings, optimization_classes, request_fields, stats_text
from .service import BatchesInterrupted, QueueFull, engine_job

POLL_S = 0.25


def _titles(session) -> list[str]:
    return [entry.title for entry in session.catalog.entries()]


def _selected(session):
    try:
        return session.selected.title
    except SDAccelError:
        return None


def _wait(gr, job, outputs: int, say):
    """Yield progress updates until `job` is done (the other outputs untouched)."""
    while not job.future.done():
        yield (gr.update(),) * (outputs - 1) + (say(job),)
        time.sleep(POLL_S)


def generation_status(job, waiting: int) -> str:
    """The Generate status while `job` runs: a progress bar and "step i/n" once steps are known.

    A plain HTML `<progress>` in the status Markdown, which gradio 3.41 (A1111), 4.40 (Forge) and the current
    gradio all render; `gr.Progress` is not used: gradio injects it by the handler's signature, and this
    handler takes the whole form as `*values`."""
    if job.total:
        return (f'<progress value="{job.step}" max="{job.total}" style="width: 100%"></progress>\n\n'
                f"step {job.step}/{job.total} ({100 * job.step // job.total}%)")
    return f"waiting ({waiting} queued)" if job.started is None else "loading"


def chart_file(report) -> tuple[str | None, str]:
    """(a PNG chart of `report`, or None; a note for the status line when there is no chart)."""
    from ..optim.bench.runner import write_chart

    chart = tempfile.NamedTemporaryFile(prefix="sdaccel-bench-", suffix=".png", delete=False).name
    try:
        write_chart(report, chart)
    except SDAccelError as exc:
        Path(chart).unlink(missing_ok=True)
        if isinstance(exc.__cause__, ImportError):
            return None, "no chart: it needs matplotlib (`pip install matplotlib`)"
        return None, f"no chart: {exc}"
    return chart, ""


def build_blocks(session, *, title: str = "SDAccel", live: bool = False):
    """The Blocks for `session` (a WebSession); gradio is imported here, never at module import. `live` adds the
    Live tab (webcam streaming: the standalone server only, not the A1111/Forge tab)."""
    import gradio as gr

    from ..optim.bench.presets import preset_names
    from ..optim.lora.prompt import list_loras, with_lora_tag
    from ..optim.plan.planner import QUALITY
    from ..optim.spec.ensemble import EnsembleSpec
    from ..optim.spec.model_ref import ModelRef

    keys: list[tuple] = []
    inputs: list = []

    def add(key: tuple, component):
        keys.append(key)
        inputs.append(component)
        return component

    family_info = next(info for info in ui_fields(ModelRef) if info.name == "family")
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        with gr.Row():
            checkpoint = add(("model", "checkpoint"), gr.Dropdown(
                choices=_titles(session), value=_selected(session), label="Checkpoint", allow_custom_value=True,
                info="Checkpoints in the models folder (.safetensors/.ckpt files, diffusers folders), or type the "
                     "full path of one elsewhere", elem_id="sdaccel_checkpoint"))
            refresh = gr.Button("Refresh list", elem_id="sdaccel_refresh")
            add(("model", "family"), control(gr, family_info, value=session.family, elem_id="sdaccel_family"))
        with gr.Tabs():
            with gr.Tab("Generate", elem_id="sdaccel_generate_tab"):
                with gr.Row():
                    with gr.Column():
                        controls = {}
                        for info in request_fields():
                            controls[info.name] = add(("request", info.name),
                                                      control(gr, info, elem_id=f"sdaccel_{info.name}"))
                        with gr.Accordion("LoRAs", open=False, elem_id="sdaccel_loras"):
                            with gr.Row():
                                lora_name = gr.Dropdown(choices=list_loras(session.lora_folders), value=None,
                                                        label="LoRA", elem_id="sdaccel_lora_name",
                                                        info="Files in the LoRA folder (--loras); Refresh list "
                                                             "re-reads it")
                                lora_strength = gr.Slider(minimum=-2.0, maximum=2.0, step=0.05, value=1.0,
                                                          label="LoRA strength", elem_id="sdaccel_lora_strength")
                            add_lora = gr.Button("Add to prompt", elem_id="sdaccel_add_lora")
                        add(("init", "image"), gr.Image(type="pil", label="img2img source (empty: txt2img)",
                                                        elem_id="sdaccel_init_image"))
                        with gr.Accordion("Optimizations", open=True):
                            for kind, cls in optimization_classes().items():
                                with gr.Accordion(cls.title, open=False, elem_id=f"sdaccel_opt_{kind}"):
                                    add(("opt", kind, "enabled"), gr.Checkbox(
                                        value=False, label=f"Use {cls.title}", elem_id=f"sdaccel_use_{kind}",
                                        info="lossless: the same image" if cls.lossless else
                                        "changes the image: see the measured fidelity in the README"))
                                    for info in ui_fields(cls):
                                        add(("opt", kind, info.name),
                                            control(gr, info, elem_id=f"sdaccel_{kind}_{info.name}", group=cls.title))
                        with gr.Accordion("Fit to memory", open=False, elem_id="sdaccel_fit_memory"):
                            add(("plan", "enabled"), gr.Checkbox(
                                value=False, label="Fit to memory: choose the optimizations", elem_id="sdaccel_fit_on",
                                info="The fastest combination measured on this machine that fits the budget (the "
                                     "first use of a family and size measures it: minutes, in the queue)"))
                            add(("plan", "budget_gb"), gr.Number(value=6.0, minimum=0.5, label="Fit to memory: "
                                                                 "budget (GB)", elem_id="sdaccel_fit_budget"))
                            add(("plan", "quality"), gr.Dropdown(choices=list(QUALITY), value="any",
                                                                 label="Fit to memory: quality",
                                                                 elem_id="sdaccel_fit_quality"))
                            add(("plan", "tiny_vae"), gr.Textbox(value="", label="Fit to memory: Tiny VAE file",
                                                                 info="A TAESD decoder: lets the plan use the Tiny "
                                                                      "VAE (empty: plans without it)",
                                                                 elem_id="sdaccel_fit_tiny_vae"))
                        with gr.Accordion("SDXL refiner ensemble", open=False):
                            refiner = add(("refiner", "checkpoint"), gr.Dropdown(
                                choices=[NO_REFINER] + _titles(session), value=NO_REFINER, label="Refiner",
                                info="An SDXL refiner: base and refiner run as one schedule"))
                            for info in ui_fields(EnsembleSpec, skip=("base", "refiner")):
                                add(("ensemble", info.name), control(gr, info, group="Refiner"))
                    with gr.Column():
                        with gr.Row():
                            generate = gr.Button("Generate", variant="primary", elem_id="sdaccel_generate")
                            interrupt = gr.Button("Interrupt", elem_id="sdaccel_interrupt")
                        status = gr.Markdown("", elem_id="sdaccel_status")
                        gallery = gr.Gallery(label="Images", elem_id="sdaccel_gallery")
                        stats = gr.Textbox(label="Run statistics", lines=6, elem_id="sdaccel_stats")
            with gr.Tab("Bench", elem_id="sdaccel_bench_tab"):
                presets = gr.CheckboxGroup(choices=preset_names(), value=["baseline", "channels-last"],
                                           label="Presets", elem_id="sdaccel_bench_presets")
                with gr.Row():
                    bench_size = gr.Slider(minimum=64, maximum=1024, step=64, value=256, label="Bench: size",
                                           elem_id="sdaccel_bench_size")
                    bench_steps = gr.Slider(minimum=1, maximum=50, step=1, value=4, label="Bench: steps",
                                            elem_id="sdaccel_bench_steps")
                    bench_repeats = gr.Slider(minimum=1, maximum=10, step=1, value=2, label="Bench: repeats",
                                              elem_id="sdaccel_bench_repeats")
                    bench_warmup = gr.Slider(minimum=0, maximum=3, step=1, value=1, label="Bench: warm-up runs",
                                             elem_id="sdaccel_bench_warmup")
                bench_checkpoint = gr.Checkbox(value=False, label="Use the selected checkpoint (else random "
                                               "weights of the real SD 1.5 architecture)",
                                               elem_id="sdaccel_bench_checkpoint")
                run_bench = gr.Button("Run bench", variant="primary", elem_id="sdaccel_run_bench")
                bench_status = gr.Markdown("", elem_id="sdaccel_bench_status")
                bench_table = gr.Markdown("", elem_id="sdaccel_bench_table")
                bench_chart = gr.Image(type="filepath", label="Chart", elem_id="sdaccel_bench_chart")
            if live:
                from .live import build_live

                with gr.Tab("Live", elem_id="sdaccel_live_tab"):
                    build_live(gr, session, checkpoint=checkpoint, family=inputs[keys.index(("model", "family"))])

        def on_refresh():
            titles = _titles(session)
            return (gr.update(choices=titles), gr.update(choices=[NO_REFINER] + titles),
                    gr.update(choices=list_loras(session.lora_folders)))

        def on_add_lora(prompt, name, strength):
            try:
                return with_lora_tag(prompt, name, strength), ""
            except SDAccelError as exc:
                return gr.update(), f"**Error:** {exc}"

        def on_generate(*values):
            form = dict(zip(keys, values))
            try:
                spec, requests, _ = build_job(session, form)
                job = session.service.submit(engine_job(spec, requests, fit=fit_settings(form)),
                                             label="img2img" if requests[0].is_img2img else "txt2img")
            except (SDAccelError, QueueFull) as exc:
                yield gr.update(), gr.update(), f"**Error:** {exc}"
                return
            yield from _wait(gr, job, 3, lambda j: generation_status(j, session.service.waiting))
            try:
                results = job.future.result()
            except GenerationInterrupted as exc:  # the batches finished before it are kept, as in A1111
                done = exc.results if isinstance(exc, BatchesInterrupted) else []
                yield ([image for result in done for image in result.images], stats_text(done),
                       f"**Interrupted:** {exc}")
                return
            except SDAccelError as exc:
                yield gr.update(), gr.update(), f"**Error:** {exc}"
                return
            images = [image for result in results for image in result.images]
            yield images, stats_text(results), f"done in {sum(r.stats.total_s for r in results):.2f} s"

        def on_interrupt():
            return "interrupting at the next step" if session.service.interrupt() else "nothing is running"

        def on_bench(names, size, steps, repeats, warmup, use_checkpoint, checkpoint_title):
            from ..optim.bench.runner import BenchSettings, format_table, run_bench

            if not names:
                yield gr.update(), gr.update(), "**Error:** pick at least one preset"
                return
            lines: list[str] = []
            path = session.catalog.find(checkpoint_title, field="Checkpoint").path \
                if use_checkpoint and checkpoint_title else None
            settings = BenchSettings(presets=list(names), size=int(size), steps=int(steps), repeats=int(repeats),
                                     warmup=int(warmup), checkpoint=path, device=session.device)

            def work(progress, should_interrupt):
                report = run_bench(settings, say=lines.append)
                return (report, *chart_file(report))

            try:
                job = session.service.submit(work, label="bench")
            except QueueFull as exc:
                yield gr.update(), gr.update(), f"**Error:** {exc}"
                return
            yield from _wait(gr, job, 3, lambda j: (lines[-1] if lines else "waiting for the queue"))
            try:
                report, chart, note = job.future.result()
            except SDAccelError as exc:
                yield gr.update(), gr.update(), f"**Error:** {exc}"
                return
            yield (f"```\n{format_table(report)}\n```", chart,
                   f"done: {len(report['rows'])} rows" + (f"; {note}" if note else ""))

        refresh.click(fn=on_refresh, inputs=None, outputs=[checkpoint, refiner, lora_name])
        add_lora.click(fn=on_add_lora, inputs=[controls["prompt"], lora_name, lora_strength],
                       outputs=[controls["prompt"], status])
        generate.click(fn=on_generate, inputs=inputs, outputs=[gallery, stats, status])
        interrupt.click(fn=on_interrupt, inputs=None, outputs=[status])
        run_bench.click(fn=on_bench, inputs=[presets, bench_size, bench_steps, bench_repeats, bench_warmup,
                                             bench_checkpoint, checkpoint],
                        outputs=[bench_table, bench_chart, bench_status])
    return blocks
