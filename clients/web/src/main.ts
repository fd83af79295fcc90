// 一键查卡 for the person: verify, look up with live per-bank progress, read the masked report, close or
// flag a card, see the activity on their data. It calls the union's Connect port (the page's own
// origin) with the cardlookup.v1 stubs of clients/typescript.
//
// The session token lives in this module only: no localStorage, sessionStorage or cookie, so a
// reload or a closed tab ends the session. Everything shown is set with textContent, never as HTML.
// The policy numbers the page states (report retention, re-query cooldown) are the union's
// configuration, written into index.html as <meta> tags by the union (server/union/api/web.py).

import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";

import {
  CardActionService,
  CardClosureState,
  CardFlagState,
  type AuditEvent,
  type CardClosureItem,
  type CardFlag,
} from "../../typescript/src/gen/cardlookup/v1/card_action_service_pb.js";
import {
  BankOutcome,
  CardLookupService,
  CardStatus,
  CardType,
  UnaskedReason,
  type BankProgress,
  type BankSummary,
  type Lookup,
  type Report,
  type ReportCard,
  type UnaskedBank,
} from "../../typescript/src/gen/cardlookup/v1/card_lookup_service_pb.js";
import { IdentityService } from "../../typescript/src/gen/cardlookup/v1/identity_service_pb.js";
import { WORDS, type Lang, type Words } from "./i18n.js";

// ---- state (memory only) ----------------------------------------------------------------------

let lang: Lang = "zh"; // zh-CN first: the people this is for; English on request
let token: string | null = null;
let rerender: () => void = () => {};
const w = (): Words => WORDS[lang];
const locale = (): string => (lang === "zh" ? "zh-CN" : "en-GB");

/** The version of the union's terms this page shows; CreateLookup needs the person's consent to it. */
const TERMS_VERSION = "2021-12";

/**
 * The union strips spaces, dashes, a +86 or 0086 prefix and full-width forms from what is typed
 * (server/common/normalize.py) and checks the rest, so the fields take what people paste, such
 * as "+86 139-1728-5036"; the bound only stops a runaway paste.
 */
const TYPED_MAX_CHARS = "32";

/** A number the union wrote into index.html, or null: the page then states none rather than a wrong one. */
function configured(name: string): number | null {
  const content = document.querySelector(`meta[name="${name}"]`)?.getAttribute("content") ?? "";
  const value = Number(content);
  return content.trim() !== "" && Number.isFinite(value) && value >= 0 ? value : null;
}
const REPORT_DAYS = configured("cardlookup-report-days");
const REQUERY_COOLDOWN_HOURS = configured("cardlookup-requery-cooldown-hours");

/** How long a report is kept, in the person's words, if the union said. */
function reportKept(): string | null {
  return REPORT_DAYS !== null && Number.isInteger(REPORT_DAYS) && REPORT_DAYS > 0 ? w().days(REPORT_DAYS) : null;
}

/** How long a bank that answered is not asked again, in whole days when it is some, else hours. */
function requeryCooldown(): string | null {
  if (REQUERY_COOLDOWN_HOURS === null || REQUERY_COOLDOWN_HOURS === 0) return null;
  const days = REQUERY_COOLDOWN_HOURS / 24;
  return Number.isInteger(days) ? w().days(days) : w().hours(REQUERY_COOLDOWN_HOURS);
}

const withSession: Interceptor = (next) => async (request) => {
  if (token !== null) request.header.set("authorization", `Bearer ${token}`);
  return await next(request);
};
const transport = createConnectTransport({ baseUrl: window.location.origin, interceptors: [withSession] });
const identity = createClient(IdentityService, transport);
const lookups = createClient(CardLookupService, transport);
const actions = createClient(CardActionService, transport);

// ---- DOM helpers --------------------------------------------------------------------------------

type Child = Node | string | null | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Record<string, string> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) element.setAttribute(key, value);
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return element;
}

function button(label: string, className: string, onClick: () => void | Promise<void>, testId?: string): HTMLButtonElement {
  const b = h("button", { type: "button", class: className, ...(testId ? { "data-testid": testId } : {}) }, label);
  b.addEventListener("click", () => {
    void onClick();
  });
  return b;
}

