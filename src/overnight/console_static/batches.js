// The Batches section: a live list with a create form, and one batch's detail.
//
// Views are built once and then updated in place on every poll (an element the
// reader is on, a focused button, is never thrown away and rebuilt), and a status
// that changes between two polls is announced through the page's live region.

import {ApiError} from "./api.js";
import {bytes, h, humanize, kvList, replace, time, uid} from "./dom.js";

/** What POST /v1/batches accepts (overnight's SUPPORTED_ENDPOINTS). */
export const ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const CANCELLABLE = new Set(["validating", "in_progress"]);
const PAGE_SIZE = 20;
const WINDOW_PATTERN = /^\d+(\.\d+)?\s*[smhd]$/;

export function statusLabel(status) {
  return String(status).replace(/_/g, " ");
}

function counts(batch) {
  const rc = batch.request_counts || {};
  const total = rc.total || 0;
  const completed = rc.completed || 0;
  const failed = rc.failed || 0;
  return {total, completed, failed, done: Math.min(total, completed + failed)};
}

/** A <progress> with its numbers in words beside it (its accessible description). */
function progressMeter(name) {
  const textId = uid("progress-text");
  const bar = h("progress", {"aria-label": name, "aria-describedby": textId, max: 1});
  const text = h("p", {class: "progress-text", id: textId});
  return {
    el: h("div", {class: "progress"}, bar, text),
    update(batch) {
      const {total, completed, failed, done} = counts(batch);
      let words;
      if (total > 0) {
        const pct = Math.floor((done * 100) / total);
        bar.max = total;
        bar.value = done;
        words = `${done} of ${total} requests done (${pct}%)`;
        if (failed) words += `: ${completed} succeeded, ${failed} failed`;
      } else if (batch.status === "validating") {
        bar.removeAttribute("value"); // indeterminate until the input is counted
        words = "Counting the requests in the input file…";
      } else {
        bar.max = 1;
        bar.value = batch.status === "completed" ? 1 : 0;
        words = batch.status === "completed" ? "No requests (100%)" : "No requests were run";
      }
      bar.textContent = words; // fallback content
      if (text.textContent !== words) text.textContent = words;
    },
  };
}

export function statusBadge() {
  const el = h("span", {class: "badge"});
  return {
    el,
    update(status) {
      el.className = `badge status-${status}`;
      el.textContent = statusLabel(status);
    },
  };
}

/** The overnight extension fields worth a line in a list (runtime, concurrency...). */
function summaryPairs(batch) {
  const pairs = [["Created", time(batch.created_at)], ["Endpoint", h("code", {text: batch.endpoint})]];
  if (batch.model) pairs.push(["Model", batch.model]);
  const ext = batch.overnight || {};
  if (ext.model_template) pairs.push(["Model template", ext.model_template.template || ""]);
  if (ext.runtime && ext.runtime.type) pairs.push(["Runtime", ext.runtime.type]);
  if (ext.concurrency !== undefined) pairs.push(["Concurrency", String(ext.concurrency)]);
  if (ext.waiting_until) pairs.push(["Waiting for its engine until", time(ext.waiting_until)]);
  return pairs;
}

/** Something JSON-shaped as nested description lists (the overnight section);
 * fields without a value are left out. */
export function renderValue(key, value, nested = true) {
  if (value === null || value === undefined || value === "") return "—";
  if (Array.isArray(value)) {
    if (value.length === 0) return "none";
    if (value.every((v) => v === null || typeof v !== "object")) return value.join(", ");
    return h("ul", {class: "plain"}, value.map((v, i) => h("li", {}, renderValue(String(i), v))));
  }
  if (typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== null && v !== undefined && v !== "");
    return kvList(entries.map(([k, v]) => [humanize(k), renderValue(k, v)]), nested ? "kv nested" : "kv");
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number" && value > 1e9 && /(_at|_until|_since|^at|^since|^until)$/.test(key)) return time(value);
  return String(value);
}

