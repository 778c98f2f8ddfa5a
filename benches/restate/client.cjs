// Calls Relay/run on Restate's ingress (127.0.0.1:8080) from `conc` callers for `secs`
// seconds, each waiting for the result before its next call; prints workflows/s, p50, p99.
// Usage: node client.cjs <conc> <secs>
const http = require("http");

const conc = Number(process.argv[2] || 1);
const secs = Number(process.argv[3] || 10);
const agent = new http.Agent({ keepAlive: true, maxSockets: conc });
const body = JSON.stringify({ n: 1 });

function call() {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const req = http.request(
      {
        host: "127.0.0.1",
        port: 8080,
        path: "/Relay/run",
        method: "POST",
        agent,
        headers: { "content-type": "application/json", "content-length": body.length },
      },
      (res) => {
        let data = "";
        res.on("data", (c) => (data += c));
        res.on("end", () => {
          if (res.statusCode !== 200 || JSON.parse(data).n !== 3) {
            reject(new Error(`status ${res.statusCode}: ${data}`));
          } else {
            resolve(Number(process.hrtime.bigint() - start) / 1e6);
          }
        });
      },
    );
    req.setTimeout(60_000, () => req.destroy(new Error("no answer within 60 s")));
    req.on("error", reject);
    req.end(body);
  });
}

(async () => {
  const latencies = [];
  const t0 = Date.now();
  const end = t0 + secs * 1000;
  await Promise.all(
    Array.from({ length: conc }, async () => {
      while (Date.now() < end) latencies.push(await call());
    }),
  );
  const wall = (Date.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * q))];
  console.log(
    `restate conc ${conc}: ${latencies.length} workflows in ${wall.toFixed(1)} s = ` +
      `${(latencies.length / wall).toFixed(0)}/s, p50 ${at(0.5).toFixed(2)} ms, p99 ${at(0.99).toFixed(2)} ms`,
  );
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