function show(...nodes: Child[]): void {
  const app = document.getElementById("app")!;
  app.replaceChildren(...nodes.filter((n): n is Node | string => n !== null && n !== undefined && n !== false));
}

function when(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toLocaleString(locale(), { dateStyle: "medium", timeStyle: "short" }) : "";
}

/** A ConnectError in the person's words: the reason (ErrorInfo), field rules (BadRequest) or the code. */
function explain(error: unknown): string {
  if (!(error instanceof ConnectError)) return w().unavailable;
  const lines: string[] = [];
  for (const detail of error.details) {
    if (!("type" in detail) || typeof detail.debug !== "object" || detail.debug === null) continue;
    const debug = detail.debug as Record<string, unknown>;
    if (detail.type === "google.rpc.ErrorInfo") {
      const reason = String(debug.reason ?? "");
      const metadata = (debug.metadata ?? {}) as Record<string, string>;
      if (reason === "WRONG_CODE" && metadata.attempts_left !== undefined) {
        lines.push(w().attemptsLeft(metadata.attempts_left));
      } else if (w().reasons[reason]) {
        lines.push(w().reasons[reason]!);
      }
    } else if (detail.type === "google.rpc.BadRequest") {
      const violations = (debug.fieldViolations ?? []) as { field?: string; description?: string }[];
      for (const v of violations) {
        const field = v.field ? (w().fields[v.field] ?? v.field) : "";
        lines.push(field ? `${field}: ${v.description ?? ""}` : (v.description ?? ""));
      }
    }
  }
  if (lines.length > 0) return lines.join(" ");
  if (error.code === Code.NotFound) return w().notFound;
  if (error.code === Code.Unavailable) return w().unavailable;
  return error.rawMessage;
}

function errorBox(error: unknown): HTMLElement {
  if (error instanceof ConnectError && error.code === Code.Unauthenticated) token = null;
  return h("div", { class: "error", role: "alert" }, explain(error));
}

function nav(): void {
  const bar = document.getElementById("nav")!;
  bar.replaceChildren(
    ...(token === null
      ? []
      : [
          button(w().navLookup, "link", () => lookupView(), "nav-lookup"),
          button(w().navActivity, "link", () => activityView(), "nav-activity"),
          button(w().navSignOut, "link", () => signOut(), "nav-signout"),
        ]),
  );
  document.getElementById("title")!.textContent = w().title;
  document.getElementById("lang")!.textContent = w().switchTo;
  document.getElementById("footer")!.textContent = w().privacy;
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.title = w().title;
}

function page(render: () => void): void {
  rerender = render;
  nav();
  render();
}

/**
 * Forgets the session here first, whatever happens next, then asks the union to revoke it, so the
 * token is refused from now on rather than at its expiry. The call carries the token explicitly:
 * the page no longer holds it.
 */
// Ends the watch of the lookup on screen; signing out calls it, so no stream outlives the session.
let stopFollowing: () => void = () => {};

async function signOut(): Promise<void> {
  const ending = token;
  token = null;
  stopFollowing();
  verifyView();
  if (ending === null) return;
  try {
    await identity.signOut({}, { headers: { authorization: `Bearer ${ending}` } });
  } catch {
    // Signed out here all the same; the union ends the session at its expiry.
  }
}

// ---- verification -------------------------------------------------------------------------------

function field(label: string, name: string, attrs: Record<string, string> = {}): [HTMLElement, HTMLInputElement] {
  const input = h("input", { id: name, name, autocomplete: "off", ...attrs });
  return [h("div", {}, h("label", { for: name }, label), input), input];
}