/** Confirm, cancel, announce; refresh after. */
async function cancelBatch(ctx, batchId, onDone) {
  if (!window.confirm(`Cancel batch ${batchId}? Requests not yet sent are dropped; finished ones are kept.`)) return;
  try {
    const batch = await ctx.api.cancelBatch(batchId);
    ctx.announce(`Batch ${batchId} is ${statusLabel(batch.status)}.`);
  } catch (err) {
    ctx.fail(err, `Could not cancel batch ${batchId}`);
  }
  await onDone();
}

/** Fetch a file's bytes with the key and hand them to the browser as a download. */
export async function downloadFile(ctx, fileId, fallbackName, button) {
  const label = button ? button.textContent : "";
  if (button) {
    button.disabled = true;
    button.textContent = "Downloading…";
  }
  try {
    let name = fallbackName;
    try {
      name = (await ctx.api.getFile(fileId)).filename || fallbackName;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status === 401) throw err;
    }
    const blob = await ctx.api.fileBlob(fileId);
    const url = URL.createObjectURL(blob);
    const a = h("a", {href: url, download: name, hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    ctx.announce(`Downloaded ${name} (${bytes(blob.size)}).`);
  } catch (err) {
    ctx.fail(err, `Could not download ${fallbackName}`);
  } finally {
    if (button) {
      button.disabled = false;
      button.textContent = label;
    }
  }
}

// -- the list ---------------------------------------------------------------------------

export class BatchListView {
  constructor(ctx) {
    this.ctx = ctx;
    this.cards = new Map(); // batch id -> card
    this.statuses = new Map(); // batch id -> last status seen
    this.pages = 1;
    this.loaded = false;
  }

  mount(root) {
    this.heading = h("h1", {tabindex: "-1", text: "Batches"});
    this.list = h("ul", {class: "batch-list", "aria-labelledby": "batch-list-title"});
    this.empty = h("p", {class: "empty", hidden: true, text: "No batches yet. Create one above."});
    this.loading = h("p", {class: "hint", text: "Loading batches…"});
    this.more = h("button", {type: "button", class: "secondary", hidden: true, text: "Show more batches",
      onclick: () => this.showMore()});
    this.listError = h("p", {class: "error", role: "alert"});
    replace(root,
      this.heading,
      new CreateBatchForm(this.ctx, () => this.refresh()).el,
      h("section", {class: "panel", "aria-labelledby": "batch-list-title"},
        h("h2", {id: "batch-list-title", text: "Your batches"}),
        h("p", {class: "hint", text: "Newest first; updated every 2 seconds."}),
        this.loading, this.listError, this.list, this.empty, this.more));
  }

  async showMore() {
    this.pages += 1;
    await this.refresh();
  }

  async refresh() {
    const batches = [];
    let after;
    let more = false;
    try {
      for (let page = 0; page < this.pages; page += 1) {
        const res = await this.ctx.api.listBatches({limit: PAGE_SIZE, after});
        batches.push(...res.data);
        more = res.has_more;
        after = res.last_id;
        if (!more) break;
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      this.listError.textContent = `Could not load the batches: ${err.message}`;
      return;
    }
    this.listError.textContent = "";
    this.render(batches, more);
  }

  render(batches, more) {
    const changes = [];
    const seen = new Set();
    batches.forEach((batch, i) => {
      seen.add(batch.id);
      let card = this.cards.get(batch.id);
      if (!card) {
        card = new BatchCard(this.ctx, batch.id, () => this.refresh());
        this.cards.set(batch.id, card);
      }
      card.update(batch);
      const at = this.list.children[i];
      if (at !== card.el) this.list.insertBefore(card.el, at || null);
      const before = this.statuses.get(batch.id);
      if (this.loaded && before && before !== batch.status) {
        changes.push(`Batch ${batch.id} is now ${statusLabel(batch.status)}.`);
      }
      this.statuses.set(batch.id, batch.status);
    });
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.el.remove();
        this.cards.delete(id);
      }
    }
    this.loading.hidden = true;
    this.empty.hidden = batches.length > 0;
    this.more.hidden = !more;
    this.loaded = true;
    if (changes.length) this.ctx.announce(changes.join(" "));
  }
}

