// Renders openapi.json as a browsable reference: operations grouped by tag, parameters, request and
// response schemas ($ref resolved, nested levels expandable). No framework, no other origin; text from
// the document is only ever inserted as text, never as HTML.
"use strict";

(function () {
  const METHODS = ["get", "post", "put", "patch", "delete"];
  const NESTED = ["properties", "items", "additionalProperties", "oneOf", "anyOf", "allOf",
    "if", "then", "else", "contentSchema"];
  let doc = null;

  function el(tag, cls, ...children) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  // Descriptions: `code` spans and links to this page's anchors; everything else is plain text.
  function prose(text, tag) {
    const node = el(tag || "p", "desc");
    for (const part of String(text).split(/(`[^`]*`|\[[^\]]+\]\(#[^)]*\))/)) {
      const link = /^\[([^\]]+)\]\((#[^)]*)\)$/.exec(part);
      if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) {
        node.append(el("code", null, part.slice(1, -1)));
      } else if (link) {
        const a = el("a", null, link[1]);
        a.href = anchor(link[2]);
        node.append(a);
      } else {
        node.append(part);
      }
    }
    return node;
  }

  function anchor(ref) {
    const name = ref.split("/").pop();
    return ref.startsWith("#/components/schemas/") ? "#schema-" + name : "#";
  }

  function resolve(obj) {
    let seen = 0;
    while (obj && typeof obj.$ref === "string" && seen++ < 20) {
      let target = doc;
      for (const raw of obj.$ref.replace(/^#\//, "").split("/")) {
        target = target ? target[raw.replace(/~1/g, "/").replace(/~0/g, "~")] : undefined;
      }
      obj = target;
    }
    return obj || {};
  }

  function refName(schema) {
    return schema && typeof schema.$ref === "string" ? schema.$ref.split("/").pop() : null;
  }

  function typeLabel(schema) {
    const name = refName(schema);
    if (name) return name;
    if (schema === true) return "any";
    if (schema === false) return "nothing";
    if ("const" in schema) return "= " + JSON.stringify(schema.const);
    if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
    const types = [].concat(schema.type || []);
    if (schema.items && types.includes("array")) {
      return types.map((t) => (t === "array" ? typeLabel(schema.items) + "[]" : t)).join(" | ");
    }
    if (types.length) return types.join(" | ");
    for (const key of ["oneOf", "anyOf"]) {
      if (schema[key]) return schema[key].map(typeLabel).join(" | ");
    }
    if (schema.allOf) return "all of";
    return schema.properties ? "object" : "any";
  }

  function constraints(schema) {
    const notes = [];
    const keys = ["format", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
      "pattern", "default", "contentMediaType"];
    for (const key of keys) {
      if (key in schema) notes.push(key + ": " + JSON.stringify(schema[key]));
    }
    if (schema.additionalProperties === false) notes.push("no other keys");
    if (schema.examples) notes.push("e.g. " + schema.examples.map((v) => JSON.stringify(v)).join(", "));
    return notes;
  }

  function children(schema) {
    const out = [];
    const required = schema.required || [];
    for (const [name, sub] of Object.entries(schema.properties || {})) {
      out.push([name, sub, required.includes(name)]);
    }
    const extra = schema.additionalProperties;
    if (extra && typeof extra === "object") out.push(["{any key}", extra, false]);
    if (schema.items && (refName(schema.items) || expandable(schema.items))) {
      out.push(["[item]", schema.items, false]);
    }
    for (const key of ["oneOf", "anyOf", "allOf"]) {
      (schema[key] || []).forEach((sub, i) => out.push([key + " #" + (i + 1), sub, false]));
    }
    for (const key of ["if", "then", "else"]) {
      if (schema[key]) out.push([key, schema[key], false]);
    }
    if (schema.contentSchema) out.push(["(JSON content)", schema.contentSchema, false]);
    return out;
  }

  function expandable(schema) {
    return Boolean(schema) && typeof schema === "object"
      && (Boolean(schema.$ref) || NESTED.some((k) => k in schema && (k !== "items" || expandable(schema.items))));
  }

  // One schema as a row (name, type, notes); its parts as nested rows in an expandable block.
  function schemaRow(name, schema, required, seen, open) {
    const ref = refName(schema);
    const resolved = resolve(schema);
    const row = el("span", "row",
      name ? el("span", "name", name) : null,
      el("span", "type", typeLabel(schema)),
      required ? el("span", "required", "required") : null);
    if (ref) {
      const link = el("a", "ref", "→");
      link.href = "#schema-" + ref;
      link.title = "Go to " + ref;
      row.append(link);
    }
    const notes = constraints(resolved);
    if (notes.length) row.append(el("span", "notes", notes.join(" · ")));
    const parts = [];
    if (resolved.description) parts.push(prose(resolved.description));
    if (!(ref && seen.has(ref))) {
      const inner = new Set(seen);
      if (ref) inner.add(ref);
      for (const [childName, sub, req] of children(resolved)) {
        parts.push(schemaRow(childName, sub, req, inner, false));
      }
    }
    if (!parts.length) return el("div", "leaf", row);
    const details = el("details", "schema", el("summary", null, row), el("div", "nested", ...parts));
    details.open = Boolean(open);
    return details;
  }

  function content(media) {
    const block = el("div", "content");
    for (const [type, entry] of Object.entries(media || {})) {
      block.append(el("div", "media", el("code", null, type)));
      if (entry.schema !== undefined) block.append(schemaRow(null, entry.schema, false, new Set(), true));
      if (entry.example !== undefined) {
        block.append(el("details", "example", el("summary", null, "Example"),
          el("pre", null, JSON.stringify(entry.example, null, 2))));
      }
    }
    return block;
  }

  function parameters(list) {
    const table = el("table", "params",
      el("thead", null, el("tr", null, el("th", null, "Name"), el("th", null, "In"),
        el("th", null, "Type"), el("th", null, "Description"))));
    const body = el("tbody");
    for (const raw of list) {
      const p = resolve(raw);
      body.append(el("tr", null,
        el("td", null, el("code", null, p.name), p.required ? el("span", "required", "required") : null),
        el("td", null, p.in),
        el("td", null, typeLabel(p.schema || {}), " ", constraints(resolve(p.schema || {})).join(" · ")),
        el("td", null, prose(p.description || ""))));
    }
    table.append(body);
    return table;
  }

  function responses(map) {
    const block = el("div", "responses");
    for (const [status, raw] of Object.entries(map || {})) {
      const r = resolve(raw);
      const parts = [prose(r.description || "")];
      const headers = Object.entries(r.headers || {});
      if (headers.length) {
        parts.push(el("div", "headers", el("span", "label", "Headers: "),
          ...headers.map(([name, h]) => {
            const header = resolve(h);
            const code = el("code", null, name);
            code.title = header.description || "";
            return el("span", "header", code, " ");
          })));
      }
      if (r.content) parts.push(content(r.content));
      const cls = "status s" + status.charAt(0);
      block.append(el("details", "response",
        el("summary", null, el("span", cls, status), " ", firstSentence(r.description || "")),
        el("div", "nested", ...parts)));
    }
    return block;
  }

  function firstSentence(text) {
    const plain = String(text).replace(/`/g, "");
    const end = plain.search(/[.:;](\s|$)/);
    return end > 0 ? plain.slice(0, end) : plain;
  }

  function needsKey(security) {
    return Array.isArray(security) && security.length > 0 && !security.some((s) => Object.keys(s).length === 0);
  }

  function operation(path, method, op, shared) {
    const keyed = needsKey(op.security === undefined ? doc.security : op.security);
    const summary = el("summary", null,
      el("span", "method m-" + method, method.toUpperCase()),
      el("code", "path", path),
      el("span", "summary", op.summary || ""),
      keyed ? el("span", "key", "key") : null);
    const parts = [];
    if (op.description) parts.push(prose(op.description));
    const params = [...(shared || []), ...(op.parameters || [])];
    if (params.length) parts.push(el("h4", null, "Parameters"), parameters(params));
    if (op.requestBody) {
      const rb = resolve(op.requestBody);
      parts.push(el("h4", null, "Request body" + (rb.required ? "" : " (optional)")), content(rb.content));
    }
    parts.push(el("h4", null, "Responses"), responses(op.responses));
    const details = el("details", "op", summary, el("div", "body", ...parts));
    details.id = "op-" + (op.operationId || method + path);
    details.dataset.search = [method, path, op.summary, (op.tags || []).join(" ")].join(" ").toLowerCase();
    return details;
  }

  function render() {
    document.title = doc.info.title + " API reference";
    document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
    document.getElementById("summary").textContent = doc.info.summary || doc.info.description || "";
    const groups = new Map((doc.tags || []).map((t) => [t.name, { tag: t, ops: [] }]));
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        if (!item[method]) continue;
        const name = (item[method].tags || ["Other"])[0];
        if (!groups.has(name)) groups.set(name, { tag: { name }, ops: [] });
        groups.get(name).ops.push(operation(path, method, item[method], item.parameters));
      }
    }
    const main = document.getElementById("content");
    const toc = document.getElementById("toc");
    main.replaceChildren();
    for (const { tag, ops } of groups.values()) {
      if (!ops.length) continue;
      const id = "tag-" + tag.name.replace(/\W+/g, "-");
      const link = el("a", null, tag.name);
      link.href = "#" + id;
      toc.append(link);
      const section = el("section", "tag", el("h2", null, tag.name));
      section.id = id;
      if (tag.description) section.append(prose(tag.description));
      section.append(...ops);
      main.append(section);
    }
    const schemas = el("section", "tag", el("h2", null, "Schemas"));
    schemas.id = "schemas";
    for (const [name, schema] of Object.entries((doc.components || {}).schemas || {})) {
      const row = schemaRow(name, schema, false, new Set([name]), false);
      row.id = "schema-" + name;
      schemas.append(row);
    }
    const link = el("a", null, "Schemas");
    link.href = "#schemas";
    toc.append(link);
    main.append(schemas);
    openTarget();
  }

  // Following a link to a schema opens it (and the blocks around it).
  function openTarget() {
    const target = location.hash && document.getElementById(location.hash.slice(1));
    for (let node = target; node; node = node.parentElement) {
      if (node.tagName === "DETAILS") node.open = true;
    }
    if (target) target.scrollIntoView();
  }

  function filter(query) {
    const q = query.trim().toLowerCase();
    for (const op of document.querySelectorAll("details.op")) op.hidden = Boolean(q) && !op.dataset.search.includes(q);
    for (const section of document.querySelectorAll("section.tag")) {
      const ops = section.querySelectorAll("details.op");
      section.hidden = ops.length > 0 && [...ops].every((op) => op.hidden);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("filter").addEventListener("input", (e) => filter(e.target.value));
    window.addEventListener("hashchange", openTarget);
    fetch("openapi.json", { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))))
      .then((data) => { doc = data; render(); })
      .catch((err) => {
        document.getElementById("content").replaceChildren(
          el("p", "error", "Could not load openapi.json: " + err.message));
      });
  });
})();