function verifyView(): void {
  page(() => {
    const [nameRow, name] = field(w().name, "name", { autocomplete: "name" });
    const [idRow, id] = field(w().idNumber, "resident-id", { inputmode: "text", maxlength: TYPED_MAX_CHARS });
    const [mobileRow, mobile] = field(w().mobile, "mobile", { inputmode: "tel", maxlength: TYPED_MAX_CHARS });
    const status = h("div", {});
    const send = button(w().sendCode, "primary", async () => {
      send.disabled = true;
      status.replaceChildren();
      try {
        const started = await identity.startVerification({
          name: name.value.trim(),
          residentIdNumber: id.value.trim().toUpperCase(),
          mobileNumber: mobile.value.trim(),
        });
        // The page keeps no copy of what was typed once the union has it.
        name.value = id.value = mobile.value = "";
        codeView(started.verificationId, started.maskedMobileNumber, when(started.codeExpireTime));
      } catch (error) {
        status.replaceChildren(errorBox(error));
        send.disabled = false;
      }
    }, "send-code");
    show(
      h("section", { class: "panel" }, h("h2", {}, w().verifyTitle), h("p", { class: "muted" }, w().verifyIntro),
        nameRow, idRow, mobileRow, send, status),
    );
  });
}

function codeView(verificationId: string, maskedMobile: string, until: string): void {
  page(() => {
    const [codeRow, code] = field(w().code, "code", { inputmode: "numeric", maxlength: "6", autocomplete: "one-time-code" });
    const status = h("div", {});
    const verify = button(w().verify, "primary", async () => {
      verify.disabled = true;
      status.replaceChildren();
      try {
        const done = await identity.completeVerification({ verificationId, code: code.value.trim() });
        token = done.sessionToken;
        lookupView();
      } catch (error) {
        status.replaceChildren(errorBox(error));
        verify.disabled = false;
        code.value = "";
      }
    }, "verify");
    show(
      h("section", { class: "panel" }, h("h2", {}, w().verifyTitle),
        h("p", { class: "notice", "data-testid": "code-sent" }, w().codeSentTo(maskedMobile, until)),
        codeRow, verify, status, button(w().startOver, "link", () => verifyView())),
    );
  });
}

// ---- the lookup ---------------------------------------------------------------------------------

function lookupView(notice?: string): void {
  page(() => {
    const reports = h("div", {});
    const status = h("div", {});
    const [terms, start] = consentedLookup(w().startLookup, [], status, "agree-terms", "start-lookup");
    show(
      notice ? h("div", { class: "notice" }, notice) : null,
      h("section", { class: "panel" }, h("h2", {}, w().lookupTitle),
        h("p", { class: "muted", "data-testid": "lookup-intro" }, w().lookupIntro(requeryCooldown())), terms, start, status),
      reports,
    );
    void lookups.listReports({ pageSize: 10 }).then(
      (answer) => {
        if (answer.reports.length === 0) return;
        reports.replaceChildren(
          h("section", { class: "panel" }, h("h3", {}, w().existingReports),
            ...answer.reports.map((r) =>
              h("div", { class: "card" }, h("div", { class: "top" },
                h("span", {}, `${w().generated(when(r.generateTime))} · ${w().total} ${r.totalCardCount}`),
                button(w().openReport, "secondary small", () => reportView(r.name)))))),
        );
      },
      () => undefined,
    );
  });
}

/**
 * The terms checkbox and the button that starts a lookup of `bankCodes` (none: every bank). The
 * person's consent to the terms comes before anything about them goes to a bank, for every lookup.
 */
function consentedLookup(
  label: string, bankCodes: string[], status: HTMLElement, agreeId: string, testId: string,
): [HTMLElement, HTMLButtonElement] {
  const agree = h("input", { type: "checkbox", id: agreeId, "data-testid": agreeId });
  const terms = h("label", { class: "terms", for: agreeId }, agree, " ", w().terms(TERMS_VERSION, reportKept()));
  const start = button(label, "primary", async () => {
    status.replaceChildren();
    if (!agree.checked) {
      status.replaceChildren(h("div", { class: "error", role: "alert" }, w().termsRequired));
      return;
    }
    start.disabled = true;
    try {
      const created = await lookups.createLookup({
        requestId: crypto.randomUUID(),
        bankCodes,
        consentTermsVersion: TERMS_VERSION,
      });
      progressView(created.lookup!);
    } catch (error) {
      status.replaceChildren(errorBox(error));
      start.disabled = false;
    }
  }, testId);
  return [terms, start];
}