class BatchCard {
  constructor(ctx, id, refresh) {
    this.ctx = ctx;
    this.id = id;
    const titleId = uid("batch-title");
    this.badge = statusBadge();
    this.progress = progressMeter(`Progress of batch ${id}`);
    this.details = h("div");
    this.cancel = h("button", {type: "button", class: "danger", hidden: true, "aria-label": `Cancel batch ${id}`,
      text: "Cancel", onclick: () => cancelBatch(ctx, id, refresh)});
    this.download = h("button", {type: "button", class: "secondary", hidden: true,
      "aria-label": `Download the output of batch ${id}`, text: "Download output",
      onclick: () => downloadFile(ctx, this.outputFileId, `${id}_output.jsonl`, this.download)});
    this.link = h("a", {href: `#/batches/${encodeURIComponent(id)}`, text: id});
    this.el = h("li", {class: "batch-card", "data-batch-id": id},
      h("article", {"aria-labelledby": titleId},
        h("div", {class: "card-head"},
          h("h3", {id: titleId}, this.link),
          this.badge.el),
        this.progress.el,
        this.details,
        h("div", {class: "actions"}, this.download, this.cancel)));
    this.signature = "";
  }

  update(batch) {
    this.badge.update(batch.status);
    this.progress.update(batch);
    const pairs = summaryPairs(batch);
    const signature = JSON.stringify(pairs.map(([k, v]) => [k, v instanceof Node ? v.textContent : v]));
    if (signature !== this.signature) {
      replace(this.details, kvList(pairs, "kv compact"));
      this.signature = signature;
    }
    this.el.dataset.status = batch.status;
    // A button that disappears under the keyboard would drop focus to the page's start.
    if (document.activeElement === this.cancel && !CANCELLABLE.has(batch.status)) this.link.focus();
    this.cancel.hidden = !CANCELLABLE.has(batch.status);
    this.outputFileId = batch.output_file_id;
    this.download.hidden = !batch.output_file_id;
  }
}

// -- the create form ----------------------------------------------------------------------

class CreateBatchForm {
  constructor(ctx, onCreated) {
    this.ctx = ctx;
    this.onCreated = onCreated;
    const f = (id) => `create-${id}`;
    this.file = h("input", {id: f("file"), name: "file", type: "file", required: true,
      accept: ".jsonl,.ndjson,.json,.txt,application/jsonl,application/x-ndjson,text/plain",
      "aria-describedby": f("file-hint")});
    this.endpoint = h("select", {id: f("endpoint"), name: "endpoint"},
      ENDPOINTS.map((e) => h("option", {value: e, text: e})));
    this.window = h("input", {id: f("window"), name: "completion_window", type: "text", value: "24h", required: true,
      autocomplete: "off", spellcheck: "false", inputmode: "text", "aria-describedby": f("window-hint")});
    this.template = h("input", {id: f("template"), name: "model_template", type: "text", autocomplete: "off",
      spellcheck: "false", "aria-describedby": f("template-hint")});
    this.description = h("input", {id: f("description"), name: "description", type: "text", maxlength: 512,
      autocomplete: "off", "aria-describedby": f("description-hint")});
    this.submit = h("button", {type: "submit", text: "Upload and create batch"});
    this.error = h("p", {class: "error", role: "alert"});
    this.result = h("p", {class: "result"});
    this.models = h("p", {class: "hint", hidden: true});
    const field = (label, control, hint, hintId) => h("div", {class: "field"},
      h("label", {for: control.id, text: label}), control,
      hint ? h("p", {class: "hint", id: hintId, text: hint}) : null);
    this.el = h("section", {class: "panel", "aria-labelledby": "create-title"},
      h("h2", {id: "create-title", text: "Create a batch"}),
      h("form", {novalidate: true, onsubmit: (ev) => this.onSubmit(ev)},
        field("Input file (JSONL)", this.file,
          "One request per line: {\"custom_id\", \"method\": \"POST\", \"url\", \"body\"}. Uploaded with purpose \"batch\".",
          f("file-hint")),
        this.models,
        field("Endpoint", this.endpoint, null),
        field("Completion window", this.window, "How long the batch may take: a duration such as 24h, 90m or 2d.",
          f("window-hint")),
        field("Model template (optional)", this.template,
          "The name of one of this server's model deployment templates, to start an engine for this batch. " +
          "Leave empty to use the engine the server is set up with.", f("template-hint")),
        field("Description (optional)", this.description, "Stored as the batch's metadata.description.",
          f("description-hint")),
        this.error,
        h("div", {class: "actions"}, this.submit),
        this.result));
    this.loadModels();
  }

