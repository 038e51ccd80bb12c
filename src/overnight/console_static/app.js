// The overnight web console: sign in with an API key, then the sections below,
// routed by the URL hash (#/batches, #/batches/<id>) so the back button and links work.

import {Api, ApiError, isHeaderSafe} from "./api.js";
import {BatchDetailView, BatchListView} from "./batches.js";
import {h, replace} from "./dom.js";
import {JobDetailView, JobListView} from "./jobs.js";

const KEY_STORAGE = "overnight.console.apiKey";
const POLL_MS = 2000;

// The console's sections, one nav link each. A section with ``available`` is
// listed only when the server has its API (asked once per sign-in): a server
// without the console (OVERNIGHT_CONSOLE=false) has no Jobs link at all.
const SECTIONS = [
  {
    id: "batches",
    label: "Batches",
    routes: [
      [/^\/batches\/?$/, () => (ctx) => new BatchListView(ctx)],
      [/^\/batches\/([^/]+)$/, (m) => (ctx) => new BatchDetailView(ctx, decodeURIComponent(m[1]))],
    ],
  },
  {
    id: "jobs",
    label: "Jobs",
    available: (api) => api.hasJobs(),
    routes: [
      [/^\/jobs\/?$/, () => (ctx) => new JobListView(ctx)],
      [/^\/jobs\/([^/]+)$/, (m) => (ctx) => new JobDetailView(ctx, decodeURIComponent(m[1]))],
    ],
  },
];
const HOME = "#/batches";

const $ = (id) => document.getElementById(id);

class Console {
  constructor() {
    this.api = null;
    this.view = null;
    this.section = null;
    this.timer = null;
    this.generation = 0; // bumps on every view change / sign-out: stale polls are dropped
    this.sections = []; // the sections this server has, for the key signed in with
  }

