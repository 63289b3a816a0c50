"""The pack's page extension (js/) in ComfyUI's own frontend: run-stats badges and the template browser.

A real ComfyUI 0.3.64 (see comfy_host.py) serves its frontend (1.27.10) to headless Chromium. Workflows are opened
in tabs and queued from the page (`app.queuePrompt`, so the page's websocket gets the run's messages). A badge is
checked twice: what the extension keeps on the node (`node.sdaccelBadge`, set while drawing) and what the canvas
was asked to draw (`fillText` recorded during a redraw). The template checks read the template dialog's cards and
the thumbnails the page fetched for them.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import comfy_examples as examples
import comfy_host
import pytest
from comfy_host import load_workflow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "example_workflows"
INDEX = ROOT / "js" / "sdaccel_templates.json"
CHECKPOINT, LORA = examples.SD15.ckpt_name, examples.LORA_NAME  # what the KSampler workflows load
TINY = "sdaccel-tiny-sd15.safetensors"  # what the SDAccel loader loads in its place
PATCH_WORKFLOW, PATCH_NODE, PATCH_TITLE = "ksampler-cfg-cutoff", "SDAccelCFGCutoffModel", "SDAccel CFG Cutoff (model)"
SHRINK = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 3},
          "SDAccelLoader": {"ckpt_name": TINY}, "SDAccelSampler": {"width": 64, "height": 64, "steps": 2}}
THUMBNAIL_COMMENT = "SDAccel template: "  # tools/make_template_thumbnails.py stores each title there

pytestmark = pytest.mark.skipif(not comfy_host.COMFYUI_PATH, reason=comfy_host.SKIP_REASON)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    yield from comfy_host.start_server(tmp_path_factory.mktemp("comfy-frontend"), {TINY: "sd15"},
                                       lambda models: comfy_host.write_host_models(models, CHECKPOINT, LORA))


@pytest.fixture(scope="module")
def frontend(comfy):
    yield from comfy_host.open_frontend(comfy)


# Page-side helpers (window.app is ComfyUI's app; its api is window.comfyAPI.api.api)
SET_WIDGETS = """(set) => {
  for (const node of app.graph.nodes) for (const w of node.widgets ?? [])
    if (set[node.type]?.[w.name] !== undefined) w.value = set[node.type][w.name];
}"""
QUEUE = """async (timeoutMs) => {
  const api = window.comfyAPI.api.api;
  const done = new Promise((resolve) => {
    for (const ev of ["execution_success", "execution_error"])
      api.addEventListener(ev, (e) => resolve({ event: ev, detail: e.detail }), { once: true });
    setTimeout(() => resolve({ event: "timeout" }), timeoutMs);
  });
  await app.queuePrompt(0, 1);
  return await done;
}"""
# Redraw the canvas with the node in view, recording every fillText; return the node's badge and the texts drawn
DRAWN = """async (type) => {
  const node = app.graph.nodes.find((n) => n.type === type);
  if (!node) return null;
  app.canvas.ds.offset = [-node.pos[0] + 80, -node.pos[1] + 80];
  app.canvas.ds.scale = 1;
  const proto = CanvasRenderingContext2D.prototype, fillText = proto.fillText, texts = [];
  proto.fillText = function (text) { texts.push(String(text)); return fillText.apply(this, arguments); };
  try { app.canvas.draw(true, true); } finally { proto.fillText = fillText; }
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = "11px monospace";
  const badge = node.sdaccelBadge;
  return { badge, texts, width: node.size[0],
           widest: badge ? Math.max(...badge.drawn.map((line) => ctx.measureText(line).width)) : null };
}"""


class Page:
    def __init__(self, frontend: comfy_host.Frontend):
        self.frontend, self.page = frontend, frontend.page

    def open_tab(self, name: str, workflow: dict, widgets: dict = SHRINK) -> None:
        """`workflow` in a new workflow tab named `name`, with its size and steps shrunk."""
        self.page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }",
                           [workflow, name])
        self.page.evaluate(SET_WIDGETS, widgets)

    def queue(self) -> dict:
        result = self.page.evaluate(QUEUE, comfy_host.RUN_TIMEOUT_S * 1000)
        assert result["event"] == "execution_success", result
        return result

    def drawn(self, node_type: str) -> dict:
        return self.page.evaluate(DRAWN, node_type)

    def switch_tab(self, command: str = "Workspace.PreviousOpenedWorkflow") -> str:
        self.page.evaluate("async (c) => { await app.extensionManager.command.execute(c); }", command)
        self.page.wait_for_timeout(300)
        return self.page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")


def assert_drawn(drawn: dict, lines: list[str], cached: bool = False) -> None:
    """The node's badge holds `lines`, fits the node, and every line of it went to the canvas."""
    assert drawn and drawn["badge"], drawn
    badge = drawn["badge"]
    assert badge["lines"] == lines and badge["cached"] is cached, badge
    words = " ".join(badge["drawn"]).split()
    assert words[:len(" ".join(lines).split())] == " ".join(lines).split(), badge  # wrapped, nothing lost
    assert badge["width"] <= drawn["width"] and drawn["widest"] <= badge["width"], drawn
    missing = [line for line in badge["drawn"] if line not in drawn["texts"]]
    assert not missing, f"badge lines not drawn: {missing}; drawn: {drawn['texts'][-30:]}"
    assert any("cached" in line for line in badge["drawn"]) is cached, badge