function outcomeLabel(progress: BankProgress): [string, string] {
  switch (progress.outcome) {
    case BankOutcome.ANSWERED:
      return [`${w().answeredOutcome}`, "answered"];
    case BankOutcome.FAILED:
      return [w().failed, "failed"];
    case BankOutcome.NO_RESPONSE:
      return [w().noResponse, "no_response"];
    default:
      return [w().pending, "pending"];
  }
}

function progressView(initial: Lookup): void {
  const startedAt = performance.now();
  let lookup = initial;
  let finishedAt: number | null = null;
  const table = h("tbody", {});
  const summary = h("p", { "data-testid": "answered" });
  const bar = h("div", {});
  const elapsed = h("p", { class: "muted", "data-testid": "elapsed" });
  const status = h("div", {});
  const paint = (): void => {
    const done = lookup.bankProgress.filter((b) => b.outcome !== BankOutcome.PENDING).length;
    const all = lookup.bankProgress.length;
    summary.textContent = w().answered(done, all);
    bar.style.width = `${all ? (100 * done) / all : 0}%`;
    table.replaceChildren(
      ...lookup.bankProgress.map((b) => {
        const [label, kind] = outcomeLabel(b);
        return h("tr", { "data-bank": b.bankCode, "data-outcome": kind },
          h("td", {}, bankLabel(b.bankName, b.bankCode)),
          h("td", { class: `state-${kind}` }, label),
          h("td", { class: "num" }, b.outcome === BankOutcome.ANSWERED ? String(b.cardCount) : "–"));
      }),
    );
  };
  const tick = (): void => {
    const end = finishedAt ?? performance.now();
    elapsed.textContent = w().elapsed(((end - startedAt) / 1000).toFixed(1));
  };
  page(() => {
    show(
      h("section", { class: "panel" }, h("h2", {}, w().progressTitle), summary,
        h("div", { class: "progress" }, bar), elapsed,
        h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, w().bank), h("th", {}, w().status), h("th", { class: "num" }, w().cards))), table),
        status),
      unaskedSection(lookup.unaskedBanks),
    );
    paint();
    tick();
  });
  const timer = window.setInterval(tick, 100);
  const following = new AbortController();
  stopFollowing = () => {
    following.abort();
    window.clearInterval(timer);
  };
  const follow = async (): Promise<void> => {
    for (let attempt = 0; attempt < 5 && !following.signal.aborted; attempt++) {
      try {
        for await (const event of lookups.watchLookup({ name: lookup.name }, { signal: following.signal })) {
          if (event.lookup) lookup = event.lookup;
          paint();
          if (event.reportReady && lookup.report) {
            finishedAt = performance.now();
            tick();
            window.clearInterval(timer);
            await reportView(lookup.report);
            return;
          }
        }
      } catch (error) {
        if (following.signal.aborted) return;
        if (error instanceof ConnectError && error.code !== Code.Unavailable && error.code !== Code.Canceled) {
          status.replaceChildren(errorBox(error));
          window.clearInterval(timer);
          return;
        }
      }
      await new Promise((resolve) => window.setTimeout(resolve, 1000));
    }
    window.clearInterval(timer);
    if (following.signal.aborted) return;
    status.replaceChildren(h("div", { class: "error" }, w().unavailable));
  };
  void follow();
}

// ---- banks not asked, and when a bank can be asked again ---------------------------------------

function bankLabel(name: string, code: string): string {
  return lang === "zh" ? name : `${name} (${code})`;
}

function isoTime(ts: Timestamp): string {
  return timestampDate(ts).toISOString();
}

/** When `banks` can be asked again (one time for all of them), or nothing if the union did not say. */
function nextQuery(ts: Timestamp | undefined, banks: string[], later: (t: string) => string, now: string): HTMLElement | null {
  if (!ts) return null;
  const text = timestampDate(ts).getTime() <= Date.now() ? now : later(when(ts));
  return h("div", { class: "muted", "data-testid": "next-query", "data-banks": banks.join(","), "data-time": isoTime(ts) }, text);
}

/**
 * When the banks summed up in one line ("the other N banks hold no card") can be asked again. They
 * all answered this lookup, so they share one time ("these banks"); a lone bank, or each group
 * should their times differ, is named.
 */
