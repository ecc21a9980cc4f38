/**
 * Starts `npm start` as a user would, in its own process group, for end-to-end tests; `role`
 * runs one role alone (`npm start -- gateway`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { eventually } from './log-helpers.ts';

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

export interface Started {
  child: ChildProcess;
  url: string;
  output: () => string;
  /** Signals the whole process group; resolves with the exit code and the time it took. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; ms: number }>;
}

export async function startServer(
  env: Record<string, string>,
  timeoutMs = 30000,
  role: string[] = [],
): Promise<Started> {
  const port = Number(env.PORT);
  const args = role.length > 0 ? ['start', '--silent', '--', ...role] : ['start', '--silent'];
  const child = spawn('npm', args, {
    env: { ...process.env, HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env },
    detached: true, // its own process group, as a terminal or a supervisor would run it
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  // 'close' comes once every process of the group has closed the pipes: the server itself,
  // not only npm, has exited.
  const closed = new Promise<number | null>((resolve) =>
    child.on('close', (code) => resolve(code)),
  );
  const url = `http://127.0.0.1:${port}`;
  try {
    await eventually(
      async () => {
        if (child.exitCode !== null)
          throw new Error(`npm start exited with ${child.exitCode}: ${output}`);
        return (await fetch(`${url}/healthz`).catch(() => undefined))?.status === 200;
      },
      timeoutMs,
      `npm start to answer on ${url}`,
    );
  } catch (error) {
    killGroup(child.pid!, 'SIGKILL');
    throw error;
  }
  return {
    child,
    url,
    output: () => output,
    async stop(signal = 'SIGTERM') {
      const started = Date.now();
      killGroup(child.pid!, signal);
      const code = await closed;
      return { code, ms: Date.now() - started };
    },
  };
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error; // already gone
  }
}

/**
 * The processes of one distributed deployment on the test's Kafka and registry
 * (KAFKA_BROKERS, SCHEMA_REGISTRY_URL): a shared JWT secret, and for each process its own
 * PORT, DATA_DIR and GATEWAY_ID. `stopAll` stops what is left and deletes the data.
 */
export class KafkaDeployment {
  readonly processes = new Map<string, Started>();
  private readonly dirs: string[] = [];
  private readonly run = randomBytes(3).toString('hex');
  private readonly secret = randomBytes(32).toString('base64url');

  async start(name: string, role: string[] = [], env: Record<string, string> = {}) {
    const dir = await mkdtemp(join(tmpdir(), `kchat-${name}-`));
    this.dirs.push(dir);
    const started = await startServer(
      {
        PORT: String(await freePort()),
        DATA_DIR: dir,
        GATEWAY_ID: `${name}-${this.run}`,
        JWT_SECRET: this.secret,
        KAFKA_BROKERS: process.env.KAFKA_BROKERS!,
        SCHEMA_REGISTRY_URL: process.env.SCHEMA_REGISTRY_URL!,
        LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'warn',
        ...env,
      },
      120_000,
      role,
    );
    this.processes.set(name, started);
    return started;
  }

  async stopAll(): Promise<void> {
    for (const started of this.processes.values()) await started.stop().catch(() => undefined);
    // TEST_LOG_DIR keeps every process's whole output, for a run that needs reading afterwards.
    const logDir = process.env.TEST_LOG_DIR;
    if (logDir) {
      await mkdir(logDir, { recursive: true });
      for (const [name, started] of this.processes)
        await writeFile(join(logDir, `${name}-${this.run}.log`), started.output());
    }
    for (const dir of this.dirs) await rm(dir, { recursive: true, force: true });
  }
}
