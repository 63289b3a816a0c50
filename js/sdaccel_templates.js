// The order of SDAccel's cards in ComfyUI's template browser (Workflow > Browse Templates).
// ComfyUI 0.3.64 lists a pack's example_workflows/*.json in directory order (glob, unsorted) and its frontend 1.27
// shows a custom-node module's templates in the order GET /workflow_templates gives them, titled with the file name
// (it sets no title, index or order for them). This file puts the pack's names in the order of
// sdaccel_templates.json as the page reads that list (api.getWorkflowTemplates); the readable titles are drawn on
// the thumbnails (tools/make_template_thumbnails.py). Other packs' lists are left as they are.
import { api } from "../../scripts/api.js";

const INDEX_URL = new URL("./sdaccel_templates.json", import.meta.url);

async function templateOrder() {
  const response = await fetch(INDEX_URL);
  if (!response.ok) throw new Error(`${INDEX_URL} answered ${response.status}`);
  const index = await response.json();
  return index.groups.flatMap((group) => group.templates.map(([name]) => name));
}

// `names` in the index's order; names the index does not know follow, in their own order.
function ordered(names, order) {
  const rank = new Map(order.map((name, i) => [name, i]));
  const known = names.filter((name) => rank.has(name)).sort((a, b) => rank.get(a) - rank.get(b));
  return [...known, ...names.filter((name) => !rank.has(name))];
}

// Loaded once even if ComfyUI serves this folder under two names (the pack folder and pyproject's `web`).
if (!globalThis.__sdaccelTemplateOrder && typeof api.getWorkflowTemplates === "function") {
  globalThis.__sdaccelTemplateOrder = true;
  const orderPromise = templateOrder();
  const getWorkflowTemplates = api.getWorkflowTemplates;
  api.getWorkflowTemplates = async function () {
    const templates = await getWorkflowTemplates.apply(this, arguments);
    let order;
    try {
      order = await orderPromise;
    } catch (error) {
      console.warn("SDAccel: template order not applied:", error);
      return templates;
    }
    const ours = new Set(order);
    for (const [module, names] of Object.entries(templates ?? {})) {
      // the pack's module is named after its folder (custom_nodes/<name>): recognise it by its templates
      if (Array.isArray(names) && names.filter((name) => ours.has(name)).length * 2 > names.length) {
        templates[module] = ordered(names, order);
      }
    }
    return templates;
  };
}