function nextQueries(banks: BankSummary[]): (HTMLElement | null)[] {
  const byTime = new Map<string, BankSummary[]>();
  for (const bank of banks) {
    if (!bank.nextQueryTime) continue;
    const key = isoTime(bank.nextQueryTime);
    byTime.set(key, [...(byTime.get(key) ?? []), bank]);
  }
  return [...byTime.values()].map((group) => {
    const names = byTime.size === 1 && group.length > 1
      ? null
      : group.map((b) => bankLabel(b.bankName, b.bankCode)).join(w().listSeparator);
    return nextQuery(group[0]!.nextQueryTime, group.map((b) => b.bankCode),
      (t) => w().theseNextQueryAt(t, names), w().theseNextQueryNow(names));
  });
}

function unaskedReason(bank: UnaskedBank): string {
  switch (bank.reason) {
    case UnaskedReason.NOT_CHOSEN:
      return w().unaskedNotChosen;
    case UnaskedReason.BANK_DISABLED:
      return w().unaskedDisabled;
    case UnaskedReason.REQUERY_COOLDOWN:
      return w().unaskedCooldown(bank.nextQueryTime ? when(bank.nextQueryTime) : null);
    default:
      return w().unaskedOther;
  }
}

/** The participating banks a lookup did not ask, one line per reason (and time), with why. */
function unaskedSection(unasked: UnaskedBank[]): HTMLElement | null {
  if (unasked.length === 0) return null;
  const groups = new Map<string, UnaskedBank[]>();
  for (const bank of unasked) {
    const key = `${bank.reason} ${bank.nextQueryTime ? isoTime(bank.nextQueryTime) : ""}`;
    groups.set(key, [...(groups.get(key) ?? []), bank]);
  }
  return h("section", { class: "panel", "data-testid": "unasked-banks" },
    h("h3", {}, w().unaskedTitle(unasked.length)),
    h("ul", { class: "unasked" }, ...[...groups.values()].map((group) =>
      h("li", { "data-reason": UnaskedReason[group[0]!.reason] },
        h("div", { class: "reason" }, unaskedReason(group[0]!)),
        h("div", {}, ...group.flatMap((b, i) => [
          i > 0 ? w().listSeparator : null,
          h("span", { "data-bank": b.bankCode }, bankLabel(b.bankName, b.bankCode)),
        ]))))));
}

// ---- the report ---------------------------------------------------------------------------------

function cardType(card: ReportCard): HTMLElement {
  return card.cardType === CardType.CREDIT
    ? h("span", { class: "badge credit" }, w().credit)
    : h("span", { class: "badge debit" }, w().debit);
}

function cardStatus(card: ReportCard): string {
  switch (card.status) {
    case CardStatus.DORMANT:
      return w().cardDormant;
    case CardStatus.FROZEN:
      return w().cardFrozen;
    default:
      return w().cardActive;
  }
}

function closureAnswer(item: CardClosureItem): HTMLElement {
  const text = {
    [CardClosureState.CLOSED]: w().closureClosed,
    [CardClosureState.SCHEDULED]: w().closureScheduled,
    [CardClosureState.BRANCH_VISIT_REQUIRED]: w().closureBranch + item.reason,
    [CardClosureState.REJECTED]: w().closureRejected + item.reason,
    [CardClosureState.FAILED]: w().closureFailed,
    [CardClosureState.PENDING]: w().closurePending,
    [CardClosureState.UNSPECIFIED]: w().closurePending,
  }[item.state];
  return h("div", { class: "answer", "data-testid": "closure-answer", "data-state": CardClosureState[item.state] },
    text, item.ticketId ? h("div", { class: "muted" }, w().ticket(item.ticketId)) : null);
}

function flagAnswer(flag: CardFlag): HTMLElement {
  const text = {
    [CardFlagState.PENDING]: w().flagPending,
    [CardFlagState.FROZEN]: w().flagFrozen,
    [CardFlagState.FAILED]: w().flagFailed,
    [CardFlagState.UNSPECIFIED]: w().flagPending,
  }[flag.state];
  return h("div", { class: "answer", "data-testid": "flag-answer", "data-state": CardFlagState[flag.state] },
    text, flag.caseNumber ? h("div", {}, h("strong", { "data-testid": "case-number" }, w().caseNumber(flag.caseNumber))) : null);
}