  async loadModels() {
    try {
      const res = await this.ctx.api.listModels();
      const names = (res.data || []).map((m) => m.id).filter(Boolean);
      if (names.length) {
        this.models.textContent = `Models the server's default engine serves: ${names.join(", ")}.`;
        this.models.hidden = false;
      }
    } catch {
      // Only a hint: the form works without it.
    }
  }

  invalid(control, message) {
    control.setAttribute("aria-invalid", "true");
    this.error.textContent = message;
    control.focus();
  }

  async onSubmit(ev) {
    ev.preventDefault();
    for (const c of [this.file, this.window, this.template]) c.removeAttribute("aria-invalid");
    this.error.textContent = "";
    this.result.textContent = "";
    const file = this.file.files[0];
    if (!file) return this.invalid(this.file, "Choose the input file (JSONL) to upload.");
    const window_ = this.window.value.trim();
    if (!WINDOW_PATTERN.test(window_)) {
      return this.invalid(this.window, "The completion window must be a duration such as 24h, 90m or 2d.");
    }
    const body = {input_file_id: "", endpoint: this.endpoint.value, completion_window: window_};
    const template = this.template.value.trim();
    if (template) body.overnight = {model_template: template};
    const description = this.description.value.trim();
    if (description) body.metadata = {description};

    this.submit.disabled = true;
    this.ctx.announce(`Uploading ${file.name}…`);
    let uploaded = null;
    try {
      uploaded = await this.ctx.api.uploadFile(file, "batch");
      body.input_file_id = uploaded.id;
      const batch = await this.ctx.api.createBatch(body);
      const message = `Batch ${batch.id} created from ${file.name} (${statusLabel(batch.status)}).`;
      this.result.textContent = message;
      this.ctx.announce(message);
      this.file.value = "";
      this.template.value = "";
      this.description.value = "";
      await this.onCreated(batch);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        this.ctx.fail(err, "");
        return;
      }
      // The upload is useless without its batch: do not leave it behind.
      if (uploaded) {
        this.ctx.api.deleteFile(uploaded.id).catch(() => {});
      }
      const where = err instanceof ApiError && err.param ? this.controlFor(err.param) : null;
      const prefix = uploaded ? "The batch was not created" : "The file was not uploaded";
      if (where) this.invalid(where, `${prefix}: ${err.message}`);
      else this.error.textContent = `${prefix}: ${err.message}`;
    } finally {
      this.submit.disabled = false;
    }
  }

  controlFor(param) {
    if (param === "completion_window") return this.window;
    if (param === "endpoint") return this.endpoint;
    if (/model_template|profile/.test(param)) return this.template;
    if (param === "file" || param === "input_file_id" || param === "purpose") return this.file;
    return null;
  }
}

// -- one batch ------------------------------------------------------------------------------

