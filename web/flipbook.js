// Flipbook: shows what a node could not do as asked, above the node: a save that cannot carry the
// workflow ("GIF ... drop the .png sidecar"), settings the 'fill' policy replaced, CFG warnings.
// The notes arrive in the node's UI output as `flipbook_notes`.
import { app } from "../../scripts/app.js";

const NOTE_COLOR = "#f5c542";
const LINE_HEIGHT = 15;

function wrap(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of text.split(" ")) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width > width && line) {
      lines.push(line);
      line = word;
    } else {
      line = next;
    }
  }
  if (line) lines.push(line);
  return lines;
}

app.registerExtension({
  name: "flipbook.saveNotes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("Flipbook")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.flipbookNotes = Array.isArray(message?.flipbook_notes) ? message.flipbook_notes : [];
      this.setDirtyCanvas?.(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.flipbookNotes?.length || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = NOTE_COLOR;
      const lines = this.flipbookNotes.flatMap((note) => wrap(ctx, `⚠ ${note}`, this.size[0]));
      const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      lines.forEach((line, i) => {
        ctx.fillText(line, 0, -titleHeight - 6 - (lines.length - 1 - i) * LINE_HEIGHT);
      });
      ctx.restore();
    };
  },
});
