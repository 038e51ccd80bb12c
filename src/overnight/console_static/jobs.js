// The Jobs section: console jobs (/api/v1/jobs), each of which gets its own
// resource from a provider, runs its batch there and releases the resource.
// A live list with a create form, and one job's detail: its events as a timeline,
// its provision record, its cost, its datasets.
//
// As in batches.js, views are built once and updated in place on every poll, and
// a status that changes between two polls is announced through the live region.

import {ApiError} from "./api.js";
import {ENDPOINTS, renderValue, setIfChanged, statusBadge, statusLabel} from "./batches.js";
import {bytes, h, kvList, replace, time, uid} from "./dom.js";

/** Where a job ends (console/jobs.py). */
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed"]);
const PAGE_SIZE = 20;
const WINDOW_PATTERN = /^\d+(\.\d+)?\s*[smhd]$/;

function counts(job) {
  const rc = job.request_counts || {};
  const total = rc.total || 0;
  const completed = rc.completed || 0;
  const failed = rc.failed || 0;
  return {total, completed, failed, done: Math.min(total, completed + failed)};
}

function cancellable(job) {
  return !TERMINAL.has(job.status) && !job.cancel_requested_at;
}

function provider(job) {
  return (job.provision && job.provision.provider) || job.provider || "the provider";
}

/** What the job is doing before its batch has counted its requests, in words. */
function stageWords(job) {
  const prov = job.provision || {};
  const cancel = job.cancel_requested_at && !TERMINAL.has(job.status) ? " Cancel requested." : "";
  switch (job.status) {
    case "queued":
      return `Waiting for the planner to take it (provider ${provider(job)}).${cancel}`;
    case "resource_preparing":
      return `Preparing a ${provider(job)} resource (${statusLabel(prov.status || "requested")}).${cancel}`;
    case "submitting":
      return `The resource is ready: creating the batch on its engine.${cancel}`;
    case "validating":
      return `Counting the requests in the input file…${cancel}`;
    case "cancelling":
      return "Cancelling…";
    default:
      return `${statusLabel(job.status)}.${cancel}`;
  }
}

/** A <progress> with its words beside it (its accessible description): the
 * batch's numbers once it has them, what the job is doing until then. */
function jobProgress(name) {
  const textId = uid("job-progress-text");
  const bar = h("progress", {"aria-label": name, "aria-describedby": textId, max: 1});
  const text = h("p", {class: "progress-text", id: textId});
  return {
    el: h("div", {class: "progress"}, bar, text),
    update(job) {
      const {total, completed, failed, done} = counts(job);
      let words;
      if (total > 0) {
        bar.max = total;
        bar.value = done;
        words = `${done} of ${total} requests done (${Math.floor((done * 100) / total)}%)`;
        if (failed) words += `: ${completed} succeeded, ${failed} failed`;
      } else if (!TERMINAL.has(job.status)) {
        bar.removeAttribute("value"); // indeterminate: nothing to count yet
        words = stageWords(job);
      } else {
        bar.max = 1;
        bar.value = job.status === "completed" ? 1 : 0;
        words = job.status === "completed" ? "No requests (100%)" : "No requests were run";
      }
      bar.textContent = words; // fallback content
      if (text.textContent !== words) text.textContent = words;
    },
  };
}

function templateOf(job) {
  if (!job.model_template_name) return "—";
  const version = job.model_template_version ? ` version ${job.model_template_version}` : "";
  const profile = job.profile ? `, profile ${job.profile}` : "";
  return `${job.model_template_name}${version}${profile}`;
}

function batchLink(job) {
  return job.batch_id ? h("a", {href: `#/batches/${encodeURIComponent(job.batch_id)}`, text: job.batch_id}) : null;
}

/** The lines worth showing in a list card. */
function summaryPairs(job) {
  const pairs = [["Created", time(job.created_at)]];
  if (job.name) pairs.push(["Name", job.name]);
  pairs.push(["Provider", job.provider || "—"], ["Template", templateOf(job)]);
  if (job.provision && job.provision.status) pairs.push(["Resource", statusLabel(job.provision.status)]);
  if (job.batch_id) pairs.push(["Batch", batchLink(job)]);
  if (job.error_message) pairs.push(["Error", job.error_message]);
  return pairs;
}