const TIMELINE = [
  ["created_at", "Created"],
  ["in_progress_at", "Started"],
  ["finalizing_at", "Finalizing"],
  ["completed_at", "Completed"],
  ["failed_at", "Failed"],
  ["cancelling_at", "Cancel requested"],
  ["cancelled_at", "Cancelled"],
  ["expired_at", "Expired"],
  ["expires_at", "Completion window ends"],
];

const FILES = [
  ["input_file_id", "Input file", "input"],
  ["output_file_id", "Output file", "output"],
  ["error_file_id", "Error file", "errors"],
];

export class BatchDetailView {
  constructor(ctx, batchId) {
    this.ctx = ctx;
    this.id = batchId;
    this.status = null;
    this.files = new Map(); // file id -> list item
  }

  mount(root) {
    const id = this.id;
    this.heading = h("h1", {tabindex: "-1"}, "Batch ", h("span", {class: "id", text: id}));
    this.badge = statusBadge();
    this.progress = progressMeter(`Progress of batch ${id}`);
    this.cancel = h("button", {type: "button", class: "danger", hidden: true, text: "Cancel batch",
      onclick: () => cancelBatch(this.ctx, id, () => this.refresh())});
    this.problem = h("p", {class: "error", role: "alert"});
    this.summary = h("div");
    this.requests = h("div");
    this.usage = h("div");
    this.timeline = h("div");
    this.errorsSection = h("section", {class: "panel", hidden: true, "aria-labelledby": "errors-title"},
      h("h2", {id: "errors-title", text: "Errors"}));
    this.errors = h("ul", {class: "errors"});
    this.errorsSection.append(this.errors);
    this.engine = h("div");
    this.fileList = h("ul", {class: "files"});
    this.noFiles = h("p", {class: "hint", text: "No files yet."});
    this.metadataSection = h("section", {class: "panel", hidden: true, "aria-labelledby": "metadata-title"},
      h("h2", {id: "metadata-title", text: "Metadata"}));
    this.metadata = h("div");
    this.metadataSection.append(this.metadata);
    this.body = h("div", {hidden: true},
      h("section", {class: "panel", "aria-labelledby": "status-title"},
        h("h2", {id: "status-title", text: "Status"}),
        h("p", {class: "status-line"}, this.badge.el),
        this.progress.el, this.summary,
        h("div", {class: "actions"}, this.cancel)),
      h("section", {class: "panel", "aria-labelledby": "files-title"},
        h("h2", {id: "files-title", text: "Files"}), this.fileList, this.noFiles),
      h("section", {class: "panel", "aria-labelledby": "requests-title"},
        h("h2", {id: "requests-title", text: "Requests"}), this.requests),
      h("section", {class: "panel", "aria-labelledby": "usage-title"},
        h("h2", {id: "usage-title", text: "Token usage"}), this.usage),
      this.errorsSection,
      h("section", {class: "panel", "aria-labelledby": "engine-title"},
        h("h2", {id: "engine-title", text: "Engine and runtime"}), this.engine),
      h("section", {class: "panel", "aria-labelledby": "timeline-title"},
        h("h2", {id: "timeline-title", text: "Timeline"}), this.timeline),
      this.metadataSection);
    replace(root,
      h("p", {class: "back"}, h("a", {href: "#/batches", text: "← All batches"})),
      this.heading, this.problem, this.body);
  }

  async refresh() {
    let batch;
    try {
      batch = await this.ctx.api.getBatch(this.id);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      this.problem.textContent = err instanceof ApiError && err.status === 404
        ? `There is no batch ${this.id} for this key.`
        : `Could not load batch ${this.id}: ${err.message}`;
      return;
    }
    this.problem.textContent = "";
    this.render(batch);
  }