  start() {
    $("sign-in-form").addEventListener("submit", (ev) => this.onSignIn(ev));
    $("sign-out").addEventListener("click", () => this.signOut("Signed out."));
    window.addEventListener("hashchange", () => this.route({focus: true}));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.view) this.poll(this.generation);
    });
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) this.enter(key, {focus: false});
    else this.showSignIn();
  }

  // -- signing in and out --------------------------------------------------------------

  showSignIn(message = "") {
    $("sign-in").hidden = false;
    $("sections").hidden = true;
    $("account").hidden = true;
    replace($("view"));
    $("sign-in-error").textContent = message;
    document.title = "Sign in · overnight console";
  }

  async onSignIn(ev) {
    ev.preventDefault();
    const input = $("api-key");
    const error = $("sign-in-error");
    const key = input.value.trim();
    input.removeAttribute("aria-invalid");
    error.textContent = "";
    const refuse = (message) => {
      input.setAttribute("aria-invalid", "true");
      error.textContent = message;
      input.focus();
    };
    if (!key) return refuse("Enter an API key.");
    if (!isHeaderSafe(key)) return refuse("An API key is printable ASCII without spaces; this one is not.");
    const button = ev.submitter || ev.target.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      // Any keyed call tells whether the server takes the key; this one is cheap.
      await new Api(key).listBatches({limit: 1});
    } catch (err) {
      button.disabled = false;
      if (err instanceof ApiError && err.status === 401) return refuse(`The server refused this key: ${err.message}`);
      return refuse(`Could not sign in: ${err.message}`);
    }
    button.disabled = false;
    sessionStorage.setItem(KEY_STORAGE, key);
    input.value = "";
    this.announce("Signed in.");
    this.enter(key, {focus: true});
  }

  async enter(key, {focus}) {
    const api = new Api(key);
    this.api = api;
    $("sign-in").hidden = true;
    $("account").hidden = false;
    if (!location.hash.startsWith("#/")) history.replaceState(null, "", HOME);
    let sections;
    try {
      sections = await this.availableSections(api);
    } catch (err) {
      if (this.api === api) this.fail(err, "Could not load the console");
      return;
    }
    if (this.api !== api) return; // signed out meanwhile
    this.sections = sections;
    replace($("section-links"), sections.map((s) =>
      h("li", {}, h("a", {href: `#/${s.id}`, "data-section": s.id, text: s.label}))));
    $("sections").hidden = false;
    this.route({focus});
  }

  /** The sections whose API this server has (a refused key signs out through fail()). */
  async availableSections(api) {
    const found = await Promise.all(SECTIONS.map((s) => (s.available ? s.available(api) : true)));
    return SECTIONS.filter((_, i) => found[i]);
  }

  signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    this.api = null;
    this.sections = [];
    replace($("section-links"));
    this.stopView();
    $("notice").textContent = "";
    this.showSignIn(message === "Signed out." ? "" : message);
    this.announce(message);
    $("api-key").focus();
  }

  // -- views ---------------------------------------------------------------------------

  route({focus}) {
    if (!this.api || !this.sections.length) return; // still asking the server which sections it has
    const path = location.hash.startsWith("#/") ? location.hash.slice(1) : null;
    if (path === null) return; // an in-page anchor (the skip link): not a route
    let make = null;
    let section = null;
    for (const s of this.sections) {
      for (const [pattern, factory] of s.routes) {
        const m = pattern.exec(path);
        if (m) {
          make = factory(m);
          section = s;
          break;
        }
      }
      if (make) break;
    }
    this.stopView();
    this.markSection(section);
    $("notice").textContent = "";
    const root = $("view");
    if (!make) {
      replace(root, h("h1", {tabindex: "-1", text: "Not found"}),
        h("p", {}, "Nothing here. ", h("a", {href: HOME, text: "Go to the batches"}), "."));
      document.title = "Not found · overnight console";
      if (focus) root.querySelector("h1").focus();
      return;
    }
    const ctx = this.context();
    this.view = make(ctx);
    this.view.mount(root);
    const heading = root.querySelector("h1");
    document.title = `${heading ? heading.textContent : section.label} · overnight console`;
    if (focus && heading) heading.focus();
    this.poll(this.generation);
  }

  markSection(section) {
    for (const a of document.querySelectorAll("#section-links a")) {
      if (section && a.dataset.section === section.id) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  stopView() {
    this.generation += 1;
    clearTimeout(this.timer);
    this.timer = null;
    this.view = null;
  }

  /** Refresh the view now, then every POLL_MS while the tab is visible. */
  async poll(generation) {
    if (generation !== this.generation || !this.view) return;
    clearTimeout(this.timer);
    try {
      await this.view.refresh();
    } catch (err) {
      if (generation === this.generation) this.fail(err, "Could not refresh");
    }
    if (generation !== this.generation) return;
    if (!document.hidden) this.timer = setTimeout(() => this.poll(generation), POLL_MS);
  }

  /** What a view gets: the API, the live region, and the common error path. */
  context() {
    return {
      api: this.api,
      announce: (message) => this.announce(message),
      fail: (err, what) => this.fail(err, what),
    };
  }

  /** A refused key signs out; anything else is shown (and, being an alert, read out). */
  fail(err, what) {
    if (err instanceof ApiError && err.status === 401) {
      this.signOut(`The server no longer accepts this key (${err.message}). Sign in again.`);
      return;
    }
    $("notice").textContent = what ? `${what}: ${err.message}` : err.message;
  }

  announce(message) {
    // Cleared first, then filled a moment later, so the same words twice are read
    // twice; messages arriving in between are read together.
    this.pending = (this.pending || []).concat(message);
    if (this.announceTimer) return;
    const region = $("announcer");
    region.textContent = "";
    this.announceTimer = setTimeout(() => {
      region.textContent = this.pending.join(" ");
      this.pending = [];
      this.announceTimer = null;
    }, 50);
  }
}

new Console().start();
