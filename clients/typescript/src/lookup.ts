// 一键查卡 from TypeScript: verify a person, run one lookup with live progress, print the masked report.
//
//   npx tsx src/lookup.ts --name 张伟 --id 310104198503129915 --mobile 13917285036 \
//     --sms-outbox ../../data/demo/union/sms-outbox.jsonl [--target 127.0.0.1:50051] [--json]
//
// The union speaks plain gRPC over HTTP/2 (not the Connect protocol), so this uses
// @connectrpc/connect-node's createGrpcTransport. Stubs come from ../../protos (src/gen, `npm run generate`).

import { randomUUID } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { createInterface } from "node:readline/promises";
import { parseArgs } from "node:util";

import { fromBinary, toJson } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { DurationSchema, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import {
  BankOutcome,
  CardLookupService,
  CardStatus,
  CardType,
  type Lookup,
  type Report,
  ReportSchema,
} from "./gen/cardlookup/v1/card_lookup_service_pb.js";
import { IdentityService } from "./gen/cardlookup/v1/identity_service_pb.js";

/** The version of the union's terms this client shows; CreateLookup needs the person's consent to it. */
export const TERMS_VERSION = "2021-12";
const TERMS =
  `Terms ${TERMS_VERSION}: to find the cards in your name, the card union sends your name and resident ` +
  "ID number to the banks you ask; it keeps only a masked report (first 4 and last 4 digits) for 7 days.";

const USAGE = `usage: lookup --name NAME --id RESIDENT_ID --mobile MOBILE [--sms-outbox PATH]
              [--bank CODE ...] [--agree-terms] [--target HOST:PORT] [--timeout SECONDS] [--json]

  --target      union address (default: $CARDLOOKUP_TARGET or 127.0.0.1:50051), plaintext gRPC
  --name, --id, --mobile
                the person (default: $CARDLOOKUP_NAME, $CARDLOOKUP_ID, $CARDLOOKUP_MOBILE)
  --sms-outbox  development SMS outbox (JSON lines {"time","to","text"}) to read the one-time code
                from (default: $CARDLOOKUP_SMS_OUTBOX); without it the code is asked for on stdin
  --bank        ask only this bank (repeatable; default: every bank)
  --agree-terms accept the union's terms (${TERMS_VERSION}); without it they are shown and asked on stdin
  --timeout     seconds to wait for the report (default 120)
  --json        print the final report as proto3 JSON on stdout (progress goes to stderr)`;

/** A failure that is not an RPC status: bad arguments, no one-time code. */
class UsageError extends Error {}

interface Options {
  target: string;
  name: string;
  id: string;
  mobile: string;
  smsOutbox: string | undefined;
  timeoutMs: number;
  json: boolean;
  banks: string[];
  agreeTerms: boolean;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: "string" },
      name: { type: "string" },
      id: { type: "string" },
      mobile: { type: "string" },
      "sms-outbox": { type: "string" },
      timeout: { type: "string" },
      json: { type: "boolean", default: false },
      bank: { type: "string", multiple: true },
      "agree-terms": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  const env = process.env;
  const name = values.name ?? env.CARDLOOKUP_NAME;
  const id = values.id ?? env.CARDLOOKUP_ID;
  const mobile = values.mobile ?? env.CARDLOOKUP_MOBILE;
  if (!name || !id || !mobile) {
    throw new UsageError("--name, --id and --mobile are required (or CARDLOOKUP_NAME/_ID/_MOBILE)");
  }
  const timeout = Number(values.timeout ?? "120");
  if (!Number.isFinite(timeout) || timeout <= 0) {
    throw new UsageError(`--timeout must be a positive number of seconds, not ${values.timeout}`);
  }
  return {
    target: values.target ?? env.CARDLOOKUP_TARGET ?? "127.0.0.1:50051",
    name,
    id,
    mobile,
    smsOutbox: values["sms-outbox"] ?? env.CARDLOOKUP_SMS_OUTBOX,
    timeoutMs: timeout * 1000,
    json: values.json ?? false,
    banks: values.bank ?? [],
    agreeTerms: values["agree-terms"] ?? false,
  };
}

// ---- the development SMS outbox --------------------------------------------------------------

function outboxLines(path: string): string[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8").split("\n").filter((line) => line.trim() !== "");
}

/** The 6-digit code in the newest outbox line to `mobile` written after line `since`. */
function codeFromOutbox(path: string, mobile: string, since: number): string | undefined {
  const lines = outboxLines(path);
  const fresh = lines.length >= since ? lines.slice(since) : lines; // the file was truncated
  for (const line of fresh.reverse()) {
    let entry: { to?: unknown; text?: unknown };
    try {
      entry = JSON.parse(line) as { to?: unknown; text?: unknown };
    } catch {
      continue;
    }
    if (entry.to === mobile && typeof entry.text === "string") {
      return /(?<!\d)\d{6}(?!\d)/.exec(entry.text)?.[0];
    }
  }
  return undefined;
}