  render(batch) {
    if (this.status && this.status !== batch.status) {
      this.ctx.announce(`Batch ${batch.id} is now ${statusLabel(batch.status)}.`);
    }
    this.status = batch.status;
    this.body.hidden = false;
    this.badge.update(batch.status);
    this.progress.update(batch);
    setIfChanged(this.summary, kvList(summaryPairs(batch), "kv"));
    if (document.activeElement === this.cancel && !CANCELLABLE.has(batch.status)) this.heading.focus();
    this.cancel.hidden = !CANCELLABLE.has(batch.status);

    const c = counts(batch);
    setIfChanged(this.requests, kvList([
      ["Total", String(c.total)], ["Succeeded", String(c.completed)], ["Failed", String(c.failed)],
      ["Not done yet", String(Math.max(0, c.total - c.done))]]));
    const u = batch.usage || {};
    setIfChanged(this.usage, kvList([
      ["Input tokens", String(u.input_tokens ?? 0)],
      ["Cached input tokens", String((u.input_tokens_details || {}).cached_tokens ?? 0)],
      ["Output tokens", String(u.output_tokens ?? 0)],
      ["Reasoning tokens", String((u.output_tokens_details || {}).reasoning_tokens ?? 0)],
      ["Total tokens", String(u.total_tokens ?? 0)]]));
    setIfChanged(this.timeline, kvList(TIMELINE.filter(([k]) => batch[k]).map(([k, label]) => [label, time(batch[k])])));

    const errors = (batch.errors && batch.errors.data) || [];
    this.errorsSection.hidden = errors.length === 0;
    const errorItems = errors.map((e) => h("li", {},
      h("code", {text: e.code || "error"}), ": ", e.message || "",
      e.line !== null && e.line !== undefined ? ` (line ${e.line})` : "",
      e.param ? ` [${e.param}]` : ""));
    setIfChanged(this.errors, errorItems);

    const ext = batch.overnight;
    setIfChanged(this.engine, ext && Object.keys(ext).length
      ? renderValue("overnight", ext, false)
      : h("p", {class: "hint", text: "Nothing reported yet: overnight fills this in once the batch runs (its engine's state, the runtime that started it, its concurrency)."}));

    const meta = batch.metadata && Object.keys(batch.metadata).length ? batch.metadata : null;
    this.metadataSection.hidden = !meta;
    if (meta) setIfChanged(this.metadata, kvList(Object.entries(meta).map(([k, v]) => [k, String(v)])));

    for (const [key, label, suffix] of FILES) {
      const fileId = batch[key];
      if (fileId && !this.files.has(fileId)) this.addFile(fileId, label, `${batch.id}_${suffix}.jsonl`);
    }
    this.noFiles.hidden = this.files.size > 0;
  }

  addFile(fileId, label, fallbackName) {
    const info = h("span", {class: "file-info", text: fileId});
    const button = h("button", {type: "button", class: "secondary", text: "Download",
      "aria-label": `Download the ${label.toLowerCase()} of batch ${this.id}`,
      onclick: () => downloadFile(this.ctx, fileId, fallbackName, button)});
    const item = h("li", {"data-file": label.toLowerCase().split(" ")[0]},
      h("span", {class: "file-label", text: label}), info, button);
    this.files.set(fileId, item);
    this.fileList.append(item);
    this.ctx.api.getFile(fileId).then(
      (f) => replace(info, h("span", {text: f.filename}), " ", h("span", {class: "hint", text: `(${bytes(f.bytes)}, ${fileId})`})),
      (err) => {
        if (err instanceof ApiError && err.status === 404) {
          replace(info, `${fileId}: no longer available (deleted or expired)`);
          button.hidden = true;
        }
      });
  }
}

/** Replace el's children only when what they say changed (keeps a screen reader's place). */
export function setIfChanged(el, content) {
  const nodes = Array.isArray(content) ? content : [content];
  const probe = h("div", {}, nodes.map((n) => (n instanceof Node ? n.cloneNode(true) : n)));
  if (probe.innerHTML === el.innerHTML) return;
  replace(el, nodes);
}