async function closeCard(report: Report, card: ReportCard, area: HTMLElement, buttons: HTMLElement): Promise<void> {
  buttons.hidden = true;
  area.replaceChildren(h("div", { class: "answer" }, w().closing));
  try {
    let closure = (await actions.createCardClosure({ requestId: crypto.randomUUID(), report: report.name, cardRefs: [card.cardRef] })).closure!;
    for (let i = 0; i < 30 && closure.items.some((item) => item.state === CardClosureState.PENDING); i++) {
      area.replaceChildren(closureAnswer(closure.items[0]!));
      await new Promise((resolve) => window.setTimeout(resolve, 1000));
      closure = (await actions.getCardClosure({ name: closure.name })).closure!;
    }
    area.replaceChildren(closureAnswer(closure.items[0]!));
    // A closure the bank did not take can be asked for again; any other answer stands.
    buttons.hidden = closure.items[0]!.state !== CardClosureState.FAILED;
  } catch (error) {
    area.replaceChildren(errorBox(error));
    buttons.hidden = false;
  }
}

async function flagCard(report: Report, card: ReportCard, area: HTMLElement, flagButton: HTMLElement): Promise<void> {
  try {
    const answer = await actions.flagCardNotMine({ requestId: crypto.randomUUID(), report: report.name, cardRef: card.cardRef });
    flagButton.remove();
    area.replaceChildren(flagAnswer(answer.flag!));
  } catch (error) {
    area.replaceChildren(errorBox(error));
  }
}

function cardBlock(report: Report, card: ReportCard): HTMLElement {
  const area = h("div", {});
  if (card.closure) area.append(closureAnswer(card.closure));
  if (card.notMineFlag) area.append(flagAnswer(card.notMineFlag));
  const buttons = h("div", { class: "actions" });
  const flagButton = button(w().notMine, "danger small", () => flagCard(report, card, area, flagButton), "flag-card");
  buttons.append(
    button(w().close, "secondary small", () => closeCard(report, card, area, buttons), "close-card"),
    ...(card.notMineFlag ? [] : [flagButton]),
  );
  buttons.hidden = card.closure !== undefined && card.closure.state !== CardClosureState.FAILED;
  return h("div", { class: "card", "data-testid": "card", "data-bank": card.bankCode },
    h("div", { class: "top" }, h("strong", {}, card.bankName), cardType(card)),
    h("div", { class: "number", "data-testid": "masked-number" }, card.maskedNumber),
    h("div", { class: "muted" }, cardStatus(card)),
    buttons,
    area);
}