async function waitForCode(path: string, mobile: string, since: number): Promise<string> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const code = codeFromOutbox(path, mobile, since);
    if (code !== undefined) return code;
    if (Date.now() > deadline) {
      throw new UsageError(`no one-time code for ${mobile} appeared in ${path}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function askForConsent(): Promise<boolean> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = (await rl.question(`${TERMS}\nDo you accept these terms? [y/N] `)).trim().toLowerCase();
    return answer === "y" || answer === "yes";
  } finally {
    rl.close();
  }
}

async function askForCode(maskedMobile: string): Promise<string> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    return (await rl.question(`one-time code sent to ${maskedMobile}: `)).trim();
  } finally {
    rl.close();
  }
}

// ---- printing ---------------------------------------------------------------------------------

const lower = (name: string | undefined): string => (name ?? "unspecified").toLowerCase();
const outcomeName = (outcome: BankOutcome): string => lower(BankOutcome[outcome]).replace("_", " ");
const cardTypeName = (type: CardType): string =>
  ({ [CardType.DEBIT]: "借记卡 debit", [CardType.CREDIT]: "信用卡 credit" })[type as number] ?? "unspecified";
const statusName = (status: CardStatus): string =>
  ({ [CardStatus.DORMANT]: "dormant 久悬", [CardStatus.FROZEN]: "frozen 冻结" })[status as number] ??
  lower(CardStatus[status]);

/** Pads to a display width, counting CJK characters as two columns. */
function pad(text: string, width: number, right = false): string {
  const columns = [...text].reduce((sum, ch) => sum + (/[\u1100-\uffe6]/.test(ch) && ch !== "…" ? 2 : 1), 0);
  const fill = " ".repeat(Math.max(0, width - columns));
  return right ? fill + text : text + fill;
}

function eventLine(lookup: Lookup, bankCode: string, reportReady: boolean): string {
  if (reportReady) return `report ready: ${lookup.report}`;
  if (bankCode === "") {
    const done = lookup.bankProgress.filter((p) => p.outcome !== BankOutcome.PENDING).length;
    return `${lookup.name}: ${done}/${lookup.bankProgress.length} banks finished`;
  }
  const progress = lookup.bankProgress.find((p) => p.bankCode === bankCode);
  if (!progress) return `${bankCode}: changed`;
  const reason = progress.failureReason ? ` (${progress.failureReason})` : "";
  return `${pad(bankCode, 6)} ${pad(outcomeName(progress.outcome), 12)} ${progress.cardCount} cards${reason}`;
}

function printReport(report: Report): void {
  const out: string[] = [`一键查卡 report ${report.name}`];
  out.push(`${pad("Bank", 28)} ${pad("Debit 借记卡", 12, true)} ${pad("Credit 信用卡", 13, true)}  Outcome`);
  for (const s of report.bankSummaries) {
    out.push(
      `${pad(`${s.bankName} (${s.bankCode})`, 28)} ${pad(String(s.debitCardCount), 12, true)} ` +
        `${pad(String(s.creditCardCount), 13, true)}  ${outcomeName(s.outcome)}`,
    );
  }
  const expires = report.expireTime ? ` · expires ${timestampDate(report.expireTime).toISOString()}` : "";
  out.push(
    `${report.totalCardCount} cards: ${report.totalDebitCardCount} debit, ` +
      `${report.totalCreditCardCount} credit${expires}`,
  );
  if (report.cards.length > 0) {
    out.push(`${pad("Bank", 14)} ${pad("Type", 14)} ${pad("Number", 24)} Status`);
    for (const card of report.cards) {
      out.push(
        `${pad(card.bankName || card.bankCode, 14)} ${pad(cardTypeName(card.cardType), 14)} ` +
          `${pad(card.maskedNumber, 24)} ${statusName(card.status)}`,
      );
    }
  }
  process.stdout.write(out.join("\n") + "\n");
}

// ---- the flow -----------------------------------------------------------------------------------

async function run(options: Options): Promise<void> {
  const transport = createGrpcTransport({ baseUrl: `http://${options.target}` });
  const identity = createClient(IdentityService, transport);
  const lookups = createClient(CardLookupService, transport);
  const progress = (line: string): void => {
    (options.json ? process.stderr : process.stdout).write(line + "\n");
  };
  const unary = { timeoutMs: 15_000 };

  // 1. Real-name verification; the one-time code goes to the SMS outbox, never into the answer.
  const outboxBefore = options.smsOutbox ? outboxLines(options.smsOutbox).length : 0;
  const started = await identity.startVerification(
    { name: options.name, residentIdNumber: options.id, mobileNumber: options.mobile },
    unary,
  );
  const code = options.smsOutbox
    ? await waitForCode(options.smsOutbox, options.mobile, outboxBefore)
    : await askForCode(started.maskedMobileNumber);
  const verified = await identity.completeVerification(
    { verificationId: started.verificationId, code },
    unary,
  );
  progress(`verified (region ${verified.regionCode}); code sent to ${started.maskedMobileNumber}`);
  const auth = { headers: { authorization: `Bearer ${verified.sessionToken}` } };

  // 2. The lookup, its live progress, the report.
  // The person's consent comes before any of their data goes to a bank.
  if (!options.agreeTerms && !(await askForConsent())) {
    throw new UsageError("the lookup needs your acceptance of the terms (--agree-terms)");
  }
  const created = await lookups.createLookup(
    { requestId: randomUUID(), bankCodes: options.banks, consentTermsVersion: TERMS_VERSION },
    { ...auth, ...unary },
  );
  const lookupName = created.lookup?.name ?? "";
  let reportName = "";
  let first = true;
  for await (const event of lookups.watchLookup({ name: lookupName }, { ...auth, timeoutMs: options.timeoutMs })) {
    // A lookup whose banks all answered before the watch began has no changes left to show:
    // show where each bank ended instead.
    if (first && event.reportReady && event.lookup) {
      for (const bank of event.lookup.bankProgress) progress(eventLine(event.lookup, bank.bankCode, false));
    }
    first = false;
    if (event.lookup) progress(eventLine(event.lookup, event.bankCode, event.reportReady));
    if (event.reportReady) reportName = event.lookup?.report ?? "";
  }
  if (!reportName) throw new ConnectError("the progress stream ended without a report", Code.Unknown);
  const { report } = await lookups.getReport({ name: reportName }, { ...auth, ...unary });
  if (!report) throw new ConnectError(`GetReport answered without a report for ${reportName}`, Code.Unknown);

  if (options.json) {
    process.stdout.write(JSON.stringify(toJson(ReportSchema, report, { alwaysEmitImplicit: true }), null, 2) + "\n");
  } else {
    printReport(report);
  }
}

/** Same exit codes as the Python `cardlookup` CLI. */
function exitCodeFor(code: Code): number {
  switch (code) {
    case Code.InvalidArgument:
      return 2;
    case Code.NotFound:
      return 3;
    case Code.Unauthenticated:
    case Code.PermissionDenied:
      return 4;
    case Code.FailedPrecondition:
      return 5;
    case Code.ResourceExhausted:
      return 6;
    case Code.Unavailable:
    case Code.DeadlineExceeded:
      return 7;
    default:
      return 1;
  }
}

/** "ResourceExhausted" → "RESOURCE_EXHAUSTED", the gRPC spelling. */
const grpcCodeName = (code: Code): string => Code[code].replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();

/** google.rpc.RetryInfo's retry_delay, in seconds, if the error carries one (decoded by hand:
 *  it is one Duration field, and the google.rpc protos are not part of this repository's contracts). */
function retryAfterSeconds(error: ConnectError): number | undefined {
  for (const detail of error.details) {
    if (!("type" in detail) || detail.type !== "google.rpc.RetryInfo") continue;
    const reader = new BinaryReader(detail.value);
    while (reader.pos < reader.len) {
      const [field, wireType] = reader.tag();
      if (field === 1 && wireType === WireType.LengthDelimited) {
        return Number(fromBinary(DurationSchema, reader.bytes()).seconds);
      }
      reader.skip(wireType);
    }
  }
  return undefined;
}

/** 90061 → "1d 1h", like the Python CLI. */
function human(seconds: number): string {
  const s = Math.floor(seconds);
  if (s >= 86400) return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${s}s`;
}

async function main(): Promise<number> {
  try {
    await run(parseOptions(process.argv.slice(2)));
    return 0;
  } catch (error) {
    if (error instanceof ConnectError) {
      const retry = retryAfterSeconds(error);
      const hint = retry === undefined ? "" : ` — retry in ${human(retry)}`;
      process.stderr.write(`error: ${grpcCodeName(error.code)}: ${error.rawMessage}${hint}\n`);
      return exitCodeFor(error.code);
    }
    if (error instanceof UsageError || (error instanceof TypeError && "code" in error)) {
      process.stderr.write(`error: ${error.message} (see --help)\n`);
      return 2;
    }
    process.stderr.write(`error: ${error instanceof Error ? error.message : String(error)}\n`);
    return 1;
  }
}

process.exitCode = await main();
