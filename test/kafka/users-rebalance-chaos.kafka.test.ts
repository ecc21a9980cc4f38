/**
 * Rebalance chaos on the users processors' consumer group. The distributed shape (an api, two
 * gateways, users processors one per process) under a steady, paced load of sends from five
 * senders to four recipients (one connected and acking, one offline, one reconnecting every few
 * seconds on alternating gateways, one connected and never acking), plus a "pulse": every 2 s a
 * message to one user per partition, each connected, to time every partition's deliveries.
 *
 * Meanwhile the group churns, in at most 12 steps: a third and a fourth processor start (the
 * fourth while the third is restoring), one is stopped with SIGTERM, one killed with SIGKILL,
 * one is started and at once frozen (SIGSTOP) past the session timeout while it opens its tasks,
 * one running is frozen past the session timeout (evicted while it thinks it owns its tasks),
 * two stop at once, and the last starts while another is killed.
 *
 * Afterwards: every acknowledged message is in its recipient's inbox and its sender's exactly
 * once, seqs gapless from 1, in the order the sender could observe; every partition delivers a
 * new send within a bound; and the processes' logs are summed up (fences, revivals, errors,
 * warnings). TEST_LOG_DIR keeps the logs, CHAOS_REPORT=<file> writes the numbers as JSON.
 *
 * About 4 to 5 minutes (238 to 273 s measured alone). The users group ("users") and the chat
 * topics are shared by every deployment on the broker: run it alone, or its stall numbers
 * include the other deployments' rebalances (two copies at once stalled partitions 30 to 65 s).
 *
 * Written by a review helper (session 17): in eight runs, about 62,000 acknowledged messages
 * checked, nothing lost, duplicated or out of order; it found the failed offsets-only commits
 * (users-offsets-only-commit.kafka.test.ts).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { WebSocket } from 'ws';
import { partitionFor } from '../../log/partitioner.ts';
import { KafkaDeployment } from '../support/process.ts';
import { Client, register, type Frame } from '../support/chat-client.ts';
import { eventually } from '../support/log-helpers.ts';
import { orderViolations, ResilientSender } from '../support/resilient-sender.ts';

const PARTITIONS = 12;
const RATE_PER_SENDER = 8; // messages a second
const WINDOW = 8;
const PULSE_EVERY_MS = 2000;
/**
 * The longest a partition may go without delivering. The churn's worst stretch (a SIGTERM, a
 * SIGKILL and another SIGKILL within 7 s) costs two session timeouts (10 s each), the rebalances
 * and the restores of six tasks: 26 to 30 s measured. The bound is twice that, so that it finds
 * a partition left without a task, not a slow machine. CHAOS_STALL_MS sets it.
 */
const STALL_MS = Number(process.env.CHAOS_STALL_MS ?? 60_000);
const SESSION_TIMEOUT_MS = 10_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A device that keeps connecting for a while and going away, acking what it got. */
async function flap(
  urls: string[],
  token: string,
  until: () => boolean,
  seen: Frame[],
  stats: { connections: number; failures: number },
): Promise<void> {
  for (let i = 0; i < 200 && !until(); i++) {
    try {
      const client = await Client.open(urls[i % urls.length]!, token, 'phone');
      stats.connections++;
      await sleep(2500);
      const entries = client.entries();
      seen.push(...entries.map((f) => ({ ...f, connection: i })));
      const top = Math.max(0, ...entries.map((f) => f.seq as number));
      if (top > 0) client.send({ type: 'ack', upTo: top });
      await sleep(200);
      await client.close();
    } catch {
      stats.failures++;
    }
    await sleep(1500);
  }
}

interface LogLine {
  level?: number;
  time?: number;
  msg?: string;
  task?: string;
  tasks?: number[];
  err?: { message?: string };
  [k: string]: unknown;
}

function parseLog(output: string): LogLine[] {
  const lines: LogLine[] = [];
  for (const raw of output.split('\n')) {
    if (!raw.startsWith('{')) continue;
    try {
      lines.push(JSON.parse(raw) as LogLine);
    } catch {
      /* not a log line */
    }
  }
  return lines;
}

