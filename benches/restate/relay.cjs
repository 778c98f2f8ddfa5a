// The Relay workflow of benches/scale.rs as a Restate service, the durable peer of issue 22
// item 4: a call starts it, two steps each journal a result (answered at once, as the
// bench's driver answers), and the call returns the end result. Served on 127.0.0.1 only.
// Started by scripts/restate-peer; not part of the test suite.
const http2 = require("http2");

// Node.js 20 lacks Promise.withResolvers, which the SDK uses.
if (!Promise.withResolvers) {
  Promise.withResolvers = function () {
    let resolve, reject;
    const promise = new Promise((a, b) => {
      resolve = a;
      reject = b;
    });
    return { promise, resolve, reject };
  };
}

const restate = require("@restatedev/restate-sdk");

const relay = restate.service({
  name: "Relay",
  handlers: {
    run: async (ctx, input) => {
      const reserved = await ctx.run("reserve", () => input.n + 1);
      const charged = await ctx.run("charge", () => reserved + 1);
      return { n: charged };
    },
  },
});

const handler = restate.createEndpointHandler({ services: [relay] });
http2.createServer(handler).listen(Number(process.env.PORT || 9080), "127.0.0.1");