function signature(pairs) {
  return JSON.stringify(pairs.map(([k, v]) => [k, v instanceof Node ? v.textContent : v]));
}

async function cancelJob(ctx, jobId, onDone) {
  if (!window.confirm(`Cancel job ${jobId}? Its batch is cancelled (finished requests are kept) and its resource released.`)) {
    return;
  }
  try {
    const job = await ctx.api.cancelJob(jobId);
    ctx.announce(`Cancel requested for job ${jobId} (${statusLabel(job.status)}).`);
  } catch (err) {
    ctx.fail(err, `Could not cancel job ${jobId}`);
  }
  await onDone();
}

/** Fetch a dataset through the console's file proxy with the key and hand it to
 * the browser as a download. */
async function downloadDataset(ctx, fileId, name, button) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "Downloading…";
  try {
    const blob = await ctx.api.datasetBlob(fileId);
    const url = URL.createObjectURL(blob);
    const a = h("a", {href: url, download: name, hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    ctx.announce(`Downloaded ${name} (${bytes(blob.size)}).`);
  } catch (err) {
    ctx.fail(err, `Could not download ${name}`);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// -- the list ---------------------------------------------------------------------------------

export class JobListView {
  constructor(ctx) {
    this.ctx = ctx;
    this.cards = new Map(); // job id -> card
    this.statuses = new Map(); // job id -> last status seen
    this.pages = 1;
    this.loaded = false;
  }

  mount(root) {
    this.heading = h("h1", {tabindex: "-1", text: "Jobs"});
    this.list = h("ul", {class: "batch-list job-list", "aria-labelledby": "job-list-title"});
    this.empty = h("p", {class: "empty", hidden: true, text: "No jobs yet. Create one above."});
    this.loading = h("p", {class: "hint", text: "Loading jobs…"});
    this.more = h("button", {type: "button", class: "secondary", hidden: true, text: "Show more jobs",
      onclick: () => this.showMore()});
    this.listError = h("p", {class: "error", role: "alert"});
    replace(root,
      this.heading,
      h("p", {class: "hint intro", text: "A job brings its own engine: overnight gets a resource from a provider, " +
        "starts the model template's engine on it, runs the batch and releases the resource."}),
      new CreateJobForm(this.ctx, () => this.refresh()).el,
      h("section", {class: "panel", "aria-labelledby": "job-list-title"},
        h("h2", {id: "job-list-title", text: "Your jobs"}),
        h("p", {class: "hint", text: "Newest first; updated every 2 seconds."}),
        this.loading, this.listError, this.list, this.empty, this.more));
  }

  async showMore() {
    this.pages += 1;
    await this.refresh();
  }

  async refresh() {
    const jobs = [];
    let after;
    let more = false;
    try {
      for (let page = 0; page < this.pages; page += 1) {
        const res = await this.ctx.api.listJobs({limit: PAGE_SIZE, after});
        jobs.push(...res.data);
        more = res.has_more;
        after = res.last_id;
        if (!more) break;
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      this.listError.textContent = `Could not load the jobs: ${err.message}`;
      return;
    }
    this.listError.textContent = "";
    this.render(jobs, more);
  }

  render(jobs, more) {
    const changes = [];
    const seen = new Set();
    jobs.forEach((job, i) => {
      seen.add(job.id);
      let card = this.cards.get(job.id);
      if (!card) {
        card = new JobCard(this.ctx, job.id, () => this.refresh());
        this.cards.set(job.id, card);
      }
      card.update(job);
      const at = this.list.children[i];
      if (at !== card.el) this.list.insertBefore(card.el, at || null);
      const before = this.statuses.get(job.id);
      if (this.loaded && before && before !== job.status) {
        changes.push(`Job ${job.name || job.id} is now ${statusLabel(job.status)}.`);
      }
      this.statuses.set(job.id, job.status);
    });
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.el.remove();
        this.cards.delete(id);
      }
    }
    this.loading.hidden = true;
    this.empty.hidden = jobs.length > 0;
    this.more.hidden = !more;
    this.loaded = true;
    if (changes.length) this.ctx.announce(changes.join(" "));
  }
}

class JobCard {
  constructor(ctx, id, refresh) {
    this.ctx = ctx;
    this.id = id;
    const titleId = uid("job-title");
    this.badge = statusBadge();
    this.progress = jobProgress(`Progress of job ${id}`);
    this.details = h("div");
    this.cancel = h("button", {type: "button", class: "danger", hidden: true, "aria-label": `Cancel job ${id}`,
      text: "Cancel", onclick: () => cancelJob(ctx, id, refresh)});
    this.download = h("button", {type: "button", class: "secondary", hidden: true,
      "aria-label": `Download the output of job ${id}`, text: "Download output",
      onclick: () => downloadDataset(ctx, this.outputId, `${id}_output.jsonl`, this.download)});
    this.link = h("a", {href: `#/jobs/${encodeURIComponent(id)}`, text: id});
    this.el = h("li", {class: "batch-card job-card", "data-job-id": id},
      h("article", {"aria-labelledby": titleId},
        h("div", {class: "card-head"}, h("h3", {id: titleId}, this.link), this.badge.el),
        this.progress.el,
        this.details,
        h("div", {class: "actions"}, this.download, this.cancel)));
    this.signature = "";
  }

  update(job) {
    this.badge.update(job.status);
    this.progress.update(job);
    const pairs = summaryPairs(job);
    const sig = signature(pairs);
    if (sig !== this.signature) {
      replace(this.details, kvList(pairs, "kv compact"));
      this.signature = sig;
    }
    this.el.dataset.status = job.status;
    // A button that disappears under the keyboard would drop focus to the page's start.
    if (document.activeElement === this.cancel && !cancellable(job)) this.link.focus();
    this.cancel.hidden = !cancellable(job);
    this.outputId = job.output_dataset;
    this.download.hidden = !job.output_dataset;
  }
}

// -- the create form ----------------------------------------------------------------------------

class CreateJobForm {
  constructor(ctx, onCreated) {
    this.ctx = ctx;
    this.onCreated = onCreated;
    const f = (id) => `job-${id}`;
    this.file = h("input", {id: f("file"), name: "file", type: "file", required: true,
      accept: ".jsonl,.ndjson,.json,.txt,application/jsonl,application/x-ndjson,text/plain",
      "aria-describedby": f("file-hint")});
    this.template = h("input", {id: f("template"), name: "model_template_name", type: "text", autocomplete: "off",
      spellcheck: "false", "aria-describedby": f("template-hint")});
    this.provider = h("select", {id: f("provider"), name: "provider", "aria-describedby": f("provider-hint")},
      h("option", {value: "", text: "The server's default"}));
    this.endpoint = h("select", {id: f("endpoint"), name: "endpoint"},
      ENDPOINTS.map((e) => h("option", {value: e, text: e})));
    this.window = h("input", {id: f("window"), name: "completion_window", type: "text", value: "24h", required: true,
      autocomplete: "off", spellcheck: "false", "aria-describedby": f("window-hint")});
    this.name = h("input", {id: f("name"), name: "name", type: "text", maxlength: 256, autocomplete: "off"});
    this.priority = h("input", {id: f("priority"), name: "priority", type: "text", inputmode: "numeric",
      autocomplete: "off", "aria-describedby": f("priority-hint")});
    this.submit = h("button", {type: "submit", text: "Upload and create job"});
    this.error = h("p", {class: "error", role: "alert"});
    this.result = h("p", {class: "result"});
    const field = (label, control, hint, hintId) => h("div", {class: "field"},
      h("label", {for: control.id, text: label}), control,
      hint ? h("p", {class: "hint", id: hintId, text: hint}) : null);
    this.el = h("section", {class: "panel", "aria-labelledby": "job-create-title"},
      h("h2", {id: "job-create-title", text: "Create a job"}),
      h("form", {novalidate: true, onsubmit: (ev) => this.onSubmit(ev)},
        field("Input file (JSONL)", this.file,
          "One request per line: {\"custom_id\", \"method\": \"POST\", \"url\", \"body\"}. Uploaded through the console's file proxy.",
          f("file-hint")),
        field("Model template", this.template,
          "The name of a model deployment template: the engine the job's resource runs. Leave empty for the " +
          "model's or the server's default template.", f("template-hint")),
        field("Provider", this.provider, "Where the resource comes from.", f("provider-hint")),
        field("Endpoint", this.endpoint, null),
        field("Completion window", this.window, "How long the batch may take: a duration such as 24h, 90m or 2d.",
          f("window-hint")),
        field("Name (optional)", this.name, null),
        field("Priority (optional)", this.priority,
          "An integer from -1000 to 1000; higher goes first when the server plans by priority.", f("priority-hint")),
        this.error,
        h("div", {class: "actions"}, this.submit),
        this.result));
    this.loadProviders();
  }

  /** The providers this server has configured, from its catalog. */
  async loadProviders() {
    try {
      const res = await this.ctx.api.catalog();
      const names = [...new Set((res.data || []).map((item) => item.provider).filter(Boolean))].sort();
      for (const name of names) this.provider.append(h("option", {value: name, text: name}));
    } catch {
      // Only a convenience: the server's default provider still works.
    }
  }

  invalid(control, message) {
    control.setAttribute("aria-invalid", "true");
    this.error.textContent = message;
    control.focus();
  }

  async onSubmit(ev) {
    ev.preventDefault();
    for (const c of [this.file, this.template, this.provider, this.window, this.name, this.priority]) {
      c.removeAttribute("aria-invalid");
    }
    this.error.textContent = "";
    this.result.textContent = "";
    const file = this.file.files[0];
    if (!file) return this.invalid(this.file, "Choose the input file (JSONL) to upload.");
    const window_ = this.window.value.trim();
    if (!WINDOW_PATTERN.test(window_)) {
      return this.invalid(this.window, "The completion window must be a duration such as 24h, 90m or 2d.");
    }
    const body = {input_dataset: "", endpoint: this.endpoint.value, completion_window: window_};
    const priority = this.priority.value.trim();
    if (priority) {
      const n = Number(priority);
      if (!/^-?\d+$/.test(priority) || n < -1000 || n > 1000) {
        return this.invalid(this.priority, "The priority must be a whole number from -1000 to 1000.");
      }
      body.priority = n;
    }
    const template = this.template.value.trim();
    if (template) body.model_template_name = template;
    if (this.provider.value) body.provider = this.provider.value;
    const name = this.name.value.trim();
    if (name) body.name = name;

    this.submit.disabled = true;
    this.ctx.announce(`Uploading ${file.name}…`);
    let uploaded = null;
    try {
      uploaded = await this.ctx.api.uploadDataset(file);
      body.input_dataset = uploaded.id;
      const job = await this.ctx.api.createJob(body);
      const message = `Job ${job.id} created from ${file.name} (${statusLabel(job.status)}, provider ${job.provider}).`;
      this.result.textContent = message;
      this.ctx.announce(message);
      this.file.value = "";
      this.name.value = "";
      await this.onCreated(job);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        this.ctx.fail(err, "");
        return;
      }
      // The upload is useless without its job: do not leave it behind (through /v1,
      // where the server keeps the files; a console without it keeps the upload).
      if (uploaded) this.ctx.api.deleteFile(uploaded.id).catch(() => {});
      // The field at fault: the server's param, else what its error code is about.
      const where = err instanceof ApiError ? this.controlFor(err.param) || this.controlForCode(err.code) : null;
      const prefix = uploaded ? "The job was not created" : "The file was not uploaded";
      if (where) this.invalid(where, `${prefix}: ${err.message}`);
      else this.error.textContent = `${prefix}: ${err.message}`;
    } finally {
      this.submit.disabled = false;
    }
  }

  controlFor(param) {
    if (param === "completion_window") return this.window;
    if (param === "endpoint") return this.endpoint;
    if (param === "provider") return this.provider;
    if (param === "priority") return this.priority;
    if (param === "name") return this.name;
    if (/model_template|profile|model_id/.test(param)) return this.template;
    if (param === "file" || param === "input_dataset" || param === "purpose") return this.file;
    return null;
  }

  controlForCode(code) {
    if (!code) return null;
    if (/template|profile|model/.test(code)) return this.template;
    if (/provider/.test(code)) return this.provider;
    if (/file/.test(code)) return this.file;
    return null;
  }
}

// -- one job --------------------------------------------------------------------------------------

const DATASETS = [
  ["input_dataset", "Input dataset", "input"],
  ["output_dataset", "Output dataset", "output"],
  ["error_dataset", "Error dataset", "errors"],
];

export class JobDetailView {
  constructor(ctx, jobId) {
    this.ctx = ctx;
    this.id = jobId;
    this.status = null;
    this.events = new Map(); // event key -> list item
    this.datasets = new Map(); // file id -> list item
  }

  mount(root) {
    const id = this.id;
    const section = (key, title, ...content) => h("section", {class: "panel", "aria-labelledby": `job-${key}-title`},
      h("h2", {id: `job-${key}-title`, text: title}), ...content);
    this.heading = h("h1", {tabindex: "-1"}, "Job ", h("span", {class: "id", text: id}));
    this.badge = statusBadge();
    this.progress = jobProgress(`Progress of job ${id}`);
    this.cancel = h("button", {type: "button", class: "danger", hidden: true, text: "Cancel job",
      onclick: () => cancelJob(this.ctx, id, () => this.refresh())});
    this.problem = h("p", {class: "error", role: "alert"});
    this.summary = h("div");
    this.eventList = h("ol", {class: "events"});
    this.noEvents = h("p", {class: "hint", text: "No events yet."});
    this.provision = h("div");
    this.cost = h("div");
    this.requests = h("div");
    this.datasetList = h("ul", {class: "files"});
    this.noDatasets = h("p", {class: "hint", text: "No datasets yet."});
    this.metadataSection = section("metadata", "Metadata");
    this.metadataSection.hidden = true;
    this.metadata = h("div");
    this.metadataSection.append(this.metadata);
    this.body = h("div", {hidden: true},
      section("status", "Status",
        h("p", {class: "status-line"}, this.badge.el), this.progress.el, this.summary,
        h("div", {class: "actions"}, this.cancel)),
      section("events", "Events",
        h("p", {class: "hint", text: "What happened to the job, oldest first; new events are added as they happen."}),
        this.eventList, this.noEvents),
      section("provision", "Resource", this.provision),
      section("cost", "Cost", this.cost),
      section("requests", "Requests and tokens", this.requests),
      section("datasets", "Datasets", this.datasetList, this.noDatasets),
      this.metadataSection);
    replace(root,
      h("p", {class: "back"}, h("a", {href: "#/jobs", text: "← All jobs"})),
      this.heading, this.problem, this.body);
  }

  async refresh() {
    let job;
    try {
      job = await this.ctx.api.getJob(this.id);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      this.problem.textContent = err instanceof ApiError && err.status === 404
        ? `There is no job ${this.id} for this key.`
        : `Could not load job ${this.id}: ${err.message}`;
      return;
    }
    this.problem.textContent = "";
    this.render(job);
  }

  render(job) {
    if (this.status && this.status !== job.status) {
      this.ctx.announce(`Job ${job.name || job.id} is now ${statusLabel(job.status)}.`);
    }
    this.status = job.status;
    this.body.hidden = false;
    this.badge.update(job.status);
    this.progress.update(job);
    const pairs = [["Name", job.name || "—"], ["Provider", job.provider || "—"], ["Template", templateOf(job)],
      ["Endpoint", h("code", {text: job.endpoint})], ["Completion window", job.completion_window],
      ["Priority", String(job.priority ?? 0)], ["Created", time(job.created_at)]];
    if (job.provision_resource_deadline) pairs.push(["Resource deadline", time(job.provision_resource_deadline)]);
    if (job.batch_id) pairs.push(["Batch", batchLink(job)]);
    if (job.error_message) pairs.push(["Error", job.error_message]);
    setIfChanged(this.summary, kvList(pairs, "kv"));
    if (document.activeElement === this.cancel && !cancellable(job)) this.heading.focus();
    this.cancel.hidden = !cancellable(job);

    this.renderEvents(job.events || []);

    const prov = job.provision;
    setIfChanged(this.provision, prov ? kvList([
      ["Provider", prov.provider || "—"], ["Status", statusLabel(prov.status || "—")],
      ["Engine endpoint", prov.endpoint ? h("code", {text: prov.endpoint}) : "—"],
      ["Resource ids", (prov.resource_ids || []).length ? prov.resource_ids.join(", ") : "—"],
      ["Provider details", renderValue("raw", prov.raw || {})],
    ]) : h("p", {class: "hint", text: "No resource has been requested yet."}));

    const cost = job.cost || {};
    setIfChanged(this.cost, [kvList([
      ["GPU-seconds", Number(cost.gpu_seconds || 0).toLocaleString(undefined, {maximumFractionDigits: 3})],
      ["US dollars", cost.usd === null || cost.usd === undefined ? "— (the provider states no price)"
        : `$${Number(cost.usd).toLocaleString(undefined, {minimumFractionDigits: 2, maximumFractionDigits: 6})}`],
    ]), h("p", {class: "hint", text: "From when the resource was running to its confirmed release; counted once the provider confirms the release."})]);

    const c = counts(job);
    const u = job.usage || {};
    setIfChanged(this.requests, kvList([
      ["Total", String(c.total)], ["Succeeded", String(c.completed)], ["Failed", String(c.failed)],
      ["Not done yet", String(Math.max(0, c.total - c.done))],
      ["Input tokens", String(u.input_tokens ?? 0)], ["Output tokens", String(u.output_tokens ?? 0)]]));

    const meta = job.metadata && Object.keys(job.metadata).length ? job.metadata : null;
    this.metadataSection.hidden = !meta;
    if (meta) setIfChanged(this.metadata, kvList(Object.entries(meta).map(([k, v]) => [k, String(v)])));

    for (const [key, label, suffix] of DATASETS) {
      const fileId = job[key];
      if (fileId && !this.datasets.has(fileId)) this.addDataset(fileId, label, `${job.id}_${suffix}.jsonl`);
    }
    this.noDatasets.hidden = this.datasets.size > 0;
  }

  /** New events are appended (the list is never rebuilt under a reader); one updated
   * in place (an outage's retries) gets its new words. */
  renderEvents(events) {
    const keep = new Set();
    for (const e of events) {
      const key = `${e.at}|${e.type}`;
      keep.add(key);
      const words = e.message || "";
      let item = this.events.get(key);
      if (!item) {
        item = h("li", {"data-type": e.type},
          time(e.at), " ", h("span", {class: "event-type", text: statusLabel(e.type)}), " ",
          h("span", {class: "event-message", text: words}));
        this.events.set(key, item);
        this.eventList.append(item);
      } else {
        const message = item.querySelector(".event-message");
        if (message.textContent !== words) message.textContent = words;
      }
    }
    for (const [key, item] of this.events) {
      if (!keep.has(key)) {
        item.remove();
        this.events.delete(key);
      }
    }
    this.noEvents.hidden = this.events.size > 0;
  }

  addDataset(fileId, label, name) {
    const button = h("button", {type: "button", class: "secondary", text: "Download",
      "aria-label": `Download the ${label.toLowerCase()} of job ${this.id}`,
      onclick: () => downloadDataset(this.ctx, fileId, name, button)});
    const item = h("li", {"data-dataset": label.toLowerCase().split(" ")[0]},
      h("span", {class: "file-label", text: label}), h("span", {class: "file-info", text: fileId}), button);
    this.datasets.set(fileId, item);
    this.datasetList.append(item);
  }
}