describe('users processors: rebalance chaos under load', function () {
  this.timeout(480_000);
  const deployment = new KafkaDeployment();
  const processes = deployment.processes;
  const run = randomBytes(3).toString('hex');
  const t0 = Date.now();
  const at = () => ((Date.now() - t0) / 1000).toFixed(1);
  const timeline: string[] = [];
  const note = (what: string) => {
    timeline.push(`${at()}s ${what}`);
    console.log(`      [${at()}s] ${what}`);
  };
  const frozen = new Set<string>();
  const gatewayEnv = { RATE_LIMIT_PER_S: '5000', REGISTRATIONS_PER_HOUR: '0' };
  // info: the runtime's "tasks assigned", "task revived", fences taken over are info lines.
  const processorEnv = { LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'info' };
  const startProcessor = (name: string) =>
    deployment.start(name, ['processor', 'users'], processorEnv);
  const signal = (name: string, sig: NodeJS.Signals) => {
    try {
      process.kill(-processes.get(name)!.child.pid!, sig);
    } catch {
      /* gone */
    }
  };

  after(async () => {
    // Nothing left frozen: a stopped process would never handle the SIGTERM.
    for (const name of frozen) signal(name, 'SIGCONT');
    for (const [name, p] of processes) {
      if (p.child.exitCode !== null || p.child.signalCode !== null) continue;
      const done = p.stop('SIGTERM');
      const timer = setTimeout(() => signal(name, 'SIGKILL'), 20_000);
      await done.catch(() => undefined);
      clearTimeout(timer);
    }
    await deployment.stopAll();
  });

  it('loses nothing acknowledged, delivers nothing twice, leaves no partition without its task', async () => {
    const [api, g1, g2] = await Promise.all([
      deployment.start('api', ['api'], gatewayEnv),
      deployment.start('g1', ['gateway'], gatewayEnv),
      deployment.start('g2', ['gateway'], gatewayEnv),
      startProcessor('u1'),
      startProcessor('u2'),
    ]);
    const urls = [g1!.url, g2!.url];
    note('api, g1, g2, u1, u2 started');

    // Accounts: five senders, four recipients, a prober and one pulse user per partition.
    const tokens = new Map<string, string>();
    const name = (u: string) => `${u}-${run}`;
    const senderNames = ['s1', 's2a', 's2b', 's3', 's4'].map(name);
    const [r1, r2, r3, r4] = ['r1', 'r2', 'r3', 'r4'].map(name) as [string, string, string, string];
    const prober = name('prober');
    const pulseUsers: string[] = [];
    for (let i = 0; pulseUsers.length < PARTITIONS && i < 500; i++) {
      const candidate = name(`q${i}`);
      const p = partitionFor(Buffer.from(candidate, 'utf8'), PARTITIONS);
      if (!pulseUsers.some((u) => partitionFor(Buffer.from(u, 'utf8'), PARTITIONS) === p))
        pulseUsers.push(candidate);
    }
    pulseUsers.sort(
      (a, b) => partitionFor(Buffer.from(a), PARTITIONS) - partitionFor(Buffer.from(b), PARTITIONS),
    );
    assert.equal(pulseUsers.length, PARTITIONS);
    const partitionOf = (u: string) => partitionFor(Buffer.from(u, 'utf8'), PARTITIONS);
    for (const u of [...senderNames, r1, r2, r3, r4, prober, ...pulseUsers])
      tokens.set(u, await register(api!.url, u));

    // Both gateways know every user once the accounts table has the registrations.
    for (const url of urls) {
      const probe = await Client.open(url, tokens.get(prober)!, 'probe');
      for (const u of [r1, r2, r3, r4, ...pulseUsers, ...senderNames])
        await eventually(
          async () => {
            const id = `known-${randomBytes(4).toString('hex')}`;
            probe.send({ type: 'typing', to: u, state: 'start' });
            probe.send({ type: 'send', id, to: u, body: { known: true } });
            const answer = await probe.next((f) => f.id === id);
            return answer.type === 'sent';
          },
          60_000,
          `${url} to know ${u}`,
        );
      await probe.close();
    }
    note('every gateway knows every user');

    // Devices: each inbox has a device that opened once and never acks, so its entries are kept
    // for the audit (a device connecting for the first time gets every kept entry).
    for (const u of [r1, r3]) await (await Client.open(g1!.url, tokens.get(u)!, 'tablet')).close();
    const r1Live = await Client.open(g1!.url, tokens.get(r1)!, 'phone');
    const r4Live = await Client.open(g2!.url, tokens.get(r4)!, 'phone');
    let r1Acked = 0;
    const r1Acker = setInterval(() => {
      const top = Math.max(0, ...r1Live.entries().map((f) => f.seq as number));
      if (top > r1Acked && r1Live.ws.readyState === WebSocket.OPEN) {
        r1Live.send({ type: 'ack', upTo: top });
        r1Acked = top;
      }
    }, 500);
    const pulseClients = new Map<string, Client>();
    for (const [i, u] of pulseUsers.entries())
      pulseClients.set(u, await Client.open(urls[i % 2]!, tokens.get(u)!, 'phone'));
    const proberClient = await Client.open(g1!.url, tokens.get(prober)!, 'laptop');

    // Pulse: every PULSE_EVERY_MS, one message to each partition's user.
    const pulseSentAt = new Map<string, number>(); // `${k}/${user}` → when `sent` came
    let pulseK = 0;
    let pulsing = true;
    const pulseLoop = (async () => {
      for (let k = 1; pulsing && k <= 400; k++) {
        pulseK = k;
        for (const u of pulseUsers)
          proberClient.send({ type: 'send', id: `pulse-${k}-${u}`, to: u, body: { pulse: k } });
        await sleep(PULSE_EVERY_MS);
      }
    })();
    const pulseAcks = () => {
      for (const f of proberClient.frames)
        if (f.type === 'sent' && typeof f.id === 'string' && f.id.startsWith('pulse-')) {
          const [, k, ...rest] = f.id.split('-');
          const key = `${k}/${rest.join('-')}`;
          if (!pulseSentAt.has(key)) pulseSentAt.set(key, (f.at as number) ?? Date.now());
        }
    };
    const pulseAckTimer = setInterval(pulseAcks, 200);
    // When each pulse arrived live: `${k}/${user}` → ms
    const pulseArrived = new Map<string, number>();
    for (const [u, c] of pulseClients)
      c.ws.on('message', (data) => {
        const f = JSON.parse(data.toString()) as Frame;
        const k = (f.body as { pulse?: number } | undefined)?.pulse;
        if (f.type === 'message' && typeof k === 'number' && !pulseArrived.has(`${k}/${u}`))
          pulseArrived.set(`${k}/${u}`, Date.now());
      });

    // The load.
    const recipients: Record<string, string> = {
      [senderNames[0]!]: r1,
      [senderNames[1]!]: r2,
      [senderNames[2]!]: r2,
      [senderNames[3]!]: r3,
      [senderNames[4]!]: r4,
    };
    const senders = senderNames.map(
      (s, i) =>
        new ResilientSender({
          urls: () => (i % 2 === 0 ? urls : [...urls].reverse()),
          token: tokens.get(s)!,
          deviceId: 'laptop',
          to: recipients[s]!,
          rate: RATE_PER_SENDER,
          window: WINDOW,
          tag: `t${i}`,
        }),
    );
    const deadline = Date.now() + 390_000;
    const load = Promise.all(senders.map((s) => s.run(deadline)));
    load.catch(() => undefined);
    let flapping = true;
    const r3Seen: Frame[] = [];
    const flapStats = { connections: 0, failures: 0 };
    const flapper = flap(urls, tokens.get(r3)!, () => !flapping, r3Seen, flapStats);
    note('load started');
    await sleep(8_000);

    // The churn: at most 12 steps.
    const freeze = async (n: string, ms: number) => {
      frozen.add(n);
      signal(n, 'SIGSTOP');
      note(`SIGSTOP ${n} for ${ms} ms`);
      await sleep(ms);
      signal(n, 'SIGCONT');
      frozen.delete(n);
      note(`SIGCONT ${n}`);
    };
    const stop = async (n: string, sig: NodeJS.Signals) => {
      const { code, ms } = await processes.get(n)!.stop(sig);
      note(`${sig} ${n}: ended with ${code} after ${ms} ms`);
    };
    const begin = async (n: string) => {
      await startProcessor(n);
      note(`${n} started (answers /healthz)`);
    };
    const churnStarted = Date.now();
    await begin('u3'); // 1
    await begin('u4'); // 2: while u3 restores
    await sleep(10_000);
    await stop('u1', 'SIGTERM'); // 3
    await sleep(8_000);
    await stop('u2', 'SIGKILL'); // 4
    await sleep(5_000);
    await begin('u5'); // 5
    await freeze('u5', SESSION_TIMEOUT_MS + 4_000); // 6: evicted while opening its tasks
    await sleep(8_000);
    await freeze('u3', SESSION_TIMEOUT_MS + 5_000); // 7: evicted while it holds its tasks
    await sleep(5_000);
    await begin('u6'); // 8
    await sleep(8_000);
    await Promise.all([stop('u4', 'SIGTERM'), stop('u5', 'SIGKILL')]); // 9: two at once
    await sleep(5_000);
    const u7 = startProcessor('u7'); // 10
    await sleep(1_500);
    await stop('u3', 'SIGKILL'); // 11: while u7 starts and restores
    await u7;
    note('u7 started (answers /healthz)');
    const churnEnded = Date.now();
    note(`churn over after ${((churnEnded - churnStarted) / 1000).toFixed(0)} s; u6 and u7 remain`);

    // Keep the load on for a while after the churn, then let it drain.
    await sleep(10_000);
    for (const s of senders) s.finish();
    flapping = false;
    await load;
    await flapper;
    note(
      `load done: ${senders.map((s) => `${s.options.tag} ${s.acknowledged}/${s.issued} acked, ${s.reconnects} reconnects, ${s.resends} resends, errors ${JSON.stringify(Object.fromEntries(s.errors))}`).join('; ')}`,
    );

    // After the churn, every partition delivers a new send within a bound: a final pulse.
    pulsing = false;
    await pulseLoop;
    const finalK = 10_000;
    const finalSent = Date.now();
    for (const u of pulseUsers)
      proberClient.send({
        type: 'send',
        id: `pulse-${finalK}-${u}`,
        to: u,
        body: { pulse: finalK },
      });
    const finalArrival = new Map<string, number>();
    await eventually(
      async () => {
        for (const u of pulseUsers)
          if (pulseArrived.has(`${finalK}/${u}`))
            finalArrival.set(u, pulseArrived.get(`${finalK}/${u}`)! - finalSent);
        return finalArrival.size === PARTITIONS;
      },
      60_000,
      'the final pulse on every partition',
    ).catch(() => undefined);
    pulseAcks();
    clearInterval(pulseAckTimer);
    clearInterval(r1Acker);
    const finalMissing = pulseUsers.filter((u) => !finalArrival.has(u)).map(partitionOf);
    note(
      `final pulse: ${finalArrival.size}/${PARTITIONS} partitions delivered live, slowest ${Math.max(0, ...finalArrival.values())} ms; missing partitions ${JSON.stringify(finalMissing)}`,
    );

    // Per partition, the longest a pulse acknowledged by its gateway waited to arrive live.
    const pulseReport: Record<number, { maxMs: number; missing: number; worstAtS: string }> = {};
    const stalls: string[] = [];
    for (const u of pulseUsers) {
      let maxMs = 0;
      let missing = 0;
      let worstAt = 0;
      for (const [key, sentAt] of pulseSentAt) {
        if (!key.endsWith(`/${u}`) || key.startsWith(`${finalK}/`)) continue;
        const arrived = pulseArrived.get(key);
        if (arrived === undefined) {
          missing++;
          continue;
        }
        if (arrived - sentAt > maxMs) {
          maxMs = arrived - sentAt;
          worstAt = sentAt;
        }
      }
      pulseReport[partitionOf(u)] = {
        maxMs,
        missing,
        worstAtS: ((worstAt - t0) / 1000).toFixed(1),
      };
      if (maxMs > STALL_MS)
        stalls.push(
          `partition ${partitionOf(u)}: a pulse sent at ${((worstAt - t0) / 1000).toFixed(1)}s waited ${maxMs} ms`,
        );
    }
    console.log(`      pulses (${pulseK} rounds) per partition: ${JSON.stringify(pulseReport)}`);

    // The audit: each inbox read whole by a device that never connected.
    const problems: string[] = [];
    const audits: Record<string, unknown> = {};
    const audit = async (
      owner: string,
      expect: { from: string; sender?: ResilientSender; pulses?: boolean }[],
    ) => {
      const client = await Client.open(
        g2!.url,
        tokens.get(owner)!,
        `audit-${randomBytes(2).toString('hex')}`,
      );
      const wanted = expect.reduce((sum, e) => sum + (e.sender?.acknowledged ?? 0), 0);
      const started = Date.now();
      const have = () =>
        client.frames.filter(
          (f) =>
            f.type === 'message' &&
            expect.some((e) => e.from === f.from) &&
            typeof (f.body as { n?: number }).n === 'number',
        ).length;
      await eventually(() => have() >= wanted, 120_000, `${owner}'s inbox`).catch(() => undefined);
      await sleep(1500); // anything extra would show up now
      const ms = Date.now() - started;
      const entries = client.entries();
      const seqs = entries.map((f) => f.seq as number);
      const result: Record<string, unknown> = {
        entries: entries.length,
        firstSeq: seqs[0],
        lastSeq: seqs[seqs.length - 1],
        ms,
      };
      const gaps = seqs.filter((s, i) => i > 0 && s !== seqs[i - 1]! + 1).length;
      if (seqs[0] !== 1 || gaps > 0)
        problems.push(`${owner}: seqs not gapless from 1 (first ${seqs[0]}, ${gaps} breaks)`);
      const ids = entries.filter((f) => f.type === 'message').map((f) => f.messageId as string);
      if (new Set(ids).size !== ids.length)
        problems.push(`${owner}: a messageId twice (${ids.length - new Set(ids).size})`);
      for (const e of expect) {
        if (!e.sender) continue;
        const inbox = entries
          .filter(
            (f) =>
              f.type === 'message' &&
              f.from === e.from &&
              typeof (f.body as { n?: number }).n === 'number',
          )
          .map((f) => (f.body as { n: number }).n);
        const twice = inbox.length - new Set(inbox).size;
        const lost = [...e.sender.acknowledgedAt.keys()].filter((n) => !inbox.includes(n));
        const order = orderViolations(inbox, e.sender as unknown as ResilientSender);
        result[e.from] = {
          messages: inbox.length,
          acknowledged: e.sender.acknowledged,
          issued: e.sender.issued,
          twice,
          lost: lost.length,
          orderViolations: order.length,
        };
        if (twice > 0) problems.push(`${owner}: ${twice} of ${e.from}'s messages twice`);
        if (lost.length > 0)
          problems.push(
            `${owner}: ${lost.length} acknowledged messages of ${e.from} missing, e.g. ${lost.slice(0, 10).join(',')}`,
          );
        if (order.length > 0) problems.push(`${owner}: order ${order.slice(0, 3).join('; ')}`);
      }
      audits[owner] = result;
      await client.close();
      return entries;
    };
    const [s1, s2a, s2b, s3, s4] = senderNames as [string, string, string, string, string];
    await audit(r1, [{ from: s1, sender: senders[0] }]);
    await audit(r2, [
      { from: s2a, sender: senders[1] },
      { from: s2b, sender: senders[2] },
    ]);
    await audit(r3, [{ from: s3, sender: senders[3] }]);
    await audit(r4, [{ from: s4, sender: senders[4] }]);
    // Each sender's own inbox holds its sent messages too (from itself), and laptop never acked.
    for (const [i, s] of senderNames.entries()) await audit(s, [{ from: s, sender: senders[i] }]);
    // Every pulse acknowledged is in its user's inbox once.
    for (const u of pulseUsers) {
      const client = await Client.open(g1!.url, tokens.get(u)!, 'audit');
      const acked = [...pulseSentAt.keys()]
        .filter((k) => k.endsWith(`/${u}`))
        .map((k) => Number(k.split('/')[0]));
      const pulses = () =>
        client.frames
          .filter(
            (f) => f.type === 'message' && typeof (f.body as { pulse?: number }).pulse === 'number',
          )
          .map((f) => (f.body as { pulse: number }).pulse);
      await eventually(
        () => acked.every((k) => pulses().includes(k)),
        30_000,
        `${u}'s pulses`,
      ).catch(() => undefined);
      await sleep(500);
      const got = pulses();
      const lost = acked.filter((k) => !got.includes(k));
      const twice = got.length - new Set(got).size;
      const seqs = client.entries().map((f) => f.seq as number);
      const gaps = seqs.filter((s, i) => i > 0 && s !== seqs[i - 1]! + 1).length;
      if (lost.length > 0)
        problems.push(
          `pulse user of partition ${partitionOf(u)}: ${lost.length} acknowledged pulses missing: ${lost.slice(0, 10).join(',')}`,
        );
      if (twice > 0)
        problems.push(`pulse user of partition ${partitionOf(u)}: ${twice} pulses twice`);
      if (gaps > 0) problems.push(`pulse user of partition ${partitionOf(u)}: ${gaps} seq gaps`);
      const inOrder = got.every((k, i) => i === 0 || k > got[i - 1]!);
      if (!inOrder) problems.push(`pulse user of partition ${partitionOf(u)}: pulses out of order`);
      await client.close();
    }
    // Live devices: a connection never gets one seq twice, and gets its entries in seq order.
    for (const [who, c] of [
      [r1, r1Live],
      [r4, r4Live],
      ...pulseUsers.map((u) => [u, pulseClients.get(u)!] as const),
    ] as const) {
      const seqs = c.entries().map((f) => f.seq as number);
      const repeats = seqs.length - new Set(seqs).size;
      const backwards = seqs.filter((s, i) => i > 0 && s < seqs[i - 1]!).length;
      const jumps = seqs.filter((s, i) => i > 0 && s > seqs[i - 1]! + 1).length;
      if (repeats || backwards || jumps)
        console.log(
          `      live device of ${who} (partition ${partitionOf(who)}): ${seqs.length} entries, ${repeats} repeated seqs, ${backwards} backwards, ${jumps} jumps`,
        );
    }
    // The reconnecting device: over all its connections, each seq is always the same message.
    const bySeq = new Map<number, string>();
    for (const f of r3Seen) {
      const known = bySeq.get(f.seq as number);
      if (known !== undefined && known !== f.messageId)
        problems.push(`r3 phone: seq ${f.seq} was ${known} and then ${f.messageId as string}`);
      bySeq.set(f.seq as number, f.messageId as string);
    }
    // It acks (cumulatively) what it saw: an entry a connection skipped would never come again.
    const seenSeqs = [...bySeq.keys()].sort((a, b) => a - b);
    const unseen = seenSeqs.length === 0 ? 0 : seenSeqs[seenSeqs.length - 1]! - seenSeqs.length;
    if (unseen > 0)
      problems.push(`r3 phone: ${unseen} seqs below the highest it saw never reached it`);
    console.log(
      `      r3 phone: ${flapStats.connections} connections (${flapStats.failures} failed), ${bySeq.size} distinct entries seen, ${unseen} skipped`,
    );
    console.log(`      audits: ${JSON.stringify(audits)}`);

    // The processors' logs.
    const logSummary: Record<string, Record<string, number>> = {};
    const fences: string[] = [];
    const notable: string[] = [];
    const patterns: [string, RegExp][] = [
      ['fenced', /task fenced by a newer owner/],
      ['takenOver', /task taken over meanwhile/],
      ['revived', /^task revived/],
      ['notRevived', /not revived/],
      ['notOpened', /not opened/],
      ['commitFailed', /commit failed/],
      ['rebalancingLeave', /the group is rebalancing; owning no partition/],
      ['assigned', /^tasks assigned/],
      ['kafkajsCrash', /consumer stopped by kafkajs/],
      ['notClosed', /task not closed cleanly/],
    ];
    for (const [pname, p] of processes) {
      const lines = parseLog(p.output());
      const counts: Record<string, number> = { warn: 0, error: 0 };
      for (const line of lines) {
        const msg = line.msg ?? '';
        if ((line.level ?? 0) >= 50) counts.error!++;
        else if ((line.level ?? 0) >= 40) counts.warn!++;
        for (const [key, re] of patterns) if (re.test(msg)) counts[key] = (counts[key] ?? 0) + 1;
        const t = (((line.time ?? t0) - t0) / 1000).toFixed(1);
        if (/task fenced by a newer owner/.test(msg)) fences.push(`${t}s ${pname} ${line.task}`);
        if ((line.level ?? 0) >= 40 && !/task fenced/.test(msg))
          notable.push(
            `${t}s ${pname} ${line.level} ${msg} ${line.task ?? ''} ${line.err?.message ?? ''}`.slice(
              0,
              300,
            ),
          );
        if (/^tasks assigned|task revived|not revived|not opened|taken over/.test(msg))
          notable.push(`${t}s ${pname} ${msg} ${JSON.stringify(line.tasks ?? line.task ?? '')}`);
      }
      logSummary[pname] = counts;
    }
    const fencesPerTask = new Map<string, number>();
    for (const f of fences) {
      const task = f.split(' ')[2]!;
      fencesPerTask.set(task, (fencesPerTask.get(task) ?? 0) + 1);
    }
    console.log(`      logs: ${JSON.stringify(logSummary)}`);
    console.log(
      `      fences: ${fences.length}; per task ${JSON.stringify(Object.fromEntries(fencesPerTask))}`,
    );
    notable.sort((a, b) => parseFloat(a) - parseFloat(b));
    console.log(
      `      timeline:\n        ${[...timeline, ...notable]
        .sort((a, b) => parseFloat(a) - parseFloat(b))
        .slice(0, 300)
        .join('\n        ')}`,
    );
    const repeatedFences = [...fencesPerTask]
      .filter(([, n]) => n >= 3)
      .map(([t, n]) => `${t} fenced ${n} times`);

    if (process.env.CHAOS_REPORT)
      await writeFile(
        process.env.CHAOS_REPORT,
        JSON.stringify(
          {
            run,
            timeline,
            audits,
            pulseReport,
            stalls,
            problems,
            logSummary,
            fences,
            finalArrival: Object.fromEntries(finalArrival),
            finalMissing,
            notable,
            ms: Date.now() - t0,
          },
          null,
          2,
        ),
      );
    console.log(`      whole test: ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    for (const c of [r1Live, r4Live, proberClient, ...pulseClients.values()])
      await c.close().catch(() => undefined);

    assert.deepEqual(problems, [], 'loss, duplicates, reorder or gaps');
    assert.deepEqual(
      finalMissing,
      [],
      'partitions that did not deliver a send made after the churn within 60 s',
    );
    assert.deepEqual(stalls, [], `partitions that stalled for more than ${STALL_MS} ms`);
    assert.deepEqual(repeatedFences, [], 'tasks fenced again and again');
  });
});
