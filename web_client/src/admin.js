// The directory administration tab (admins and site admins): search the clinicians and sites
// of the whole network (thousands: the server filters and pages, docs/protocol.md "The
// directory"), add, edit, deactivate and reactivate them, issue an activation or reset code,
// and see who is online. Everything goes through the HTTP API; what it refuses is said in words.
import { ProtocolRefusal } from "./protocol.js";
import { h, flash } from "./dom.js";
import { t, tf, getLanguage, specialtyName } from "./i18n.js";

const ROLES = ["referring", "specialist", "coordinator", "admin", "site_admin"];
const TIERS = ["central", "provincial", "district", "commune"];
const PER_PAGE = 25;

/** The words for a refusal of the directory API. */
function describe(error) {
  if (error instanceof ProtocolRefusal) {
    const known = { duplicate_id: "duplicateId", unknown_site: "unknownSite", role_not_grantable: "roleNotGrantable",
                    forbidden: "forbidden", not_found: "notFound" }[error.code];
    if (known) return t(known);
    if (error.code === "invalid_payload") return `${t("invalidInput")}: ${error.message}`;
    if (error.code === "unknown_clinician" || error.code === "token_expired") return t("sessionEnded");
  }
  console.warn("admin:", error && error.code, error && error.message);
  return t("unexpectedError");
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== "" && value !== undefined) q.set(key, value);
  return q.toString();
}

function select(id, options, value = "") {
  const el = h("select", { id }, options.map(([v, label]) => h("option", { value: v }, label)));
  el.value = value;
  return el;
}

/**
 * Render the tab into `panel`.
 * @param {HTMLElement} panel
 * @param {{signaling: import("./protocol.js").Signaling, me: any, roleName: (role: string) => string}} ctx
 */