async function reportView(name: string): Promise<void> {
  let report: Report;
  try {
    report = (await lookups.getReport({ name })).report!;
  } catch (error) {
    lookupView();
    document.getElementById("app")!.prepend(errorBox(error));
    return;
  }
  page(() => {
    const listed = report.bankSummaries.filter(
      (b) => b.debitCardCount + b.creditCardCount > 0 || b.outcome !== BankOutcome.ANSWERED,
    );
    const unlisted = report.bankSummaries.length - listed.length;
    const remove = h("div", { class: "actions" });
    const askDelete = (): void => {
      remove.replaceChildren(
        button(w().confirmDelete, "danger", async () => {
          try {
            await lookups.deleteReport({ name: report.name });
            lookupView(w().deleted);
          } catch (error) {
            remove.append(errorBox(error));
          }
        }, "confirm-delete"),
        button(w().cancel, "link", () => remove.replaceChildren(button(w().deleteReport, "danger", askDelete, "delete-report"))),
      );
    };
    remove.replaceChildren(button(w().deleteReport, "danger", askDelete, "delete-report"));
    // Banks that failed or did not answer can be asked again at once (the others keep their cooldown).
    const unanswered = report.bankSummaries.filter(
      (b) => b.outcome === BankOutcome.FAILED || b.outcome === BankOutcome.NO_RESPONSE,
    );
    let again: HTMLElement | null = null;
    if (unanswered.length > 0) {
      const status = h("div", {});
      const [terms, start] = consentedLookup(
        w().askAgain, unanswered.map((b) => b.bankCode), status, "agree-terms-again", "ask-again",
      );
      again = h("section", { class: "panel", "data-testid": "ask-again-panel" },
        h("p", {}, w().askAgainIntro(unanswered.map((b) => b.bankName).join(w().listSeparator), requeryCooldown())),
        terms, start, status);
    }
    show(
      h("section", { class: "panel", "data-testid": "report" },
        h("h2", {}, w().reportTitle),
        h("p", { class: "muted", "data-testid": "generated", "data-time": report.generateTime ? isoTime(report.generateTime) : "" },
          w().generated(when(report.generateTime))),
        h("p", { "data-testid": "expiry" }, w().expires(when(report.expireTime))),
        h("div", { class: "totals" },
          h("div", {}, h("strong", { "data-testid": "total" }, String(report.totalCardCount)), w().total),
          h("div", {}, h("strong", { "data-testid": "total-debit" }, String(report.totalDebitCardCount)), w().debit),
          h("div", {}, h("strong", { "data-testid": "total-credit" }, String(report.totalCreditCardCount)), w().credit)),
        // "0 cards" from a lookup that asked one bank is not "no card anywhere": say so next to the totals.
        report.unaskedBanks.length > 0
          ? h("p", { class: "partial", "data-testid": "unasked-note" },
            w().unaskedNote(report.bankSummaries.length, report.unaskedBanks.length))
          : null),
      h("section", { class: "panel" }, h("h3", {}, w().perBank),
        listed.length === 0 ? null : h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, w().bank), h("th", { class: "num" }, w().debit), h("th", { class: "num" }, w().credit))),
          h("tbody", {}, ...listed.map((b) =>
            h("tr", { "data-bank": b.bankCode },
              h("td", {}, bankLabel(b.bankName, b.bankCode),
                b.outcome !== BankOutcome.ANSWERED ? h("div", { class: "state-failed" }, w().bankNotAnswered) : null,
                nextQuery(b.nextQueryTime, [b.bankCode], w().nextQueryAt, w().nextQueryNow)),
              h("td", { class: "num" }, String(b.debitCardCount)),
              h("td", { class: "num" }, String(b.creditCardCount)))))),
        unlisted > 0 ? h("p", { class: "muted" }, w().banksWithout(unlisted)) : null,
        ...nextQueries(report.bankSummaries.filter((b) => !listed.includes(b)))),
      unaskedSection(report.unaskedBanks),
      h("section", { class: "panel" }, h("h3", {}, w().cardList),
        report.cards.length === 0 ? h("p", {}, w().noCards) : null,
        ...report.cards.map((card) => cardBlock(report, card))),
      again,
      remove,
    );
  });
}

// ---- my activity --------------------------------------------------------------------------------

function activityView(): void {
  page(() => {
    const list = h("ul", { class: "events", "data-testid": "activity" });
    show(h("section", { class: "panel" }, h("h2", {}, w().activityTitle), h("p", { class: "muted" }, w().activityIntro), list));
    void actions.listMyAuditEvents({ pageSize: 50 }).then(
      (answer) => {
        if (answer.events.length === 0) list.replaceChildren(h("li", { class: "muted" }, w().noActivity));
        else list.replaceChildren(...answer.events.map((event) => eventItem(event)));
      },
      (error: unknown) => list.replaceChildren(errorBox(error)),
    );
  });
}

function eventItem(event: AuditEvent): HTMLElement {
  const outcome = event.outcome === "ok" ? w().outcomeOk : event.outcome;
  return h("li", { "data-action": event.action },
    h("div", {}, h("strong", {}, w().actions[event.action] ?? event.action), ` · ${outcome}`),
    h("div", { class: "muted" }, when(event.time), event.resource ? ` · ${event.resource}` : ""));
}

// ---- start --------------------------------------------------------------------------------------

document.getElementById("lang")!.addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  nav();
  rerender();
});
verifyView();
