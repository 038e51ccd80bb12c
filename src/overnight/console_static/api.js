// The console's client for the server's OpenAI-compatible API (the same /v1/files
// and /v1/batches routes the SDK calls) and for overnight's own console API
// (/api/v1: jobs, the file proxy, the catalog), with the key as a Bearer token.

/** An API failure: the HTTP status (0 when the server could not be reached) and
 * the server's OpenAI-shaped error message, param and code. */
export class ApiError extends Error {
  constructor(status, message, {param = null, code = null} = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

/** A key an HTTP header can carry (fetch refuses anything else). */
export function isHeaderSafe(key) {
  return /^[\x21-\x7e]+$/.test(key);
}

// Relative to the page (/console/), so a server mounted under a path prefix works too.
// "v1" is the OpenAI-compatible API, "console" the job API beside it.
const BASES = {v1: "../v1/", console: "../api/v1/"};
function apiUrl(path, base = "v1") {
  return new URL(`${BASES[base]}${path}`, document.baseURI);
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  /** One call; JSON back unless raw (then the Response). */
  async request(method, path, {json, form, raw = false, signal, base = "v1"} = {}) {
    const headers = {Authorization: `Bearer ${this.key}`};
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser sets the multipart boundary
    }
    let res;
    try {
      res = await fetch(apiUrl(path, base), {method, headers, body, cache: "no-store", signal});
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError(0, "The server could not be reached. Check that it is running.");
    }
    if (!res.ok) {
      let message = `The server answered ${res.status} ${res.statusText}`.trim() + ".";
      let detail = {};
      try {
        const payload = await res.json();
        if (payload && payload.error) {
          message = payload.error.message || message;
          detail = {param: payload.error.param ?? null, code: payload.error.code ?? null};
        }
      } catch {
        // not JSON: keep the status line
      }
      throw new ApiError(res.status, message, detail);
    }
    return raw ? res : res.json();
  }

  listBatches({limit = 20, after} = {}) {
    const q = new URLSearchParams({limit: String(limit)});
    if (after) q.set("after", after);
    return this.request("GET", `batches?${q}`);
  }

  getBatch(id) {
    return this.request("GET", `batches/${encodeURIComponent(id)}`);
  }

  createBatch(body) {
    return this.request("POST", "batches", {json: body});
  }

  cancelBatch(id) {
    return this.request("POST", `batches/${encodeURIComponent(id)}/cancel`);
  }

  uploadFile(file, purpose) {
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    return this.request("POST", "files", {form});
  }

  getFile(id) {
    return this.request("GET", `files/${encodeURIComponent(id)}`);
  }

  deleteFile(id) {
    return this.request("DELETE", `files/${encodeURIComponent(id)}`);
  }

  /** The file's bytes as a Blob (a plain link could not carry the key). */
  async fileBlob(id) {
    const res = await this.request("GET", `files/${encodeURIComponent(id)}/content`, {raw: true});
    return res.blob();
  }

  listModels() {
    return this.request("GET", "models");
  }

  // -- console jobs (/api/v1) -----------------------------------------------------------

  /** Whether this server has the job API (a server with OVERNIGHT_CONSOLE=false answers 404). */
  async hasJobs() {
    try {
      await this.listJobs({limit: 1});
      return true;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return false;
      if (err instanceof ApiError && err.status === 401) throw err;
      return true; // another failure says nothing about the API: the section shows it
    }
  }

  listJobs({limit = 20, after} = {}) {
    const q = new URLSearchParams({limit: String(limit)});
    if (after) q.set("after", after);
    return this.request("GET", `jobs?${q}`, {base: "console"});
  }

  getJob(id) {
    return this.request("GET", `jobs/${encodeURIComponent(id)}`, {base: "console"});
  }

  createJob(body) {
    return this.request("POST", "jobs", {json: body, base: "console"});
  }

  cancelJob(id) {
    return this.request("POST", `jobs/${encodeURIComponent(id)}/cancel`, {base: "console"});
  }

  /** An input dataset through the console's file proxy (where a job's files live). */
  uploadDataset(file) {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file, file.name);
    return this.request("POST", "files/upload", {form, base: "console"});
  }

  /** A job's dataset (input, output or errors) as a Blob, through the file proxy. */
  async datasetBlob(id) {
    const res = await this.request("GET", `files/${encodeURIComponent(id)}/content`, {raw: true, base: "console"});
    return res.blob();
  }

  /** GPU types, regions and prices per configured provider. */
  catalog() {
    return this.request("GET", "catalog", {base: "console"});
  }
}