export async function renderAdmin(panel, ctx) {
  const api = ctx.signaling;
  const isAdmin = ctx.me.roles.includes("admin");
  let regions = [];
  try {
    regions = (await api.http("/api/directory/regions")).regions;
  } catch (error) { flash(describe(error)); }
  // Each filter's "all" choice names the filter: the selects sit in a row without labels.
  const regionOptions = [["", `${t("region")}: ${t("all")}`], ...regions.map((r) => [r.id, r.name])];
  const activeOptions = [["", `${t("status")}: ${t("all")}`], ["true", t("activeOnly")], ["false", t("inactiveOnly")]];
  const notice = h("div", { id: "admin-notice", class: "admin-notice", role: "status" });

  // -- clinicians ----------------------------------------------------------------------------
  const cq = h("input", { id: "clinician-q", type: "search", placeholder: t("searchText"), maxlength: 100 });
  const csite = h("input", { id: "clinician-site", placeholder: t("site"), maxlength: 64, list: "admin-site-ids" });
  const crole = select("clinician-role", [["", `${t("role")}: ${t("all")}`], ...ROLES.map((r) => [r, ctx.roleName(r)])]);
  const cregion = select("clinician-region", regionOptions);
  const cactive = select("clinician-active", activeOptions);
  const crows = h("tbody", { id: "clinician-rows" });
  const cpager = h("div", { class: "pager", id: "clinician-pager" });
  const cform = h("div", { id: "clinician-form-box" });
  let cpage = 1;

  async function searchClinicians(page = 1) {
    cpage = page;
    try {
      const found = await api.http(`/api/directory/clinicians?${query({
        q: cq.value.trim(), site: csite.value.trim(), role: crole.value, region: cregion.value,
        active: cactive.value, page, per_page: PER_PAGE })}`);
      crows.replaceChildren(...found.clinicians.map(clinicianRow));
      if (!found.clinicians.length) crows.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" }, t("noResults"))));
      pager(cpager, found, searchClinicians);
    } catch (error) { flash(describe(error)); }
  }

  function clinicianRow(c) {
    return h("tr", { class: `clinician ${c.active ? "active" : "inactive"} ${c.online ? "online" : "offline"}`,
                     "data-clinician": c.id },
      h("td", {}, h("span", { class: "dot", title: c.online ? t("online") : t("offline") }),
        h("span", { class: "sr-only" }, c.online ? t("online") : t("offline"))),
      h("td", {}, h("strong", {}, c.name), h("br"), h("span", { class: "muted" }, c.id)),
      h("td", {}, c.site_name, h("br"), h("span", { class: "muted" }, c.region_name)),
      h("td", {}, c.roles.map(ctx.roleName).join(", "), c.specialties.length ? h("br") : null,
        h("span", { class: "muted" }, c.specialties.map(specialtyName).join(", "))),
      h("td", { class: "state" }, c.active ? t("activeState") : t("inactiveState")),
      h("td", { class: "actions" },
        h("button", { class: "small edit", onclick: () => clinicianForm(c) }, t("edit")),
        c.active
          ? h("button", { class: "small danger deactivate", onclick: () => setActive("clinicians", c, false) }, t("deactivate"))
          : h("button", { class: "small reactivate", onclick: () => setActive("clinicians", c, true) }, t("reactivate")),
        c.active ? h("button", { class: "small issue-code", onclick: () => issueCode(c) }, t("issueCode")) : null));
  }

  function clinicianForm(existing = null) {
    const id = h("input", { id: "cf-id", required: true, maxlength: 64, value: existing ? existing.id : "",
                            disabled: Boolean(existing) });
    const name = h("input", { id: "cf-name", required: true, maxlength: 200, value: existing ? existing.name : "" });
    const site = h("input", { id: "cf-site", required: true, maxlength: 64, list: "admin-site-ids",
                              value: existing ? existing.site_id : (isAdmin ? "" : ctx.me.site.id) });
    const grantable = isAdmin ? ROLES : ["referring", "specialist"];
    const boxes = grantable.map((role) => h("input", { type: "checkbox", value: role, class: "cf-role",
                                                       checked: existing ? existing.roles.includes(role) : false }));
    const specialties = h("input", { id: "cf-specialties", maxlength: 500,
                                     value: existing ? existing.specialties.join(", ") : "" });
    const form = h("form", { class: "card edit-form", id: "clinician-form" },
      h("h3", {}, existing ? `${t("edit")}: ${existing.name}` : `${t("add")}: ${t("clinicians")}`),
      h("label", {}, t("id"), id), h("label", {}, t("name"), name), h("label", {}, t("site"), site),
      h("fieldset", {}, h("legend", {}, t("role")),
        boxes.map((box) => h("label", { class: "inline" }, box, " ", ctx.roleName(box.value)))),
      h("label", {}, t("specialtiesField"), specialties),
      h("button", { class: "primary", type: "submit", id: "cf-save" }, t("save")), " ",
      h("button", { type: "button", onclick: () => cform.replaceChildren() }, t("close")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = {
        name: name.value.trim(), site: site.value.trim(),
        roles: boxes.filter((b) => b.checked).map((b) => b.value),
        specialties: specialties.value.split(",").map((s) => s.trim()).filter(Boolean),
      };
      try {
        if (existing) await api.send("PATCH", `/api/directory/clinicians/${encodeURIComponent(existing.id)}`, body);
        else await api.send("POST", "/api/directory/clinicians", { id: id.value.trim(), ...body });
        cform.replaceChildren();
        flash(t("saved"), "info");
        await searchClinicians(cpage);
      } catch (error) { flash(describe(error)); }
    });
    cform.replaceChildren(form);
    (existing ? name : id).focus();
  }

  /** The link is shown once, here: the server keeps only the code's hash. */
  async function issueCode(c) {
    try {
      const issued = await api.send("POST", `/api/accounts/${encodeURIComponent(c.id)}/activation`);
      const until = new Date(issued.expires_at * 1000).toLocaleString(getLanguage() === "vi" ? "vi-VN" : "en-GB");
      const link = h("input", { id: "activation-link", readonly: true, value: issued.link, class: "link-field" });
      const copy = h("button", { id: "activation-copy", class: "small", onclick: async () => {
        link.select();
        try { await navigator.clipboard.writeText(issued.link); } catch { document.execCommand("copy"); }
        copy.textContent = t("copied");
      } }, t("copy"));
      notice.replaceChildren(h("div", { class: "card activation", id: "activation-box" },
        h("p", {}, tf("activationLink", { id: `${c.name} (${c.id})`, time: until })),
        h("div", { class: "copy-row" }, link, copy),
        h("button", { class: "small", onclick: () => notice.replaceChildren() }, t("close"))));
      link.select();
    } catch (error) { flash(describe(error)); }
  }

  async function setActive(kind, item, active) {
    if (!active && !confirm(tf("confirmDeactivate", { name: `${item.name} (${item.id})` }))) return;
    try {
      await api.send("POST", `/api/directory/${kind}/${encodeURIComponent(item.id)}/${active ? "reactivate" : "deactivate"}`);
      flash(t("saved"), "info");
      if (kind === "clinicians") await searchClinicians(cpage); else await searchSites(spage);
    } catch (error) { flash(describe(error)); }
  }

  // -- sites ---------------------------------------------------------------------------------
  const sq = h("input", { id: "site-q", type: "search", placeholder: t("searchText"), maxlength: 100 });
  const sregion = select("site-region", regionOptions);
  const sactive = select("site-active", activeOptions);
  const srows = h("tbody", { id: "site-rows" });
  const spager = h("div", { class: "pager", id: "site-pager" });
  const sform = h("div", { id: "site-form-box" });
  const siteIds = h("datalist", { id: "admin-site-ids" });
  let spage = 1;

  async function searchSites(page = 1) {
    spage = page;
    try {
      const found = await api.http(`/api/directory/sites?${query({
        q: sq.value.trim(), region: sregion.value, active: sactive.value, page, per_page: PER_PAGE })}`);
      srows.replaceChildren(...found.sites.map((s) => h("tr", { class: `site ${s.active ? "active" : "inactive"}`, "data-site": s.id },
        h("td", {}, h("strong", {}, s.name), h("br"), h("span", { class: "muted" }, s.id)),
        h("td", {}, t(s.tier)), h("td", {}, s.region_name),
        h("td", { class: "state" }, s.active ? t("activeState") : t("inactiveState")),
        h("td", { class: "actions" }, isAdmin ? [
          h("button", { class: "small edit", onclick: () => siteForm(s) }, t("edit")),
          s.active
            ? h("button", { class: "small danger deactivate", onclick: () => setActive("sites", s, false) }, t("deactivate"))
            : h("button", { class: "small reactivate", onclick: () => setActive("sites", s, true) }, t("reactivate")),
        ] : null))));
      if (!found.sites.length) srows.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "muted" }, t("noResults"))));
      siteIds.replaceChildren(...found.sites.map((s) => h("option", { value: s.id }, s.name)));
      pager(spager, found, searchSites);
    } catch (error) { flash(describe(error)); }
  }

  function siteForm(existing = null) {
    const id = h("input", { id: "sf-id", required: true, maxlength: 64, value: existing ? existing.id : "",
                            disabled: Boolean(existing) });
    const name = h("input", { id: "sf-name", required: true, maxlength: 200, value: existing ? existing.name : "" });
    const tier = select("sf-tier", TIERS.map((x) => [x, t(x)]), existing ? existing.tier : "district");
    const region = select("sf-region", regions.map((r) => [r.id, `${r.name} (${r.id})`]), existing ? existing.region : "");
    const form = h("form", { class: "card edit-form", id: "site-form" },
      h("h3", {}, existing ? `${t("edit")}: ${existing.name}` : `${t("add")}: ${t("sites")}`),
      h("label", {}, t("id"), id), h("label", {}, t("name"), name),
      h("label", {}, t("tier"), tier), h("label", {}, t("region"), region),
      h("button", { class: "primary", type: "submit", id: "sf-save" }, t("save")), " ",
      h("button", { type: "button", onclick: () => sform.replaceChildren() }, t("close")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = { name: name.value.trim(), tier: tier.value, region: region.value };
      try {
        if (existing) await api.send("PATCH", `/api/directory/sites/${encodeURIComponent(existing.id)}`, body);
        else await api.send("POST", "/api/directory/sites", { id: id.value.trim(), ...body });
        sform.replaceChildren();
        flash(t("saved"), "info");
        await searchSites(spage);
      } catch (error) { flash(describe(error)); }
    });
    sform.replaceChildren(form);
    (existing ? name : id).focus();
  }

  // -- layout --------------------------------------------------------------------------------
  const onEnter = (run) => (event) => { if (event.key === "Enter") run(); };
  for (const el of [cq, csite]) el.addEventListener("keydown", onEnter(() => searchClinicians(1)));
  for (const el of [crole, cregion, cactive]) el.addEventListener("change", () => searchClinicians(1));
  sq.addEventListener("keydown", onEnter(() => searchSites(1)));
  for (const el of [sregion, sactive]) el.addEventListener("change", () => searchSites(1));

  panel.replaceChildren(notice, siteIds,
    h("section", { class: "card", id: "admin-clinicians" },
      h("h2", {}, t("clinicians")),
      h("div", { class: "filters" }, cq, csite, crole, cregion, cactive,
        h("button", { id: "clinician-search", class: "primary", onclick: () => searchClinicians(1) }, t("search")),
        h("button", { id: "clinician-add", onclick: () => clinicianForm() }, t("add"))),
      cform,
      h("table", { class: "directory" },
        h("thead", {}, h("tr", {}, ["", t("name"), t("site"), t("role"), t("status"), ""].map((x) => h("th", {}, x)))),
        crows),
      cpager),
    h("section", { class: "card", id: "admin-sites" },
      h("h2", {}, t("sites")),
      h("div", { class: "filters" }, sq, sregion, sactive,
        h("button", { id: "site-search", class: "primary", onclick: () => searchSites(1) }, t("search")),
        isAdmin ? h("button", { id: "site-add", onclick: () => siteForm() }, t("add")) : null),
      sform,
      h("table", { class: "directory" },
        h("thead", {}, h("tr", {}, [t("name"), t("tier"), t("region"), t("status"), ""].map((x) => h("th", {}, x)))),
        srows),
      spager));
  await Promise.all([searchClinicians(1), searchSites(1)]);
}

/** "Trang 2/7 · 160 kết quả" with the previous and next buttons. */
function pager(box, found, go) {
  box.replaceChildren(
    h("button", { class: "small prev", disabled: found.page <= 1, onclick: () => go(found.page - 1) }, t("prev")),
    h("span", { class: "page-info" }, ` ${t("page")} ${found.page}/${Math.max(1, found.pages)} · ${found.total} ${t("results")} `),
    h("button", { class: "small next", disabled: found.page >= found.pages, onclick: () => go(found.page + 1) }, t("next")));
}