def patch_lines(comfy, since: int) -> list[str]:
    """The lines the patch logged for its last run (the page gets the same lines in its websocket event)."""
    lines = [line.split(f"{PATCH_TITLE}: ", 1)[1] for line in comfy.log.read_text(errors="replace").splitlines()
             if f"{PATCH_TITLE}: " in line]
    return lines[since:]


@pytest.fixture(scope="module")
def runs(comfy, frontend):
    """Both badges after one run each, in two tabs: the KSampler + patch workflow, then the SDAccel Sampler one."""
    page = Page(frontend)
    before = len(patch_lines(comfy, 0))
    page.open_tab("sdaccel-patch", load_workflow(EXAMPLES / f"{PATCH_WORKFLOW}.json"))
    page.queue()
    patch = patch_lines(comfy, before)
    assert patch and patch[-1].endswith("s per step over 3 steps"), patch
    patch_drawn = page.drawn(PATCH_NODE)
    page.open_tab("sdaccel-sampler", load_workflow(EXAMPLES / "baseline.json"))
    page.queue()
    return page, patch, patch_drawn


def test_patch_node_and_sampler_draw_their_run_stats(runs):
    page, patch, patch_drawn = runs
    assert_drawn(patch_drawn, patch)
    sampler = page.drawn("SDAccelSampler")
    assert sampler["badge"] and "2/2 steps" in sampler["badge"]["lines"][0], sampler
    assert_drawn(sampler, sampler["badge"]["lines"])
    assert not page.frontend.our_errors(), page.frontend.our_errors()


def test_badges_survive_a_tab_switch_and_a_cached_requeue(comfy, runs):
    page, patch, _ = runs
    sampler_lines = page.drawn("SDAccelSampler")["badge"]["lines"]
    assert page.switch_tab() == "workflows/sdaccel-patch.json"
    assert_drawn(page.drawn(PATCH_NODE), patch)
    assert page.drawn("SDAccelSampler") is None  # that node is in the other tab
    assert page.switch_tab("Workspace.NextOpenedWorkflow") == "workflows/sdaccel-sampler.json"
    assert_drawn(page.drawn("SDAccelSampler"), sampler_lines)
    # the same prompt again: ComfyUI serves it from its cache (no sampler output, no patch event)
    page.queue()
    assert_drawn(page.drawn("SDAccelSampler"), sampler_lines, cached=True)
    assert page.switch_tab() == "workflows/sdaccel-patch.json"
    before = len(patch_lines(comfy, 0))
    page.queue()  # runs: ComfyUI's cache held the other tab's prompt
    rerun = patch_lines(comfy, before)
    assert_drawn(page.drawn(PATCH_NODE), rerun)
    page.queue()  # the same prompt again: cached
    assert len(patch_lines(comfy, 0)) == before + len(rerun)  # the patch did not run
    assert_drawn(page.drawn(PATCH_NODE), rerun, cached=True)
    assert not page.frontend.our_errors(), page.frontend.our_errors()


def test_long_lines_wrap_to_the_node_width(runs):
    page, _, _ = runs
    page.switch_tab("Workspace.NextOpenedWorkflow")
    page.page.evaluate("() => { app.graph.nodes.find((n) => n.type === 'SDAccelSampler').size[0] = 150; }")
    drawn = page.drawn("SDAccelSampler")
    badge = drawn["badge"]
    assert drawn["width"] == 150 and len(badge["drawn"]) > len(badge["lines"]), badge  # its lines are wider
    assert_drawn(drawn, badge["lines"], cached=badge["cached"])


# Queue the active tab's prompt (a long one that holds ComfyUI's queue), go to the other tab, queue its prompt and
# come straight back: that prompt starts and ends while the first tab is the active one. Wait for both to finish.
QUEUE_BEHIND = """async ([first, second, timeoutMs]) => {
  const api = window.comfyAPI.api.api;
  const store = app.extensionManager.workflow;
  const goTo = async (path) => {
    for (let i = 0; i < 6 && store.activeWorkflow.path !== path; i++)
      await app.extensionManager.command.execute("Workspace.NextOpenedWorkflow");
  };
  const set = (values) => { for (const node of app.graph.nodes) for (const w of node.widgets ?? [])
    if (values[node.type]?.[w.name] !== undefined) w.value = values[node.type][w.name]; };
  let finished = 0;
  const done = new Promise((resolve) => {
    const count = (e) => { if (e.type === "execution_error") resolve({ event: e.type, finished, error: e.detail?.exception_message });
      else if (++finished === 2) resolve({ event: e.type, finished }); };
    api.addEventListener("execution_success", count);
    api.addEventListener("execution_error", count);
    setTimeout(() => resolve({ event: "timeout", finished }), timeoutMs);
  });
  await goTo(first.path);
  set(first.widgets);
  await app.queuePrompt(0, 1);
  await goTo(second.path);
  set(second.widgets);
  await app.queuePrompt(0, 1);
  await goTo(first.path);
  return await done;
}"""


