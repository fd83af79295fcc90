// 一键查卡 for the person: verify, look up with live per-bank progress, read the masked report, close or
// flag a card, see the activity on their data. It calls the union's Connect port (the page's own
// origin) with the cardlookup.v1 stubs of clients/typescript.
//
// The session token lives in this module only: no localStorage, sessionStorage or cookie, so a
// reload or a closed tab ends the session. Everything shown is set with textContent, never as HTML.

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
  type BankProgress,
  type Lookup,
  type Report,
  type ReportCard,
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

function signOut(): void {
  token = null;
  verifyView();
}

// ---- verification -------------------------------------------------------------------------------

function field(label: string, name: string, attrs: Record<string, string> = {}): [HTMLElement, HTMLInputElement] {
  const input = h("input", { id: name, name, autocomplete: "off", ...attrs });
  return [h("div", {}, h("label", { for: name }, label), input), input];
}

function verifyView(): void {
  page(() => {
    const [nameRow, name] = field(w().name, "name", { autocomplete: "name" });
    const [idRow, id] = field(w().idNumber, "resident-id", { inputmode: "text", maxlength: "18" });
    const [mobileRow, mobile] = field(w().mobile, "mobile", { inputmode: "tel", maxlength: "11" });
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
      h("section", { class: "panel" }, h("h2", {}, w().lookupTitle), h("p", { class: "muted" }, w().lookupIntro), terms, start, status),
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
  const terms = h("label", { class: "terms", for: agreeId }, agree, " ", w().terms(TERMS_VERSION));
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
          h("td", {}, lang === "zh" ? b.bankName : `${b.bankName} (${b.bankCode})`),
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
    );
    paint();
    tick();
  });
  const timer = window.setInterval(tick, 100);
  const follow = async (): Promise<void> => {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        for await (const event of lookups.watchLookup({ name: lookup.name })) {
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
        if (error instanceof ConnectError && error.code !== Code.Unavailable && error.code !== Code.Canceled) {
          status.replaceChildren(errorBox(error));
          window.clearInterval(timer);
          return;
        }
      }
      await new Promise((resolve) => window.setTimeout(resolve, 1000));
    }
    window.clearInterval(timer);
    status.replaceChildren(h("div", { class: "error" }, w().unavailable));
  };
  void follow();
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
        h("p", {}, w().askAgainIntro(unanswered.map((b) => b.bankName).join("、"))), terms, start, status);
    }
    show(
      h("section", { class: "panel", "data-testid": "report" },
        h("h2", {}, w().reportTitle),
        h("p", { class: "muted" }, w().generated(when(report.generateTime))),
        h("p", { "data-testid": "expiry" }, w().expires(when(report.expireTime))),
        h("div", { class: "totals" },
          h("div", {}, h("strong", { "data-testid": "total" }, String(report.totalCardCount)), w().total),
          h("div", {}, h("strong", { "data-testid": "total-debit" }, String(report.totalDebitCardCount)), w().debit),
          h("div", {}, h("strong", { "data-testid": "total-credit" }, String(report.totalCreditCardCount)), w().credit))),
      h("section", { class: "panel" }, h("h3", {}, w().perBank),
        h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, w().bank), h("th", { class: "num" }, w().debit), h("th", { class: "num" }, w().credit))),
          h("tbody", {}, ...listed.map((b) =>
            h("tr", { "data-bank": b.bankCode },
              h("td", {}, lang === "zh" ? b.bankName : `${b.bankName} (${b.bankCode})`,
                b.outcome !== BankOutcome.ANSWERED ? h("div", { class: "state-failed" }, w().bankNotAnswered) : null),
              h("td", { class: "num" }, String(b.debitCardCount)),
              h("td", { class: "num" }, String(b.creditCardCount)))))),
        unlisted > 0 ? h("p", { class: "muted" }, w().banksWithout(unlisted)) : null),
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
