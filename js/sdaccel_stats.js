// SDAccel run-stats badge: draws, under an SDAccel node, the lines its last run reported. Presentation only: the
// text is composed in Python, this file keeps it and draws it.
// - The SDAccel Sampler returns them as its UI output `sdaccel_stats` (nodes/generation.py, badge_lines).
// - The MODEL patches (category sdaccel/model_patches) are no output nodes: after each KSampler run they send the
//   websocket event "sdaccel.model_patch" {node, prompt_id, title, lines, counters} (nodes/model_patches.py, RunReport).
// Both are kept here per workflow tab (the one the prompt was queued from: the page's queue calls are watched for
// the prompt ids they get; the events carry it) and node id (the prompt's id: "6", or "5:3" inside a subgraph). A sampler this page has no stats for shows the outputs ComfyUI keeps for the tab
// (app.nodeOutputs: a workflow loaded from the queue history).
// - A re-queue ComfyUI serves from its cache ("execution_cached", no new stats) keeps the last stats, marked.
// - Lines wrap to the node's width; the badge is never wider than its node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "SDAccel.RunStats";
const UI_KEY = "sdaccel_stats";
const PATCH_EVENT = "sdaccel.model_patch";
const CACHED_LINE = "(cached: the last run's stats)";
const FONT = "11px monospace";
const LINE_HEIGHT = 15;
const PADDING = 6;
const NO_WORKFLOW = {}; // the key when the page has no workflow store

const runs = new WeakMap(); // workflow -> { stats: Map(execution id -> {lines}), cached: Set(execution id) }
let runWorkflow = null; // the workflow tab the running prompt was queued from
const queuedFrom = new Map(); // prompt id -> the workflow tab active when this page queued it
const QUEUED_KEPT = 256; // ids remembered (oldest forgotten first)

function activeWorkflow() {
  return app.extensionManager?.workflow?.activeWorkflow ?? NO_WORKFLOW;
}

function runsOf(workflow) {
  let state = runs.get(workflow);
  if (!state) runs.set(workflow, (state = { stats: new Map(), cached: new Set() }));
  return state;
}

// The tab a prompt came from: where this page queued it, else (queued elsewhere: another page, the API) the tab
// active now.
function workflowOf(promptId) {
  return (promptId != null && queuedFrom.get(String(promptId))) || activeWorkflow();
}

// Record which tab each prompt is queued from: a prompt waits in ComfyUI's queue while the user moves on to
// another tab, so the tab active when it starts (or ends) is not its own.
function watchQueueCalls() {
  const queuePrompt = api.queuePrompt;
  if (typeof queuePrompt !== "function") return;
  api.queuePrompt = async function (...args) {
    const workflow = activeWorkflow();
    const answer = await queuePrompt.apply(this, args);
    if (answer?.prompt_id != null) {
      queuedFrom.set(String(answer.prompt_id), workflow);
      while (queuedFrom.size > QUEUED_KEPT) queuedFrom.delete(queuedFrom.keys().next().value);
    }
    return answer;
  };
}

function redraw() {
  app.graph?.setDirtyCanvas?.(true, true);
}

// The prompt's id of `node`: its graph id at the top level, "<subgraph node>:<id>" inside a subgraph.
function executionId(node) {
  const root = app.graph;
  if (!node.graph || node.graph === root) return String(node.id);
  const path = (graph, prefix) => {
    for (const outer of graph?.nodes ?? []) {
      if (!outer.subgraph) continue;
      const id = prefix ? `${prefix}:${outer.id}` : String(outer.id);
      if (outer.subgraph === node.graph) return `${id}:${node.id}`;
      const inner = path(outer.subgraph, id);
      if (inner) return inner;
    }
    return null;
  };
  return path(root, "") ?? String(node.id);
}

// The sampler's stats as ComfyUI keeps its outputs per workflow tab (the key is the node's locator id:
// "<subgraph uuid>:<id>" inside a subgraph): what a workflow loaded from the queue history shows, too.
function outputStats(node) {
  const outputs = app.nodeOutputs ?? {};
  const key = !node.graph || node.graph === app.graph ? String(node.id) : `${node.graph.id}:${node.id}`;
  return outputs[key]?.[UI_KEY]?.[0];
}