def test_stats_go_to_the_tab_the_prompt_was_queued_from(comfy, runs):
    """A prompt waiting in ComfyUI's queue while the user works in another tab: its patch's stats land on the tab
    it was queued from, not on the tab active when it ran."""
    page, _, _ = runs
    sampler, patch = "workflows/sdaccel-sampler.json", "workflows/sdaccel-patch.json"
    before = len(patch_lines(comfy, 0))
    result = page.page.evaluate(QUEUE_BEHIND, [{"path": sampler, "widgets": {"SDAccelSampler": {"steps": 200}}},
                                               {"path": patch, "widgets": {"KSampler": {"steps": 4}}},
                                               comfy_host.RUN_TIMEOUT_S * 1000])
    assert result == {"event": "execution_success", "finished": 2}, result
    queued = patch_lines(comfy, before)
    assert queued and queued[-1].endswith("s per step over 4 steps"), queued
    assert page.page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path") == sampler  # meanwhile
    for _ in range(6):
        if page.switch_tab("Workspace.NextOpenedWorkflow") == patch:
            break
    assert_drawn(page.drawn(PATCH_NODE), queued)
    assert not page.frontend.our_errors(), page.frontend.our_errors()


def _index() -> list[tuple[str, str, str]]:
    groups = json.loads(INDEX.read_text(encoding="utf-8"))["groups"]
    return [(name, title, group["group"]) for group in groups for name, title in group["templates"]]


def test_template_cards_have_thumbnails_in_the_intended_order(comfy, frontend):
    from PIL import Image

    index = _index()
    names = [name for name, _, _ in index]
    assert sorted(names) == sorted(p.stem for p in EXAMPLES.glob("*.json"))  # every workflow indexed once
    assert names[0] == "baseline"
    native = [i for i, name in enumerate(names) if name.startswith(examples.NATIVE_PREFIX)]
    assert names[native[0]] == "ksampler-baseline" and native == list(range(native[0], native[0] + len(native)))
    for name, title, _ in index:
        assert title != name and (title[0].isupper() or title[0].isdigit()), (name, title)

    page = frontend.page
    thumbnails = {}
    page.on("response", lambda r: thumbnails.setdefault(r.url.rsplit("/", 1)[-1], r)
            if "/api/workflow_templates/" in r.url and r.url.endswith(".jpg") else None)
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.wait_for_selector('[data-testid="template-workflows-content"]', timeout=60_000)
    module = next(m for m, listed in comfy.request("/workflow_templates").items() if "baseline" in listed)
    page.get_by_role("option", name=module, exact=True).click()
    page.wait_for_selector('[data-testid="template-workflow-baseline"]', timeout=60_000)
    cards = page.locator('[data-testid^="template-workflow-"]')
    deadline = time.monotonic() + 60
    while cards.count() < len(names) and time.monotonic() < deadline:  # the dialog adds 12 cards per scroll
        cards.nth(cards.count() - 1).scroll_into_view_if_needed()
        page.mouse.wheel(0, 3000)
        page.wait_for_timeout(300)
    while len(thumbnails) < len(names) and time.monotonic() < deadline:  # a card loads its image once seen
        for i in range(cards.count()):
            cards.nth(i).scroll_into_view_if_needed()
        page.wait_for_timeout(300)
    shown = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
                             .map((card) => card.dataset.testid.replace('template-workflow-', ''))""")
    assert shown == names, shown  # the index's order, whatever order the server listed them in
    for name, title, _ in index:
        response = thumbnails.get(f"{name}.jpg")  # what the page asked for: <name>.jpg beside <name>.json
        assert response is not None and response.status == 200, (name, response and response.status)
        assert response.headers["content-type"].startswith("image/jpeg"), response.headers
        image = Image.open(io.BytesIO(comfy.request(response.url.removeprefix(comfy.url))))
        assert image.size[0] >= 256 and image.info["comment"].decode() == THUMBNAIL_COMMENT + title, name
    # the dialog shows the cards near the view (it drops the others' images): ours are drawn there
    sizes = page.evaluate("""() => [...document.querySelectorAll('[data-testid^="template-workflow-"] img')]
                             .map((img) => img.naturalWidth).filter((width) => width > 0)""")
    assert sizes and set(sizes) == {Image.open(EXAMPLES / "baseline.jpg").size[0]}, sizes
    page.keyboard.press("Escape")
    assert not frontend.our_errors(), frontend.our_errors()
