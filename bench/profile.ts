/**
 * Where a V8 CPU profile (node --cpu-prof) spent its time, as short markdown tables: self time
 * by the package or source folder it belongs to, self time by function, and the time spent in
 * and under this repository's own functions (inclusive), as shares of the busy (not idle) time.
 */
const REPOSITORY = new URL('..', import.meta.url).href;

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
export interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/** node_modules/<pkg>, node:internal, (program), (garbage collector), or the repository folder. */
function areaOf(url: string, name: string): string {
  if (!url) return name.startsWith('(') ? name : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (pkg) return pkg[1]!;
  if (url.startsWith('node:')) return 'node:' + url.slice(5).split('/')[0];
  const local = /\/work\/[^/]+\/([^/]+)\//.exec(url) ?? /file:\/\/.*?\/([^/]+)\/[^/]+$/.exec(url);
  return local ? `${local[1]}/` : url;
}

export function summarizeProfile(profile: CpuProfile, top = 15): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  profile.samples.forEach((id, i) =>
    self.set(id, (self.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)),
  );
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  const byFunction = new Map<string, number>();
  const byArea = new Map<string, number>();
  for (const [id, micros] of self) {
    const { functionName, url, lineNumber } = byId.get(id)!.callFrame;
    const file = url.split('/').slice(-2).join('/');
    const fn = `${functionName || '(anonymous)'} ${file ? `${file}:${lineNumber + 1}` : ''}`.trim();
    byFunction.set(fn, (byFunction.get(fn) ?? 0) + micros);
    const area = areaOf(url, functionName);
    byArea.set(area, (byArea.get(area) ?? 0) + micros);
  }
  const table = (title: string, rows: Map<string, number>, column = 'self %') =>
    [
      `| ${title} | ${column} |`,
      '| --- | ---: |',
      ...[...rows]
        .sort((a, b) => b[1] - a[1])
        .slice(0, top)
        .map(([k, v]) => `| ${k} | ${((100 * v) / total).toFixed(1)} |`),
    ].join('\n');
  // Inclusive: each busy sample counts once for every function of ours on its stack.
  const parent = new Map<number, number>();
  for (const node of profile.nodes)
    for (const child of node.children ?? []) parent.set(child, node.id);
  const inclusive = new Map<string, number>();
  let busy = 0;
  for (const [id, micros] of self) {
    if (byId.get(id)!.callFrame.functionName === '(idle)') continue;
    busy += micros;
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const { functionName, url } = byId.get(at)!.callFrame;
      if (!url.startsWith(REPOSITORY) || url.includes('node_modules')) continue;
      const key = `${functionName || '(anonymous)'} ${url.slice(REPOSITORY.length)}`;
      if (seen.has(key)) continue;
      seen.add(key);
      inclusive.set(key, (inclusive.get(key) ?? 0) + micros);
    }
  }
  const ofBusy = new Map([...inclusive].map(([k, v]) => [k, (v * total) / busy]));
  return [
    `busy ${(busy / 1e6).toFixed(1)} s of ${(total / 1e6).toFixed(1)} s profiled`,
    table('where', byArea),
    table('function', byFunction),
    table('our function, with what it calls', ofBusy, '% of busy'),
  ].join('\n\n');
}
