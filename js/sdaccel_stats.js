// SDAccel run-stats badge: draws the lines the sampler node sent after its last run (time, it/s, peak
// memory, active toggles) under the node. Presentation only: the text is composed in Python
// (nodes/generation.py, badge_lines), this file just draws it.
import { app } from "../../scripts/app.js";

const EXTENSION = "SDAccel.RunStats";
const UI_KEY = "sdaccel_stats";
const LINE_HEIGHT = 15;

function drawBadge(node, ctx) {
  const lines = node.sdaccelStatsLines;
  if (!lines?.length || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "11px monospace";
  const width = Math.max(node.size[0], ...lines.map((line) => ctx.measureText(line).width + 12));
  const top = node.size[1] + 6;
  ctx.fillStyle = "rgba(20, 24, 32, 0.85)";
  ctx.beginPath();
  const height = lines.length * LINE_HEIGHT + 8;
  if (ctx.roundRect) ctx.roundRect(0, top, width, height, 6);
  else ctx.rect(0, top, width, height);
  ctx.fill();
  ctx.fillStyle = "#9fe0a8";
  lines.forEach((line, i) => ctx.fillText(line, 6, top + 4 + (i + 1) * LINE_HEIGHT - 3));
  ctx.restore();
}

// Loaded once even if ComfyUI serves this folder under two names (the pack folder and pyproject's `web`).
if (!globalThis.__sdaccelRunStats) {
  globalThis.__sdaccelRunStats = true;
  app.registerExtension({
    name: EXTENSION,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!nodeData?.category?.startsWith("sdaccel")) return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const stats = message?.[UI_KEY]?.[0];
        if (!stats) return;
        this.sdaccelStatsLines = stats.lines;
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