function statsOf(node) {
  const id = executionId(node);
  const state = runsOf(activeWorkflow());
  const stats = state.stats.get(id) ?? outputStats(node);
  if (!stats?.lines?.length) return null;
  return { lines: stats.lines, cached: state.cached.has(id) };
}

// `text` in lines no wider than `width`, broken at spaces (kept as they are within a line); a word too long for a
// line is cut, with an ellipsis.
function wrap(ctx, text, width) {
  const lines = [];
  let line = "";
  let space = "";
  for (const token of String(text).split(/(\s+)/)) {
    if (!token) continue;
    if (/^\s+$/.test(token)) {
      space = token;
      continue;
    }
    const candidate = line ? line + space + token : token;
    space = "";
    if (ctx.measureText(candidate).width <= width) {
      line = candidate;
      continue;
    }
    if (line) lines.push(line);
    let cut = token;
    while (cut.length > 1 && ctx.measureText(cut).width > width) cut = cut.slice(0, -2) + "…";
    line = cut;
  }
  if (line) lines.push(line);
  return lines;
}

function drawBadge(node, ctx) {
  const stats = statsOf(node);
  node.sdaccelBadge = null;
  if (!stats || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = FONT;
  const width = Math.max(node.size[0], 2 * PADDING + 8);
  const source = stats.cached ? [...stats.lines, CACHED_LINE] : stats.lines;
  const lines = source.flatMap((line) => wrap(ctx, line, width - 2 * PADDING));
  const top = node.size[1] + 6;
  const height = lines.length * LINE_HEIGHT + 8;
  ctx.fillStyle = "rgba(20, 24, 32, 0.85)";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(0, top, width, height, 6);
  else ctx.rect(0, top, width, height);
  ctx.fill();
  lines.forEach((line, i) => {
    ctx.fillStyle = stats.cached && i >= lines.length - wrap(ctx, CACHED_LINE, width - 2 * PADDING).length
      ? "#a0a8b8" : "#9fe0a8";
    ctx.fillText(line, PADDING, top + 4 + (i + 1) * LINE_HEIGHT - 3);
  });
  ctx.restore();
  // what was drawn, for tests and other extensions: the reported lines, the wrapped ones, the box in node space
  node.sdaccelBadge = { lines: stats.lines, drawn: lines, cached: stats.cached, x: 0, y: top, width, height };
}

// Loaded once even if ComfyUI serves this folder under two names (the pack folder and pyproject's `web`).
if (!globalThis.__sdaccelRunStats) {
  globalThis.__sdaccelRunStats = true;
  watchQueueCalls();
  api.addEventListener("execution_start", ({ detail }) => {
    runWorkflow = workflowOf(detail?.prompt_id);
    runsOf(runWorkflow).cached.clear();
  });
  api.addEventListener("execution_cached", ({ detail }) => {
    const state = runsOf(detail?.prompt_id != null ? workflowOf(detail.prompt_id) : runWorkflow ?? activeWorkflow());
    for (const id of detail?.nodes ?? []) state.cached.add(String(id));
    redraw();
  });
  api.addEventListener(PATCH_EVENT, ({ detail }) => {
    if (detail?.node == null || !Array.isArray(detail.lines)) return;
    const state = runsOf(detail.prompt_id != null ? workflowOf(detail.prompt_id) : runWorkflow ?? activeWorkflow());
    state.stats.set(String(detail.node), { lines: detail.lines });
    state.cached.delete(String(detail.node));
    redraw();
  });
  app.registerExtension({
    name: EXTENSION,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!nodeData?.category?.startsWith("sdaccel")) return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const stats = message?.[UI_KEY]?.[0];
        if (!stats?.lines) return;
        const state = runsOf(runWorkflow ?? activeWorkflow());
        state.stats.set(executionId(this), { lines: stats.lines });
        state.cached.delete(executionId(this));
        this.setDirtyCanvas?.(true, true);
      };
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        onDrawForeground?.apply(this, arguments);
        drawBadge(this, ctx);
      };
    },
  });
}
